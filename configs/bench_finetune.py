"""The seed's fine-tuning comparison at CPU scale: full fine-tuning, GaLore and LoRA at two ranks.

    python -m experiments.bench_finetune --config configs/bench_finetune.py:bench --workdir runs/bench_finetune

The main job's model (configs/llama.py:tiny, width 64) is pretrained once on Tiny Shakespeare in
workdir/pretrained, then fine-tuned by every entry of `runs` ("METHOD" or "METHOD:RANK"; rank 8 is
low and 32 high against the width 64) at the same token budget, the same batches and every peak
learning rate of `lr_multipliers` times `base_lr` (each entry keeps its best), on the Python
standard library's own source files with held-out files for validation (`finetune` is a full
configs/finetune.py config, every field documented there). LoRA's alpha is 2 x rank (scale 2).
"""

import pathlib

from ml_collections import ConfigDict

from lorank import config_files

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {"smoke": "experiments.bench_finetune"}


def _finetune(variant: str) -> ConfigDict:
    return config_files.load(pathlib.Path(__file__).resolve().with_name("finetune.py"), variant)


def _base() -> ConfigDict:
    c = ConfigDict()
    c.runs = "adamw,galore:8,galore:32,lora:8,lora:32"  # METHOD or METHOD:RANK, comma-separated; first: baseline
    c.base_lr = 2e-3  # peak learning rate at multiplier 1, for every method
    c.lr_multipliers = "1,2,4,8"  # peak learning rates tried per run, times base_lr; each run keeps its best
    c.lora_alpha_per_rank = 2.0  # LoRA's alpha = this x rank (its update scale alpha / rank)
    c.variant = "bench"  # this variant's name, for the command written to the docs
    c.section = "bench_finetune"  # section of docs/benchmarks.md and name of the figure
    c.write_docs = True  # rewrite that section of docs/benchmarks.md and its figure
    c.finetune = _finetune("tiny")  # the shared fine-tuning config (configs/finetune.py fields)
    return c


def get_config(arg: str = "bench") -> ConfigDict:
    c = _base()
    c.variant = arg
    if arg == "bench":
        c.finetune.train.steps = 400
        c.finetune.train.eval_every = 50
        c.finetune.train.checkpoint_every = 400
        c.finetune.optim.warmup_steps = 20
    elif arg == "smoke":
        c.runs = "adamw,galore:4,lora:4"
        c.lr_multipliers = "1,4"
        c.base_lr = 2e-3
        c.write_docs = False
        c.finetune = _finetune("smoke")
    else:
        raise ValueError(f"unknown variant {arg!r} of configs/bench_finetune.py; expected bench or smoke")
    return c
