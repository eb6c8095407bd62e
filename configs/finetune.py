"""Fine-tuning a pretrained LLaMA-style model with full updates, GaLore or LoRA (every pretraining method).

    python -m experiments.finetune --config configs/finetune.py:tiny --workdir runs/ft_tiny
    python -m experiments.finetune --config configs/finetune.py:tiny --config.optim.name=galore --workdir runs/ft_galore
    python -m experiments.finetune --config configs/finetune.py:sft --config.init.path=/ckpt/llama \
        --config.data.train_file=/data/oasst.jsonl --workdir runs/sft

Variants:
- `tiny`: the main job's model (configs/llama.py:tiny, pretrained in init.path first if no run is
  there) fine-tuned on the Python standard library's own source files, held-out files for
  validation, the Shakespeare validation split evaluated as eval_loss/retain (forgetting). The
  shape of experiments/bench_finetune.py's comparison.
- `smoke`: the same at the size of configs/llama.py:smoke (seconds; the tests run it).
- `sft`: instruction tuning of a Hugging Face LLaMA checkpoint (init.path) on JSON lines
  (data.train_file; {"prompt", "response"} or chat "messages"), loss on response tokens only.
- `gemma_2b`, `phi_2`, `llama_7b`: the seed's OASST-style SFT rows at rank 128 (GaLore and LoRA
  rank 128 is the seed's setting; the learning rates, batch and schedule here are lorank's
  choices, not the seed's). They need the weights, the data and a GPU. lorank computes the
  LLaMA architecture: `llama_7b` loads LLaMA-7B's Hugging Face checkpoint; `gemma_2b` and
  `phi_2` are models of Gemma-2B's and Phi-2's shapes in the LLaMA block (Gemma's GeGLU and
  embedding scaling, Phi-2's parallel block, LayerNorm, partial rotary embedding and two-matrix
  MLP are not computed, and `lorank.models.hf.load_llama` refuses those architectures by name):
  they size the memory table (docs/memory.md) and train LLaMA-format checkpoints of that shape.

Every field of configs/llama.py applies (its comments document them); the `model` section is
replaced by the start checkpoint's. Sections added here: `init` (where the start is), `eval`
(the retained-corpus evaluation), `export` (a Hugging Face checkpoint written at the end).
"""

import pathlib

from ml_collections import ConfigDict

from lorank import config_files

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {"smoke": "experiments.finetune"}

# The seed's fine-tuning models as LLaMA shapes: vocab, hidden, intermediate, heads, kv heads, layers,
# max positions, tied embeddings, RMSNorm eps.
PAPER_MODELS = {
    "gemma_2b": (256000, 2048, 16384, 8, 1, 18, 8192, True, 1e-6),
    "phi_2": (51200, 2560, 10240, 32, 32, 32, 2048, False, 1e-5),
    "llama_7b": (32000, 4096, 11008, 32, 32, 32, 2048, False, 1e-6),
}


def _llama(variant: str) -> ConfigDict:
    return config_files.load(pathlib.Path(__file__).resolve().with_name("llama.py"), variant)


def _base(pretrain_variant: str) -> ConfigDict:
    c = _llama(pretrain_variant)
    c.init = ConfigDict()
    c.init.source = "lorank"  # "lorank": a lorank run's workdir; "hf": a Hugging Face LLaMA checkpoint dir
    c.init.path = ""  # that workdir or directory; empty with init.pretrain: workdir/pretrained
    c.init.pretrain = f"configs/llama.py:{pretrain_variant}"  # pretrain this in init.path first if no run is there
    c.init.dtype = ""  # hf: cast the weights to this dtype on loading (empty: the checkpoint's)

    c.data.source = "python"  # the Python standard library's source files (held-out files for validation)
    c.data.tokenizer = ""  # empty: the start's tokenizer (its run's, or the checkpoint's tokenizer.json)
    c.data.max_bytes = 2_000_000  # python source: at most this many bytes of train and of held-out files (0: all)
    c.data.train_file = ""  # jsonl source: instruction records
    c.data.val_file = ""  # jsonl source: held-out records (empty: data.val_fraction of data.train_file)

    c.eval = ConfigDict()
    c.eval.retain_corpus = "embedded"  # also evaluate the validation split of this corpus ("embedded", paths, "")

    c.export = ConfigDict()
    c.export.hf_path = ""  # write the fine-tuned model (LoRA merged) here as a Hugging Face checkpoint
    c.export.dtype = ""  # its dtype: float32, bfloat16, float16 (empty: the parameters')

    c.sample.prompt = "def "  # the sample printed at the end continues this (Python source)
    c.optim.warmup_steps = 0  # no warmup by default: the start is trained already
    return c


def tiny() -> ConfigDict:
    c = _base("tiny")
    c.train.steps = 600
    c.train.eval_every = 150
    c.train.eval_batches = 64
    c.train.checkpoint_every = 300
    c.train.log_every = 50
    c.optim.lr = 1e-3
    c.optim.galore_lr = 1e-3
    c.optim.warmup_steps = 20
    c.optim.rank = 8
    c.optim.lora_alpha = 16.0
    c.optim.update_proj_gap = 100
    c.optim.galore_scale = 1.0
    return c


def smoke() -> ConfigDict:
    c = _base("smoke")
    c.data.max_bytes = 200_000
    c.train.steps = 16
    c.train.log_every = 4
    c.train.eval_every = 8
    c.train.eval_batches = 4
    c.train.checkpoint_every = 8
    c.optim.lr = 3e-3
    c.optim.rank = 8
    c.sample.length = 16
    c.analysis.grad_rank = False
    return c


def sft(base: ConfigDict | None = None) -> ConfigDict:
    c = base or _base("d192")
    c.init.source = "hf"
    c.init.pretrain = ""
    c.data.source = "jsonl"
    c.data.mode = "pad"  # jsonl: "pad" each record to data.seq_len (truncating) or "pack" records together
    c.data.seq_len = 512
    c.train.batch_size = 16
    c.train.steps = 1000
    c.train.eval_every = 100
    c.train.eval_batches = 8
    c.train.checkpoint_every = 500
    c.optim.lr = 2e-5
    c.optim.galore_lr = 2e-5
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 50
    c.optim.rank = 128
    c.optim.lora_alpha = 256.0
    c.optim.galore_scale = 2.0
    c.eval.retain_corpus = ""
    c.sample.prompt = "Hello"
    return c


def paper(name: str) -> ConfigDict:
    """The seed's OASST-style SFT row for `name` (a key of PAPER_MODELS), in bfloat16 with remat."""
    vocab, hidden, intermediate, heads, kv_heads, layers, max_len, tied, eps = PAPER_MODELS[name]
    c = sft()
    c.model.vocab_size = vocab
    c.model.hidden_size = hidden
    c.model.intermediate_size = intermediate
    c.model.num_heads = heads
    c.model.num_kv_heads = kv_heads
    c.model.num_layers = layers
    c.model.max_len = max_len
    c.model.tie_embeddings = tied
    c.model.norm_eps = eps
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = "full"
    c.init.dtype = "bfloat16"
    c.train.batch_size = 8
    c.train.grad_accum = 8
    return c


def get_config(arg: str = "tiny") -> ConfigDict:
    if arg in PAPER_MODELS:
        return paper(arg)
    variants = {"tiny": tiny, "smoke": smoke, "sft": sft}
    if arg not in variants:
        raise ValueError(f"unknown variant {arg!r} of configs/finetune.py; expected one of "
                         f"{sorted(variants) + sorted(PAPER_MODELS)}")
    return variants[arg]()
