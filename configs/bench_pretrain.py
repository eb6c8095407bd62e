"""The GaLore paper's comparison at small scale: every method, the same model, data and token budget.

    python -m experiments.bench_pretrain --config configs/bench_pretrain.py:bench --workdir runs/bench_pretrain

`pretrain` is a full `configs/llama.py` config (every field documented there);
each method of `methods` trains it with `--config.pretrain.optim.name` set to the
method, in workdir/METHOD (a rerun reuses finished runs and resumes unfinished ones).
"""

import importlib.util
import pathlib

from ml_collections import ConfigDict

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {"smoke": "experiments.bench_pretrain"}


def _llama(variant: str) -> ConfigDict:
    path = pathlib.Path(__file__).resolve().with_name("llama.py")
    spec = importlib.util.spec_from_file_location("configs_llama", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _base() -> ConfigDict:
    c = ConfigDict()
    c.methods = "adamw,galore,lowrank,lora,relora"  # comma-separated methods, the first is the baseline
    c.lr_multipliers = "1,2,4"  # peak learning rates tried per method, times optim.lr (optim.galore_lr for GaLore)
    c.write_docs = True  # rewrite the bench_pretrain section of docs/benchmarks.md and its figure
    c.pretrain = _llama("tiny")  # the shared pretraining config (configs/llama.py fields)
    return c


def get_config(arg: str = "bench") -> ConfigDict:
    c = _base()
    p = c.pretrain
    if arg == "bench":
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
    elif arg == "smoke":
        c.methods = "adamw,galore,lora"
        c.lr_multipliers = "1,2"
        c.write_docs = False
        c.pretrain = _llama("smoke")
        c.pretrain.analysis.grad_rank = False
        c.pretrain.train.steps = 6
        c.pretrain.train.eval_every = 3
        c.pretrain.train.log_every = 3
        c.pretrain.sample.length = 4
    else:
        raise ValueError(f"unknown variant {arg!r} of configs/bench_pretrain.py; expected bench or smoke")
    return c
