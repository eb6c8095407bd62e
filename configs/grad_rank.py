"""Gradient stable rank per layer kind over a pretraining run (experiments.grad_rank).

    python -m experiments.grad_rank --config configs/grad_rank.py:d192 --workdir runs/grad_rank

`d192` trains configs/llama.py's `d192` variant (4 layers, hidden 192, 6 heads, SwiGLU
512, 250 steps of 32 x 128 bytes) with the probe evaluated every 25 steps on the first
validation micro-batch; `smoke` does the same on the smoke model in seconds. `pretrain`
is a full configs/llama.py config (every field documented there).
"""

import pathlib

from ml_collections import ConfigDict

from lorank import config_files

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {"smoke": "experiments.grad_rank"}


def get_config(arg: str = "d192") -> ConfigDict:
    if arg not in ("d192", "smoke"):
        raise ValueError(f"unknown variant {arg!r} of configs/grad_rank.py; expected d192 or smoke")
    c = ConfigDict()
    c.variant = arg  # this variant's name, for the command line written to the docs
    c.write_docs = arg == "d192"  # rewrite the grad_rank block of docs/pretraining.md and its figure
    c.pretrain = config_files.load(pathlib.Path(__file__).resolve().with_name("llama.py"), arg)
    c.pretrain.analysis.grad_rank = True
    c.pretrain.train.eval_every = 25 if arg == "d192" else 4
    if arg == "smoke":
        c.pretrain.sample.length = 4
    return c
