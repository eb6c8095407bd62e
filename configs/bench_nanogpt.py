"""nanoGPT's documented CPU recipe against the README's main job, one after the other on one machine.

    python -m experiments.bench_nanogpt --config configs/bench_nanogpt.py:bench --workdir runs/bench_nanogpt
    python -m experiments.bench_nanogpt --config configs/bench_nanogpt.py:smoke --workdir runs/bench_nanogpt_smoke

`bench` runs, `repeats` times and interleaved (nanoGPT then ours, ours then
nanoGPT, ...), nanoGPT's Shakespeare-character recipe from a temporary copy of
`nanogpt_dir`,

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 \\
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \\
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

(after `python data/shakespeare_char/prepare.py` on the same Tiny Shakespeare
text), and our main job,

    python -m experiments.pretrain --config configs/llama.py:tiny --workdir <temporary>

each as a whole process (imports, data, compile, evaluation, checkpoints and
sampling timed), and writes the `bench_nanogpt` section of docs/benchmarks.md.
nanoGPT needs a Python with numpy, requests and torch (`nanogpt_python`; by
default this Python if it imports torch, else `.venv-torch/bin/python` beside the
repo). `smoke` runs both at toy sizes in seconds; without torch or without a
nanoGPT checkout it runs our half and reports why the other half was skipped
(`bench` stops with that reason instead).
"""

from ml_collections import ConfigDict

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {"smoke": "experiments.bench_nanogpt"}

# nanoGPT's CPU recipe: the overrides of config/train_shakespeare_char.py on its command line.
NANOGPT_RECIPE = ("--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 "
                  "--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0")


def _base() -> ConfigDict:
    c = ConfigDict()
    c.variant = "bench"  # this variant's name, for the command line written to the docs
    c.repeats = 3  # runs of each contender, interleaved (nanoGPT, ours, ours, nanoGPT, ...)
    c.nanogpt_dir = ""  # a nanoGPT checkout; empty: $LORANK_PEERS/nanoGPT, else ../shared/peers/nanoGPT beside the repo
    c.nanogpt_python = ""  # Python with torch, numpy, requests; empty: this one if it imports torch, else .venv-torch
    c.nanogpt_config = "config/train_shakespeare_char.py"  # nanoGPT's config file, relative to its checkout
    c.nanogpt_args = NANOGPT_RECIPE  # nanoGPT's command-line overrides of that config
    c.corpus = ""  # the text both train on; empty: lorank's embedded Tiny Shakespeare
    c.ours_config = "configs/llama.py:tiny"  # our main job's --config
    c.ours_args = ""  # extra command-line overrides of our main job (space-separated --config.a.b=v)
    c.require_nanogpt = True  # stop when nanoGPT cannot run; False: run our half and report why not
    c.peak_repeats = 7  # timed repetitions of each matmul of the peak measurement (best is kept)
    c.target_val_loss = 1.80  # the goal: our final validation loss at most this (nats/byte)
    c.target_time_ratio = 1.0  # ... in at most this times nanoGPT's wall time
    c.timeout_s = 1800  # limit of one training process (seconds)
    c.section = "bench_nanogpt"  # section of docs/benchmarks.md and name of its JSON
    c.write_docs = True  # rewrite that section of docs/benchmarks.md, its block in docs/pretraining.md, README's line
    return c


def get_config(arg: str = "bench") -> ConfigDict:
    c = _base()
    c.variant = arg
    if arg == "bench":
        pass
    elif arg == "smoke":
        c.repeats = 1
        c.nanogpt_args = ("--device=cpu --compile=False --eval_iters=2 --eval_interval=4 --log_interval=1 "
                          "--block_size=16 --batch_size=4 --n_layer=1 --n_head=2 --n_embd=32 --max_iters=8 "
                          "--lr_decay_iters=8 --warmup_iters=2 --dropout=0.0")
        c.ours_config = "configs/llama.py:smoke"
        c.ours_args = "--config.analysis.grad_rank=False"
        c.require_nanogpt = False
        c.peak_repeats = 2
        c.timeout_s = 300
        c.write_docs = False
    else:
        raise ValueError(f"unknown variant {arg!r} of configs/bench_nanogpt.py; expected bench or smoke")
    return c
