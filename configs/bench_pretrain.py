"""The GaLore paper's comparison at small scale: every method, the same model, data and token budget.

    python -m experiments.bench_pretrain --config configs/bench_pretrain.py:bench --workdir runs/bench_pretrain
    python -m experiments.bench_pretrain --config configs/bench_pretrain.py:sweep --workdir runs/bench_pretrain_sweep

`bench` trains each method once at its tuned peak learning rate (`peak_lrs`, the
best of the `sweep` variant's grid) and measures the table, timings included;
`sweep` trains each method at every multiplier of `lr_multipliers` and keeps the
best; `long` runs AdamW, GaLore and LoRA for four times the tokens at the tuned
rates. `pretrain` is a full `configs/llama.py` config (every field documented
there); each method of `methods` trains it with `--config.pretrain.optim.name`
set to the method, in workdir/METHOD/lr_PEAK (a rerun reuses finished runs and
resumes unfinished ones).
"""

import pathlib

from ml_collections import ConfigDict

from lorank import config_files

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {"smoke": "experiments.bench_pretrain"}

# Each method's best peak learning rate on the `sweep` grid (lowest final validation loss).
TUNED_PEAK_LRS = {"adamw": 1.25e-3, "galore": 4e-2, "lowrank": 1.25e-3, "lora": 2.5e-3, "relora": 1.25e-3}


def _llama(variant: str) -> ConfigDict:
    return config_files.load(pathlib.Path(__file__).resolve().with_name("llama.py"), variant)


def _base() -> ConfigDict:
    c = ConfigDict()
    c.methods = "adamw,galore,lowrank,lora,relora"  # comma-separated methods, the first is the baseline
    c.lr_multipliers = "1"  # peak learning rates tried per method, times the method's base rate (below)
    # method -> base peak learning rate; a method not listed uses optim.lr (optim.galore_lr for GaLore's)
    c.peak_lrs = ConfigDict()
    c.variant = "bench"  # this variant's name, for the command line written to the docs
    c.section = "bench_pretrain"  # section of docs/benchmarks.md and name of the figure
    c.write_docs = True  # rewrite that section of docs/benchmarks.md and its figure
    c.pretrain = _llama("d192")  # the shared pretraining config (configs/llama.py fields)
    return c


def get_config(arg: str = "bench") -> ConfigDict:
    c = _base()
    c.variant = arg
    p = c.pretrain
    if arg in ("bench", "sweep", "long"):
        p.train.steps = 200
        p.train.batch_size = 16
        p.train.log_every = 25
        p.train.eval_every = 25
        p.train.eval_batches = 8
        p.train.checkpoint_every = 200
        p.optim.lr = 2.5e-3
        p.optim.galore_lr = 5e-3
        p.optim.warmup_steps = 20
        p.optim.rank = 48
        p.optim.update_proj_gap = 50
        p.optim.relora_reset_every = 50
        p.optim.relora_restart_warmup = 10
        p.sample.length = 64
        if arg == "bench":  # the best of the sweep's grid (docs/benchmarks.md#bench_pretrain_sweep)
            c.peak_lrs = ConfigDict(TUNED_PEAK_LRS)
        elif arg == "long":  # four times the token budget, at the same tuned learning rates
            c.methods = "adamw,galore,lora"
            c.peak_lrs = ConfigDict({m: TUNED_PEAK_LRS[m] for m in c.methods.split(",")})
            c.section = "bench_pretrain_long"
            p.train.steps = 800
            p.train.eval_every = 100
            p.train.checkpoint_every = 800
            p.optim.warmup_steps = 80
            p.optim.update_proj_gap = 200
        else:
            c.lr_multipliers = "0.25,0.5,1,2,4,8"
            c.peak_lrs = ConfigDict({"galore": 1e-2})  # a higher grid for GaLore: its best was the top of 5e-3 x (1..8)
            c.section = "bench_pretrain_sweep"
    elif arg == "smoke":
        c.methods = "adamw,galore"
        c.peak_lrs = ConfigDict({"galore": 1.5e-2})
        c.write_docs = False
        c.pretrain = _llama("smoke")
        c.pretrain.analysis.grad_rank = False
        c.pretrain.train.steps = 6
        c.pretrain.train.eval_every = 3
        c.pretrain.train.log_every = 3
        c.pretrain.sample.length = 4
    else:
        raise ValueError(f"unknown variant {arg!r} of configs/bench_pretrain.py; expected bench, sweep, long or smoke")
    return c
