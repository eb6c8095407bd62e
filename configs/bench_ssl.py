"""The alpha-CL and DirectCLR comparisons at CPU scale, with raw-pixel and random-network anchors.

    python -m experiments.bench_ssl --config configs/bench_ssl.py:bench --workdir runs/bench_ssl

Every variant of `variants` (experiments/bench_ssl.py VARIANTS) trains `ssl` (a full configs/ssl.py
config, every field documented there) with only its `ssl.loss`, `ssl.directclr_dim` and
`model.projector` changed: the same ConvNet, CIFAR-10 subset, augmentations, steps and optimizer.
"""

import pathlib

from ml_collections import ConfigDict

from lorank import config_files

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {"smoke": "experiments.bench_ssl"}
ALL_VARIANTS = "infonce,quadratic,backprop,r_H,r_gamma,r_s,direct,proj_linear,proj_none,directclr"


def _ssl(variant: str) -> ConfigDict:
    return config_files.load(pathlib.Path(__file__).resolve().with_name("ssl.py"), variant)


def _base() -> ConfigDict:
    c = ConfigDict()
    c.variants = ALL_VARIANTS  # comma-separated VARIANTS; the first run's step-0 probe is the random network
    c.variant = "bench"  # this variant's name, for the command written to the docs
    c.section = "bench_ssl"  # section of docs/benchmarks.md and name of the figure
    c.write_docs = True  # rewrite that section of docs/benchmarks.md and its figure
    c.margin = 0.02  # "well above L_quadratic": at least this much linear-probe accuracy
    c.directclr_dim = 16  # DirectCLR's d0 (a quarter of the cpu ConvNet's 64 features)
    c.throughput = True  # measure images/s against PyTorch (needs a Python with torch)
    c.throughput_steps = 20  # timed steps per contender per round
    c.throughput_rounds = 5  # interleaved rounds
    c.torch_threads = 2  # torch.set_num_threads of the PyTorch side
    c.ssl = _ssl("cpu")  # the shared run (configs/ssl.py fields), trained longer than the cpu variant
    c.ssl.train.steps = 2500
    return c


def get_config(arg: str = "bench") -> ConfigDict:
    c = _base()
    c.variant = arg
    if arg == "smoke":
        c.variants = "infonce,directclr"
        c.write_docs = False
        c.throughput = False
        c.directclr_dim = 8
        c.ssl = _ssl("smoke")
    elif arg != "bench":
        raise ValueError(f"unknown variant {arg!r} of configs/bench_ssl.py; expected bench or smoke")
    return c
