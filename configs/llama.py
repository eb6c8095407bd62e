"""LLaMA-style pretraining on a text corpus (default: the embedded Tiny Shakespeare, bytes as tokens).

    python -m experiments.pretrain --config configs/llama.py:tiny --workdir runs/tiny
    python -m experiments.pretrain --config configs/llama.py:smoke --workdir runs/smoke --config.train.steps=20

Variants: `tiny` (the main job: 1.87M parameters, 250 steps of 32 x 128 bytes), `smoke`
(seconds; used by the tests).
"""

from ml_collections import ConfigDict

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {"smoke": "experiments.pretrain"}


def _base() -> ConfigDict:
    c = ConfigDict()
    c.model = ConfigDict()
    c.model.vocab_size = 256  # byte-level tokenizer: one token per byte
    c.model.hidden_size = 192  # residual stream width D
    c.model.intermediate_size = 512  # SwiGLU hidden width F
    c.model.num_heads = 6  # attention heads (D / heads must be even)
    c.model.num_layers = 4  # transformer blocks
    c.model.max_len = 128  # longest sequence the model accepts
    c.model.dtype = "float32"  # compute dtype: float32 or bfloat16
    c.model.param_dtype = "float32"  # parameter storage dtype
    c.model.remat = "none"  # rematerialization: none, full, dots_saveable, ...

    c.data = ConfigDict()
    c.data.corpus = ""  # comma-separated text files; empty: the embedded corpus
    c.data.val_fraction = 0.1  # last fraction of the corpus held out for validation
    c.data.seq_len = 128  # tokens per training sequence
    c.data.seed = 0  # seed of the per-epoch window offsets and shuffling

    c.train = ConfigDict()
    c.train.steps = 250  # optimizer steps
    c.train.batch_size = 32  # sequences per optimizer step (global)
    c.train.grad_accum = 1  # micro-batches per optimizer step
    c.train.log_every = 25  # steps between progress lines and metric records
    c.train.eval_every = 50  # steps between validation evaluations
    c.train.eval_batches = 8  # validation batches per evaluation
    c.train.checkpoint_every = 100  # steps between orbax checkpoints
    c.train.keep_checkpoints = 2  # newest checkpoints kept on disk
    c.train.seed = 0  # parameter initialization seed

    c.optim = ConfigDict()
    c.optim.name = "adamw"  # adamw or sgd
    c.optim.lr = 3e-3  # peak learning rate
    c.optim.warmup_steps = 25  # linear warmup steps from 0
    c.optim.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    c.optim.b1 = 0.9  # Adam beta1 (momentum for sgd)
    c.optim.b2 = 0.99  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.weight_decay = 0.1  # decoupled weight decay on matrices
    c.optim.clip_norm = 1.0  # global-norm gradient clipping; 0 disables

    c.mesh = ConfigDict()
    c.mesh.data = -1  # data-parallel ways (-1: all remaining devices)
    c.mesh.fsdp = 1  # fully-sharded data-parallel ways
    c.mesh.tensor = 1  # tensor-parallel ways

    c.analysis = ConfigDict()
    c.analysis.grad_rank = False  # record per-layer-kind gradient stable rank at every evaluation

    c.sample = ConfigDict()
    c.sample.prompt = "ROMEO:"  # text the sample printed at the end starts from
    c.sample.length = 200  # tokens generated
    c.sample.temperature = 0.8  # 0: greedy
    c.sample.top_k = 0  # sample among the k likeliest tokens; 0: all
    c.sample.seed = 0  # sampling seed
    return c


def get_config(arg: str = "tiny") -> ConfigDict:
    c = _base()
    if arg == "tiny":
        pass
    elif arg == "smoke":
        c.model.hidden_size = 32
        c.model.intermediate_size = 64
        c.model.num_heads = 2
        c.model.num_layers = 2
        c.model.max_len = 32
        c.data.seq_len = 32
        c.train.steps = 12
        c.train.batch_size = 8
        c.train.log_every = 4
        c.train.eval_every = 6
        c.train.eval_batches = 2
        c.train.checkpoint_every = 6
        c.optim.warmup_steps = 2
        c.sample.length = 16
        c.analysis.grad_rank = True
    else:
        raise ValueError(f"unknown variant {arg!r} of configs/llama.py; expected tiny or smoke")
    return c
