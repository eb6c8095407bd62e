"""LLaMA-style pretraining on a text corpus (default: the embedded Tiny Shakespeare, bytes as tokens).

    python -m experiments.pretrain --config configs/llama.py:tiny --workdir runs/tiny
    python -m experiments.pretrain --config configs/llama.py:smoke --workdir runs/smoke --config.train.steps=20
    python -m experiments.pretrain --config configs/llama.py:60m --config.optim.name=galore \
        --config.data.tokenizer=/path/to/t5/spiece.model --config.data.tfds_data_dir=/data/tfds --workdir runs/60m

Variants: `tiny` (the main job: 0.19M parameters, 3 layers of width 64, 1500 steps of
16 x 64 bytes, tuned to beat nanoGPT's CPU recipe in loss and wall time, see
experiments/bench_nanogpt.py and docs/pretraining.md), `d192` (1.87M parameters, 250 steps of
32 x 128 bytes: the shape of configs/bench_pretrain.py's method comparisons, the main job
before that tuning), `smoke` (seconds; used by the tests), and the GaLore paper's C4 runs
`60m`, `130m`, `350m`, `1b`, `7b` (model shapes and training recipe of the paper; they need
C4 prepared for tfds and a SentencePiece model file, e.g. T5's). `--config.optim.name` picks
the method: adamw, adamw8bit, sgd, galore, galore8bit, galore_adafactor, lowrank, lora, relora.
"""

from ml_collections import ConfigDict

# The GaLore paper's LLaMA sizes: hidden, intermediate, heads, layers, steps, GaLore rank.
PAPER_SIZES = {
    "60m": (512, 1376, 8, 8, 10_000, 128),
    "130m": (768, 2048, 12, 12, 20_000, 256),
    "350m": (1024, 2736, 16, 24, 60_000, 256),
    "1b": (2048, 5461, 32, 24, 100_000, 512),
    "7b": (4096, 11008, 32, 32, 150_000, 1024),
}

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
    c.model.num_kv_heads = 0  # key/value heads (grouped-query attention; divides num_heads); 0: num_heads
    c.model.tie_embeddings = False  # logits from the transposed embedding instead of an LM-head matrix
    c.model.max_len = 128  # longest sequence the model accepts
    c.model.dtype = "float32"  # compute dtype: float32 or bfloat16
    c.model.param_dtype = "float32"  # parameter storage dtype
    c.model.remat = "none"  # rematerialization: none, full, dots_saveable, ...
    c.model.init_std = 0.02  # std of the normal init of every kernel and embedding

    c.data = ConfigDict()
    c.data.source = "text"  # "text" (data.corpus) or "tfds" (data.tfds_name in data.tfds_data_dir)
    c.data.tokenizer = "byte"  # "byte" or the path of a SentencePiece .model file
    c.data.corpus = ""  # comma-separated text files; empty: the embedded corpus
    c.data.val_fraction = 0.1  # last fraction of the corpus held out for validation
    c.data.seq_len = 128  # tokens per training sequence
    c.data.seed = 0  # seed of the per-epoch window offsets and shuffling
    c.data.tfds_name = "c4/en"  # tfds dataset, prepared as array_record (source "tfds")
    c.data.tfds_data_dir = "~/tensorflow_datasets"  # where the tfds dataset is prepared
    c.data.tfds_train_split = "train"  # split trained on
    c.data.tfds_eval_split = "validation"  # split evaluated on (its first sequences)
    c.data.mode = "pad"  # tfds documents: "pad" (truncate/pad each, as the paper) or "pack"

    c.train = ConfigDict()
    c.train.steps = 250  # optimizer steps
    c.train.batch_size = 32  # sequences per optimizer step (global)
    c.train.grad_accum = 1  # micro-batches per optimizer step
    c.train.log_every = 25  # steps between progress lines and metric records
    c.train.eval_every = 50  # steps between validation evaluations
    c.train.eval_batches = 8  # validation batches per evaluation
    c.train.checkpoint_every = 100  # steps between orbax checkpoints
    c.train.keep_checkpoints = 2  # newest checkpoints kept on disk
    c.train.seed = 0  # parameter initialization seed (and of per-step keys)
    c.train.on_nonfinite = "stop"  # a non-finite loss or gradient: "stop" the run naming the step, or "skip" it

    c.optim = ConfigDict()
    c.optim.name = "adamw"  # method: adamw adamw8bit sgd galore galore8bit galore_adafactor lowrank lora relora
    c.optim.lr = 3e-3  # peak learning rate of every method but GaLore's
    c.optim.galore_lr = 1e-2  # peak learning rate of galore, galore8bit, galore_adafactor
    c.optim.warmup_steps = 25  # linear warmup steps from 0
    c.optim.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    c.optim.b1 = 0.9  # Adam beta1 (momentum for sgd)
    c.optim.b2 = 0.99  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.weight_decay = 0.1  # decoupled weight decay on matrices
    c.optim.clip_norm = 1.0  # global-norm gradient clipping; 0 disables
    c.optim.clip_scope = "global"  # clip_norm bounds the norm over all leaves ("global") or of each leaf ("per_leaf")
    c.optim.update_schedule = "joint"  # "joint": all gradients, then all updates; "per_layer": update each layer
    #   as soon as its gradient exists (full-rank methods, per_leaf clipping, grad_accum 1; docs/memory.md)
    c.optim.update_chunk = 0  # per_layer: embedding and LM head updated in row chunks of at most this many values
    c.optim.block_size = 256  # values per quantization block of 8-bit states
    c.optim.rank = 64  # rank r of GaLore projections, low-rank factors and LoRA
    c.optim.update_proj_gap = 200  # GaLore: steps between SVD refreshes of the projection (T)
    c.optim.galore_scale = 0.25  # GaLore: scale of the projected-back update (alpha)
    c.optim.proj_type = "std"  # GaLore: projection side (std, reverse_std, left, right, full)
    c.optim.svd = "exact"  # GaLore: exact or randomized top-r singular vectors
    c.optim.lora_alpha = 32.0  # LoRA / ReLoRA: the update is (lora_alpha / rank) a b
    c.optim.relora_reset_every = 100  # ReLoRA: steps between merge-and-reinit resets
    c.optim.relora_restart_warmup = 10  # ReLoRA: learning-rate re-warmup steps after each reset
    c.optim.relora_keep_fraction = 0.01  # ReLoRA: largest factor moments kept at a reset (paper: prune 99%)

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


def paper(size: str) -> ConfigDict:
    """The GaLore paper's C4 pretraining run for `size` (one of PAPER_SIZES)."""
    hidden, intermediate, heads, layers, steps, rank = PAPER_SIZES[size]
    c = _base()
    c.model.vocab_size = 32000  # the T5 tokenizer
    c.model.hidden_size = hidden
    c.model.intermediate_size = intermediate
    c.model.num_heads = heads
    c.model.num_layers = layers
    c.model.max_len = 256
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.data.source = "tfds"
    c.data.tokenizer = ""
    c.data.seq_len = 256
    c.train.steps = steps
    c.train.batch_size = 512
    c.train.log_every = 100
    c.train.eval_every = 1000
    c.train.eval_batches = 10
    c.train.checkpoint_every = 1000
    c.optim.lr = 1e-3
    c.optim.galore_lr = 1e-2
    c.optim.warmup_steps = steps // 10
    c.optim.min_lr_ratio = 0.1
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.0
    c.optim.rank = rank
    c.optim.update_proj_gap = 200
    c.optim.galore_scale = 0.25
    c.optim.relora_reset_every = steps // 4
    c.optim.relora_restart_warmup = 100
    c.sample.prompt = "The"
    return c


def tune_tiny(c: ConfigDict) -> None:
    """The main job's shape and schedule for a 2-core CPU (experiments in docs/pretraining.md).

    A narrower model on more, smaller batches than `d192`: at this budget a byte model gains
    more from tokens and optimizer steps than from width. Evaluation only at the end (and
    at step 0, where the loop always evaluates), on every window of the validation split.
    """
    c.model.hidden_size = 64
    c.model.intermediate_size = 192
    c.model.num_heads = 4
    c.model.num_layers = 3
    c.model.max_len = 64
    c.data.seq_len = 64
    c.train.steps = 1500
    c.train.batch_size = 16
    c.train.log_every = 100
    c.train.eval_every = 1500
    c.train.eval_batches = 1000  # more than the split holds: every full micro-batch of validation windows
    c.train.checkpoint_every = 750
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50


def get_config(arg: str = "tiny") -> ConfigDict:
    if arg in PAPER_SIZES:
        return paper(arg)
    c = _base()
    if arg == "tiny":
        tune_tiny(c)
    elif arg == "d192":
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
        c.optim.rank = 8
        c.optim.update_proj_gap = 5
        c.optim.relora_reset_every = 5
        c.optim.relora_restart_warmup = 2
        c.sample.length = 16
        c.analysis.grad_rank = True
    else:
        raise ValueError(f"unknown variant {arg!r} of configs/llama.py; expected tiny, d192, smoke or one of "
                         f"{sorted(PAPER_SIZES)}")
    return c
