"""JoMA on real text: attention entropy and MLP stable rank over training (experiments.joma_text, docs/joma.md).

    python -m experiments.joma_text --config configs/joma_text.py:layers --workdir runs/joma_text_layers
    python -m experiments.joma_text --config configs/joma_text.py:one_layer_long --workdir runs/joma_text_one_layer_long
    python -m experiments.joma_text --config configs/joma_text.py:layers_smoke --workdir runs/joma_text_layers_smoke

`layers` trains one transformer per depth in `depths` (1 to 5 blocks), each through the
generic loop in its own sub-workdir (depth_L/; checkpoints, resume), with the model of the
paper's public code (`decoder_wiki.py ... use_baseline=true`: post-LayerNorm blocks, 1 head,
MLP as wide as the residual stream, sinusoidal positions, dropout 0.2) and its optimizer
(Adam at lr 1e-4 after global-norm clipping at 0.5), scaled down for a CPU: width 64, 64
byte tokens per sequence of the embedded Tiny Shakespeare. On a fixed held-out batch it
measures every `analysis.every` steps each layer's mean attention entropy and the stable
rank of each layer's MLP kernels, for 3,000 steps per depth (10 to 15 minutes on 2 shared CPU
cores for all five). `one_layer_long` trains the 1-layer model four times longer (12,000 steps), to see
whether a bounce comes later. Each has a `_smoke` twin that runs in seconds.
Other depths: `--config.depths=(5,)`. Other text: `--config.data.corpus=/path/a.txt,/path/b.txt`,
or a prepared tfds dataset: `--config.data.source=tfds --config.data.tfds_name=... --config.data.tfds_data_dir=...`.
"""

from ml_collections import ConfigDict

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {"layers_smoke": "experiments.joma_text", "one_layer_long_smoke": "experiments.joma_text"}
VARIANTS = ("layers", "one_layer_long")


def _base(smoke: bool) -> ConfigDict:
    c = ConfigDict()
    c.depths = (1, 2) if smoke else (1, 2, 3, 4, 5)  # transformer depths, one run through the loop each
    c.write_docs = not smoke  # rewrite this variant's block of docs/joma.md and its figure

    c.model = ConfigDict()
    c.model.vocab_size = 256  # byte-level tokenizer: one token per byte
    c.model.width = 32 if smoke else 64  # residual stream width D (paper: emsize 200)
    c.model.num_heads = 1  # attention heads (paper: nhead 1)
    c.model.mlp_ratio = 1.0  # MLP hidden width / D (paper: d_hid 200 = emsize)
    c.model.activation = "relu"  # MLP nonlinearity: relu (paper) or gelu
    c.model.norm = "post"  # LayerNorm placement: post (paper, PyTorch's default), pre or none
    c.model.positional = "sinusoidal"  # none, learned or sinusoidal (paper: sinusoidal, added to scaled embeddings)
    c.model.causal = True  # causal attention mask (paper: square subsequent mask)
    c.model.max_len = 32 if smoke else 64  # longest sequence the model accepts
    c.model.dropout = 0.2  # dropout on attention probabilities, residual branches and inputs (paper: 0.2)
    c.model.embed_scale = True  # token embeddings times sqrt(D), as the paper's model
    c.model.init = "torch"  # PyTorch's default initializers of the paper's modules, or "normal"
    c.model.init_std = 0.02  # std of init "normal" and of a learned positional table
    c.model.layer_norm_eps = 1e-5  # LayerNorm epsilon (PyTorch's default)

    c.data = ConfigDict()
    c.data.source = "text"  # "text" (data.corpus) or "tfds" (data.tfds_name in data.tfds_data_dir)
    c.data.tokenizer = "byte"  # "byte" or the path of a SentencePiece .model file (paper: words of WikiText-2)
    c.data.corpus = ""  # comma-separated text files; empty: the embedded Tiny Shakespeare
    c.data.val_fraction = 0.1  # last fraction of the corpus held out (entropy and eval loss are measured there)
    c.data.seq_len = 32 if smoke else 64  # tokens per sequence (paper: bptt 35 words)
    c.data.seed = 0  # seed of the per-epoch window offsets and shuffling
    c.data.tfds_name = "wikitext/wikitext-2-raw-v1"  # tfds dataset prepared as array_record (source "tfds")
    c.data.tfds_data_dir = "~/tensorflow_datasets"  # where the tfds dataset is prepared
    c.data.tfds_train_split = "train"  # split trained on
    c.data.tfds_eval_split = "validation"  # split evaluated on (its first sequences)
    c.data.mode = "pack"  # tfds documents: "pack" (concatenated, as the paper's stream) or "pad"

    c.train = ConfigDict()
    c.train.steps = 150 if smoke else 3000  # optimizer steps per depth (paper: 20 epochs of WikiText-2, ~60k)
    c.train.batch_size = 8 if smoke else 20  # sequences per step (paper: 20)
    c.train.grad_accum = 1  # micro-batches per optimizer step
    c.train.log_every = 50 if smoke else 250  # steps between progress lines and metric records
    c.train.eval_every = 50 if smoke else 250  # steps between held-out loss evaluations
    c.train.eval_batches = 2 if smoke else 5  # held-out micro-batches per loss evaluation
    c.train.checkpoint_every = 150 if smoke else 1000  # steps between orbax checkpoints
    c.train.keep_checkpoints = 1  # newest checkpoints kept on disk
    c.train.seed = 1  # parameter initialization and dropout seed (paper: seed=1)
    c.train.on_nonfinite = "stop"  # a non-finite loss or gradient: "stop" the run naming the step, or "skip" it

    c.optim = ConfigDict()
    c.optim.lr = 1e-4  # Adam learning rate, constant (paper: opt.lr=1e-4; its StepLR is never stepped)
    c.optim.b1 = 0.9  # Adam beta1 (PyTorch's default)
    c.optim.b2 = 0.999  # Adam beta2 (PyTorch's default)
    c.optim.eps = 1e-8  # Adam epsilon (PyTorch's default)
    c.optim.clip_norm = 0.5  # global-norm gradient clipping before the Adam step; 0 disables (paper: 0.5)

    c.analysis = ConfigDict()
    c.analysis.every = 25 if smoke else 50  # steps between entropy and stable-rank measurements
    c.analysis.eval_rows = 8 if smoke else 32  # held-out sequences (the first windows) the entropy is measured on
    c.analysis.skip_first = 1  # query rows left out of the mean entropy (row 0 has one key: entropy 0)
    c.analysis.mass = 0.9  # the sparsity measure counts the keys holding this fraction of a row's mass
    c.analysis.snapshot_steps = ()  # steps whose attention maps are saved to depth_L/attention/ (none)
    c.analysis.snapshot_rows = 1  # held-out sequences whose maps are saved at snapshot_steps
    c.analysis.bounce_nats = 0.02  # a rise of at least this much after the minimum counts as a bounce

    c.mesh = ConfigDict()
    c.mesh.data = -1  # data-parallel ways (-1: all devices)
    c.mesh.fsdp = 1  # fully-sharded data-parallel ways
    c.mesh.tensor = 1  # tensor-parallel ways
    return c


def _one_layer_long(c: ConfigDict, smoke: bool) -> None:
    """The 1-layer model only, trained four times longer, measured less often."""
    c.depths = (1,)
    c.train.steps = 300 if smoke else 12000
    c.train.log_every = c.train.eval_every = 100 if smoke else 500
    c.train.checkpoint_every = 300 if smoke else 4000
    c.analysis.every = 50 if smoke else 200


def get_config(arg: str = "layers") -> ConfigDict:
    """`NAME` or `NAME_smoke` for NAME in VARIANTS."""
    smoke = arg.endswith("_smoke")
    name = arg[: -len("_smoke")] if smoke else arg
    if name not in VARIANTS:
        choices = list(VARIANTS) + [f"{v}_smoke" for v in VARIANTS]
        raise ValueError(f"unknown variant {arg!r} of configs/joma_text.py; choose one of {choices}")
    c = _base(smoke)
    c.variant = arg  # this variant's name, for the command written to the docs
    if name == "one_layer_long":
        _one_layer_long(c, smoke)
    return c
