"""The DirectPred paper's comparison at CPU scale, with the collapsing variants.

    python -m experiments.bench_noncontrastive --config configs/bench_noncontrastive.py:bench \
        --workdir runs/bench_noncontrastive

Every variant of `variants` (experiments/bench_noncontrastive.py VARIANTS) trains
`noncontrastive` (a full configs/noncontrastive.py config, every field documented there) with
only its `ssl` fields changed: the same ConvNet, CIFAR-10 subset, augmentations, steps and optimizer.
"""

import pathlib

from ml_collections import ConfigDict

from lorank import config_files

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {"smoke": "experiments.bench_noncontrastive"}
ALL_VARIANTS = "directpred,directpred_freq5,directcopy,sgd_linear,mlp_predictor,no_predictor,no_stop_gradient"


def _noncontrastive(variant: str) -> ConfigDict:
    return config_files.load(pathlib.Path(__file__).resolve().with_name("noncontrastive.py"), variant)


def _base() -> ConfigDict:
    c = ConfigDict()
    c.variants = ALL_VARIANTS  # comma-separated VARIANTS; the first run's step-0 probe is the random network
    c.variant = "bench"  # this variant's name, for the command written to the docs
    c.section = "bench_noncontrastive"  # section of docs/benchmarks.md and name of the figures
    c.write_docs = True  # rewrite that section of docs/benchmarks.md and its figures
    c.noncontrastive = _noncontrastive("cpu")  # the shared run (configs/noncontrastive.py fields)
    return c


def get_config(arg: str = "bench") -> ConfigDict:
    c = _base()
    c.variant = arg
    if arg == "smoke":
        c.variants = "directpred,no_predictor"
        c.write_docs = False
        c.noncontrastive = _noncontrastive("smoke")
    elif arg != "bench":
        raise ValueError(f"unknown variant {arg!r} of configs/bench_noncontrastive.py; expected bench or smoke")
    return c
