"""JoMA's Table 1: how well each layer's MLP hidden units match the latents of hierarchical data
(experiments.joma_hierarchy, docs/joma.md).

    python -m experiments.joma_hierarchy --config configs/joma_hierarchy.py:table --workdir runs/joma_table1
    python -m experiments.joma_hierarchy --config configs/joma_hierarchy.py:steps --workdir runs/joma_table1_steps
    python -m experiments.joma_hierarchy --config configs/joma_hierarchy.py:table_smoke --workdir runs/joma_table1_smoke

`table` trains every cell of the table, 5 seeds each: the public code's composition tree (M = 100 tokens
including padding, L = 30; classes 10 or 20 x levels [10, 20, classes] or [20, 30, classes] x combinations
[2, 2, 2] or [3, 3, 3]) and the stochastic latent tree (root with 10 or 20 values, branching 3, height 3:
27 leaf tokens plus padding, L = 30). Model: 3 post-LN blocks, one head, no positional encoding, causal,
a ReLU MLP of width 4M, the prediction read from the last position; Adam (lr 1e-4, weight decay 1e-4 added
to the gradient, as torch.optim.Adam), batch 128. The paper's model width is 1024 and it trains 10,000
steps; `table` is sized for a 2-core CPU (width 32, 1,000 steps, about 14 minutes). `steps` trains one cell of
each generator (composition C=10, levels [10, 20], combinations 2; latent D=10) for 3,000 steps, to show how
the score depends on the steps. `table_smoke` runs one cell of each generator, 2 seeds, in seconds.

The public code's variants: `--config.optim.lr=1e-5` (its README's command), `--config.model.width=1024
--config.train.steps=10000` (its model, a GPU run), `--config.optim.decoupled=True` (AdamW instead of
Adam + L2), `--config.metric.centered=False` (its "non-zero mean" cosine instead of Pearson).
"""

from ml_collections import ConfigDict

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {"table_smoke": "experiments.joma_hierarchy"}
VARIANTS = ("table", "steps")


def _base(smoke: bool) -> ConfigDict:
    c = ConfigDict()
    c.write_docs = not smoke  # rewrite the joma_table1 block of docs/joma.md and its figure
    c.seed = 1  # first seed; a cell's runs use seeds seed .. seed + num_seeds - 1 (tree, init and data)
    c.num_seeds = 2 if smoke else 5  # seeds per cell, trained together (vmapped)

    c.composition = ConfigDict()
    c.composition.num_tokens = 100  # M, the vocabulary including the padding token M - 1 (public code: M=100)
    c.composition.seq_len = 30  # L, tokens per sequence, pre-padded (public code: L=30)
    c.composition.num_classes = (10,) if smoke else (10, 20)  # classes, one cell each (paper: 10, 20)
    c.composition.levels = ((10, 20),) if smoke else ((10, 20), (20, 30))  # latents of the levels below the classes
    c.composition.combinations = ((2, 2, 2),) if smoke else ((2, 2, 2), (3, 3, 3))  # subset size per level

    c.latent = ConfigDict()
    c.latent.num_classes = (10,) if smoke else (10, 20)  # D, values of the root (the label), one cell each
    c.latent.height = 3  # levels below the root; the leaves (branching^height of them) are the tokens
    c.latent.branching = 3  # children per node
    c.latent.rho = 0.0  # channel correlation parent -> child; 0: 1 - 1/height (Theorem 5's regime)
    c.latent.seq_len = 30  # L, at least branching^height (every leaf may be present)

    c.model = ConfigDict()
    c.model.width = 16 if smoke else 32  # residual stream width d (paper: 1024)
    c.model.num_layers = 3  # post-LN blocks; block s is matched with latent level s (paper: 3)
    c.model.num_heads = 1  # attention heads (paper: 1)
    c.model.mlp_multi = 4  # MLP hidden width F = mlp_multi x M tokens of the generator (public code: 4M)
    c.model.activation = "relu"  # MLP nonlinearity; the hidden units are its outputs
    c.model.embed_scale = True  # token embeddings times sqrt(d) (the public code's are N(0, 1), unscaled)
    c.model.init = "torch"  # PyTorch's default initializers, or "normal"
    c.model.init_std = 0.02  # std of init "normal"
    c.model.layer_norm_eps = 1e-5  # LayerNorm epsilon (PyTorch's default)

    c.train = ConfigDict()
    c.train.steps = 40 if smoke else 1000  # Adam steps per run (paper: 10,000)
    c.train.batch_size = 128  # sequences per step (paper: 128)
    c.train.dedupe = True  # composition tree: forward each class's (fixed) sequence once, weighted by its count
    c.train.every = 20 if smoke else 250  # steps between score measurements (train.steps must be a multiple)

    c.optim = ConfigDict()
    c.optim.lr = 1e-4  # Adam learning rate, constant (paper and public table script: 1e-4; README: 1e-5)
    c.optim.weight_decay = 1e-4  # weight decay on every parameter (paper: 1e-4)
    c.optim.decoupled = False  # False: added to the gradient (torch.optim.Adam, public code); True: AdamW
    c.optim.b1 = 0.9  # Adam beta1 (PyTorch's default)
    c.optim.b2 = 0.999  # Adam beta2 (PyTorch's default)
    c.optim.eps = 1e-8  # Adam epsilon (PyTorch's default)

    c.metric = ConfigDict()
    c.metric.num_samples = 256 if smoke else 1280  # fresh samples the score is measured on (public code: 1280)
    c.metric.centered = True  # Pearson correlation; False: the public code's uncentered ("non-zero mean") cosine
    c.metric.levels = 2  # latent levels shown in the table (paper: 2, levels 0 and 1)
    return c


def get_config(arg: str = "table") -> ConfigDict:
    """`NAME` or `NAME_smoke` for NAME in VARIANTS."""
    smoke = arg.endswith("_smoke")
    name = arg[: -len("_smoke")] if smoke else arg
    if name not in VARIANTS:
        choices = list(VARIANTS) + [f"{v}_smoke" for v in VARIANTS]
        raise ValueError(f"unknown variant {arg!r} of configs/joma_hierarchy.py; choose one of {choices}")
    c = _base(smoke)
    c.variant = arg  # this variant's name, for the command written to the docs
    if name == "steps":
        c.composition.num_classes, c.latent.num_classes = (10,), (10,)
        c.composition.levels, c.composition.combinations = ((10, 20),), ((2, 2, 2),)
        c.train.steps = 60 if smoke else 3000
        c.train.every = 20 if smoke else 250
    return c
