"""The alpha-CL and DirectCLR comparisons at CPU scale, with raw-pixel and random-network anchors.

    python -m experiments.bench_ssl --config configs/bench_ssl.py:bench --workdir runs/bench_ssl

Every variant of `variants` (experiments/bench_ssl.py VARIANTS) trains `ssl` (a full configs/ssl.py
config, every field documented there) with only its `ssl.loss`, `ssl.directclr_dim`,
`model.projector` and (galore) `optim.name` changed: the same ConvNet, CIFAR-10 subset,
augmentations, steps and learning rate.
`bench`: the eleven variants on configs/ssl.py:cpu, with the PyTorch throughput comparison; `smoke`:
two variants on configs/ssl.py:smoke, no throughput, nothing written to the docs.
"""

import pathlib

from ml_collections import ConfigDict

from lorank import config_files

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {"smoke": "experiments.bench_ssl"}
ALL_VARIANTS = "infonce,quadratic,backprop,r_H,r_gamma,r_s,direct,proj_linear,proj_none,directclr,galore"


def _ssl(variant: str) -> ConfigDict:
    return config_files.load(pathlib.Path(__file__).resolve().with_name("ssl.py"), variant)


def _base() -> ConfigDict:
    c = ConfigDict()
    c.variants = ALL_VARIANTS  # comma-separated VARIANTS; the first run's step-0 probe is the random network
    c.variant = "bench"  # this variant's name, for the command written to the docs
    c.section = "bench_ssl"  # section of docs/benchmarks.md and name of the figure
    c.write_docs = True  # rewrite that section of docs/benchmarks.md and its figure
    c.margin = 0.02  # "well above L_quadratic": at least this much more linear-probe accuracy
    c.directclr_dim = 0  # DirectCLR's d0 (0: a quarter of the backbone's feature dimension)
    c.throughput = True  # images/s of the train step against PyTorch (skipped without a Python with torch)
    c.throughput_steps = 30  # timed steps per contender per round
    c.throughput_rounds = 5  # interleaved rounds (lorank, then PyTorch in its own process)
    c.torch_threads = 2  # torch.set_num_threads of the PyTorch side
    c.ssl = _ssl("cpu")  # the shared run (configs/ssl.py fields)
    return c


def get_config(arg: str = "bench") -> ConfigDict:
    c = _base()
    c.variant = arg
    if arg == "smoke":
        c.variants = "direct,directclr"
        c.write_docs = False
        c.throughput = False
        c.ssl = _ssl("smoke")
        c.ssl.train.eval_every = c.ssl.train.checkpoint_every = c.ssl.train.steps  # probes at step 0 and the end
    elif arg != "bench":
        raise ValueError(f"unknown variant {arg!r} of configs/bench_ssl.py; expected bench or smoke")
    return c
