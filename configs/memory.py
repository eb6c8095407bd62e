"""Memory of the LLaMA train step per size, method and update option (docs/memory.md).

    python -m experiments.memory --config configs/memory.py:paper --workdir runs/memory
    python -m experiments.memory --config configs/memory.py:smoke --workdir runs/memory_smoke
    python -m experiments.memory --config configs/memory.py:finetune --workdir runs/memory_finetune

Rows accumulate in WORKDIR/memory.json (one row per size, method, update option and scheduler),
so parts of the table can be measured separately; docs/memory.md shows every stored row.
Overrides: `--config.sizes=7b`, `--config.methods="('galore8bit', 'adamw')"`,
`--config.updates=per_layer`, `--config.compile=False` (closed forms only, seconds).
"""

from ml_collections import ConfigDict

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {"smoke": "experiments.memory"}

PAPER_METHODS = ("adamw", "adamw8bit", "galore", "galore8bit", "galore_adafactor", "lowrank", "lora", "relora")
FINETUNE_METHODS = ("adamw", "adamw8bit", "galore", "galore8bit", "lora")


def _base() -> ConfigDict:
    c = ConfigDict()
    c.variant = "paper"  # this variant's name (the command lines the tables show)
    c.model_config = "configs/llama.py"  # config file whose variants are the sizes (repository-relative)
    c.sizes = ("60m", "130m", "350m", "1b", "7b")  # variants of model_config measured
    c.methods = PAPER_METHODS  # optim.name values measured at every size
    c.updates = ("global_clip", "per_leaf_clip", "no_clip", "per_layer")  # update options (experiments.memory.UPDATES)
    c.dtype = "bfloat16"  # parameter and compute dtype of every size
    c.remat = "full"  # model.remat of every size
    c.batch_size = 1  # sequences per step
    c.seq_len = 256  # tokens per sequence
    c.update_chunk = 2**24  # per_layer: embedding and LM head updated in row chunks of at most this many values
    c.xla_scheduler = "memory_optimized"  # XLA CPU instruction scheduler: memory_optimized or default
    c.compile = True  # compile the train step (False: closed forms and eval_shape sizes only)
    c.write_docs = True  # rewrite the tables of docs/memory.md from the workdir's merged rows
    c.write_benchmarks = True  # also write the `memory` section of docs/benchmarks.md (+ bench_results JSON)
    c.docs_block = "memory"  # the docs/memory.md markers (`<!-- BLOCK:start -->`) the tables go between
    c.fit_bytes = 0  # > 0: a column per update option of whether the compiled peak is at most this many bytes
    return c


def get_config(arg: str = "paper") -> ConfigDict:
    c = _base()
    c.variant = arg
    if arg == "paper":
        pass
    elif arg == "finetune":
        # configs/finetune.py's LLaMA-architecture models of LLaMA-7B's and Gemma-2B's shapes (Gemma-2B:
        # multi-query attention, tied embeddings), their optim.rank 128 for LoRA and GaLore.
        c.model_config = "configs/finetune.py"
        c.sizes = ("llama_7b", "gemma_2b")
        c.methods = FINETUNE_METHODS
        # per_layer needs untied embeddings and a full-rank method: gemma_2b and lora rows show n/a.
        c.updates = ("global_clip", "per_layer")
        c.seq_len = 512
        c.docs_block = "memory_finetune"
        c.fit_bytes = 24 * 10**9  # a 24 GB card, GB = 10^9 bytes
        c.write_benchmarks = False
    elif arg == "smoke":
        c.sizes = ("smoke",)
        c.methods = ("galore8bit",)
        c.updates = ("global_clip", "per_layer")
        c.seq_len = 32
        c.write_docs = False
        c.write_benchmarks = False
    else:
        raise ValueError(f"unknown variant {arg!r} of configs/memory.py; expected paper, finetune or smoke")
    return c
