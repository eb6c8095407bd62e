"""Scan&Snap on real text: attention becomes sparse under SGD (experiments.scan_snap_text, docs/scan_snap.md).

    python -m experiments.scan_snap_text --config configs/scan_snap_text.py:one_layer --workdir runs/scan_snap_text_1
    python -m experiments.scan_snap_text --config configs/scan_snap_text.py:three_layer --workdir runs/scan_snap_text_3
    python -m experiments.scan_snap_text --config configs/scan_snap_text.py:lr_sweep --workdir runs/scan_snap_text_lr

`one_layer` and `three_layer` train the paper's post-LayerNorm transformer (1 head, MLP as
wide as the residual stream, sinusoidal positions, dropout 0.2) on bytes of the embedded
Tiny Shakespeare with SGD at lr 5 and global-norm clipping 0.5, through the generic loop
(checkpoints, resume), measuring the attention entropy of every layer on a fixed
held-out batch and saving the attention maps at `analysis.snapshot_steps`. `lr_sweep`
trains a smaller one-layer model at each of `sweep.lrs` for `sweep.num_seeds` seeds (one
jitted program vmapped over seeds, compiled once for all learning rates) and reports the
final entropy against the learning rate. Each has a `_smoke` twin that runs in seconds.
Other text: `--config.data.corpus=/path/a.txt,/path/b.txt`, or a prepared tfds dataset:
`--config.data.source=tfds --config.data.tfds_name=... --config.data.tfds_data_dir=...`.
"""

from ml_collections import ConfigDict

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {
    "one_layer_smoke": "experiments.scan_snap_text",
    "three_layer_smoke": "experiments.scan_snap_text",
    "lr_sweep_smoke": "experiments.scan_snap_text",
}
VARIANTS = ("one_layer", "three_layer", "lr_sweep")


def _base(smoke: bool) -> ConfigDict:
    c = ConfigDict()
    c.experiment = "train"  # "train": one run through the generic loop; "lr_sweep": seeds x learning rates
    c.write_docs = not smoke  # rewrite this variant's block of docs/scan_snap.md and its figure

    c.model = ConfigDict()
    c.model.vocab_size = 256  # byte-level tokenizer: one token per byte
    c.model.width = 32 if smoke else 128  # residual stream width D (paper: emsize 200)
    c.model.num_layers = 1  # transformer blocks (paper: 1 and 3)
    c.model.num_heads = 1  # attention heads (paper's config: nhead 1)
    c.model.mlp_ratio = 1.0  # MLP hidden width / D (paper: d_hid 200 = emsize)
    c.model.activation = "relu"  # MLP nonlinearity: relu (paper) or gelu
    c.model.norm = "post"  # LayerNorm placement: post (paper, PyTorch's default), pre or none
    c.model.positional = "sinusoidal"  # none, learned or sinusoidal (paper: sinusoidal, added to scaled embeddings)
    c.model.causal = True  # causal attention mask (paper: square subsequent mask)
    c.model.max_len = 32 if smoke else 128  # longest sequence the model accepts
    c.model.dropout = 0.2  # dropout on attention probabilities, residual branches and inputs (paper: 0.2)
    c.model.embed_scale = True  # token embeddings times sqrt(D), as the paper's model
    c.model.init = "torch"  # PyTorch's default initializers of the paper's modules, or "normal"
    c.model.init_std = 0.02  # std of init "normal" and of a learned positional table
    c.model.layer_norm_eps = 1e-5  # LayerNorm epsilon (PyTorch's default)

    c.data = ConfigDict()
    c.data.source = "text"  # "text" (data.corpus) or "tfds" (data.tfds_name in data.tfds_data_dir)
    c.data.tokenizer = "byte"  # "byte" or the path of a SentencePiece .model file
    c.data.corpus = ""  # comma-separated text files; empty: the embedded Tiny Shakespeare
    c.data.val_fraction = 0.1  # last fraction of the corpus held out (entropy and eval loss are measured there)
    c.data.seq_len = 32 if smoke else 128  # tokens per sequence (paper: bptt 35 words)
    c.data.seed = 0  # seed of the per-epoch window offsets and shuffling
    c.data.tfds_name = "wikitext/wikitext-2-raw-v1"  # tfds dataset prepared as array_record (source "tfds")
    c.data.tfds_data_dir = "~/tensorflow_datasets"  # where the tfds dataset is prepared
    c.data.tfds_train_split = "train"  # split trained on
    c.data.tfds_eval_split = "validation"  # split evaluated on (its first sequences)
    c.data.mode = "pack"  # tfds documents: "pack" (concatenated, as the paper's stream) or "pad"

    c.train = ConfigDict()
    c.train.steps = 200 if smoke else 1500  # optimizer steps
    c.train.batch_size = 8 if smoke else 20  # sequences per step (paper: 20)
    c.train.grad_accum = 1  # micro-batches per optimizer step
    c.train.log_every = 50 if smoke else 100  # steps between progress lines and metric records
    c.train.eval_every = 50 if smoke else 100  # steps between held-out loss evaluations
    c.train.eval_batches = 2 if smoke else 10  # held-out micro-batches per loss evaluation
    c.train.checkpoint_every = 100 if smoke else 500  # steps between orbax checkpoints
    c.train.keep_checkpoints = 2  # newest checkpoints kept on disk
    c.train.seed = 0  # parameter initialization and dropout seed
    c.train.on_nonfinite = "stop"  # a non-finite loss or gradient: "stop" the run naming the step, or "skip" it

    c.optim = ConfigDict()
    c.optim.lr = 5.0  # SGD learning rate, constant (paper: 5)
    c.optim.momentum = 0.0  # SGD momentum; 0: plain SGD (paper)
    c.optim.clip_norm = 0.5  # global-norm gradient clipping before the SGD step; 0 disables (paper: 0.5)

    c.analysis = ConfigDict()
    c.analysis.every = 50 if smoke else 100  # steps between attention entropy measurements
    c.analysis.eval_rows = 8 if smoke else 32  # held-out sequences (the first windows) the entropy is measured on
    c.analysis.skip_first = 1  # query rows left out of the mean entropy (row 0 has one key: entropy 0)
    c.analysis.mass = 0.9  # the sparsity measure counts the keys holding this fraction of a row's mass
    c.analysis.snapshot_steps = (0, 50, 100, 200) if smoke else (0, 500, 1000, 1500)  # attention maps saved here
    c.analysis.snapshot_rows = 1  # held-out sequences whose maps are saved (the first one is drawn)

    c.sweep = ConfigDict()
    c.sweep.lrs = (0.5, 1.0, 2.0, 5.0, 10.0)  # learning rates of lr_sweep
    c.sweep.num_seeds = 5  # seeds per learning rate (vmapped); paper: 5
    c.sweep.eval_every = 100  # steps between the sweep's entropy measurements

    c.mesh = ConfigDict()
    c.mesh.data = -1  # data-parallel ways (-1: all devices)
    c.mesh.fsdp = 1  # fully-sharded data-parallel ways
    c.mesh.tensor = 1  # tensor-parallel ways
    return c


def _lr_sweep(c: ConfigDict, smoke: bool) -> None:
    """The sweep's smaller model and shorter runs: 5 learning rates x 5 seeds fit a 2-core CPU in minutes."""
    c.experiment = "lr_sweep"
    c.model.width = 16 if smoke else 64
    c.model.max_len = 16 if smoke else 64
    c.data.seq_len = 16 if smoke else 64
    c.train.steps = 60 if smoke else 1000
    c.sweep.lrs = (1.0, 5.0, 10.0) if smoke else (0.5, 1.0, 2.0, 5.0, 10.0)
    c.sweep.num_seeds = 2 if smoke else 5
    c.sweep.eval_every = 20 if smoke else 100
    c.analysis.snapshot_steps = ()


def get_config(arg: str = "one_layer") -> ConfigDict:
    """`NAME` or `NAME_smoke` for NAME in VARIANTS."""
    smoke = arg.endswith("_smoke")
    name = arg[: -len("_smoke")] if smoke else arg
    if name not in VARIANTS:
        choices = list(VARIANTS) + [f"{v}_smoke" for v in VARIANTS]
        raise ValueError(f"unknown variant {arg!r} of configs/scan_snap_text.py; choose one of {choices}")
    c = _base(smoke)
    c.variant = arg  # this variant's name, for the command written to the docs
    if name == "three_layer":
        c.model.num_layers = 3
    elif name == "lr_sweep":
        _lr_sweep(c, smoke)
    return c
