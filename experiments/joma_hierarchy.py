"""JoMA's Table 1: do the MLP hidden units of a multi-layer transformer trained on hierarchical data match the
latents of the tree, layer by layer?

    python -m experiments.joma_hierarchy --config configs/joma_hierarchy.py:table --workdir runs/joma_table1
    python -m experiments.joma_hierarchy --config configs/joma_hierarchy.py:steps --workdir runs/joma_table1_steps
    python -m experiments.joma_hierarchy --config configs/joma_hierarchy.py:table_smoke --workdir runs/joma_table1_smoke

Tian, Wang, Zhang, Chen, Du, "JoMA" (ICLR 2024), Table 1 (public code: `ssl/real-dataset/decoder_only_hier.py`).
Each cell of the table is a generator of `lorank.data.synthetic`: the public code's deterministic composition
tree (`composition_tree`: every class is one fixed sequence) or the stochastic hierarchical latent tree
(`latent_tree`: the leaves present are the tokens). `lorank.models.attention.Transformer` (post-LN, no positional
encoding, causal, ReLU MLP) predicts the class from the last position, trained by Adam with weight decay; the
runs of cells whose tensors have the same shapes (same generator and class count) are one jitted program
vmapped over cells x seeds, a `lax.scan` over `train.every` steps per call. Every `train.every` steps (and at
initialization) each run is measured on `metric.num_samples` fresh samples: for block s, the ReLU outputs of its
MLP (`layers_s/mlp/up`, read with flax's `capture_intermediates`) maxed over positions; per latent of level s
(level 0: the one right above the tokens) the best Pearson correlation of its indicator with a hidden unit
(`best_match`); the layer's score is the mean over the level's latents (`layer_scores`).

It writes joma_hierarchy.json and its figure (joma_table1[_steps].png) to the workdir (each group's runs are kept
in groups/, so a rerun with the same workdir skips the groups done); with `write_docs`, the variant's block of
docs/joma.md (`joma_table1` for `table`, `joma_table1_steps` for `steps`) and
docs/figures/joma_table1[_steps].png are rewritten.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import benchlib, cli
from lorank import checks
from lorank.analysis import plots
from lorank.data import synthetic
from lorank.models import attention as attention_model
from lorank.train import loop

DOC = benchlib.REPO_ROOT / "docs" / "joma.md"
BLOCK = "joma_table1"
RESULTS_FILE = "joma_hierarchy.json"
GROUPS_DIR = "groups"
SECTIONS = ("composition", "latent", "model", "train", "optim", "metric")  # what a workdir's runs depend on
SEEDS = ("seed", "num_seeds")  # and these top-level fields
PAPER_RANGES = ("0.94-1.00", "0.55-0.81")  # JoMA's Table 1: the range over its cells at level 0 and level 1
CONSTANT_RTOL = 1e-6  # a column whose spread is below this fraction of its largest |value| counts as constant


# ----------------------------------------------------------------------------- the metric


def correlation_matrix(latents: jax.Array, hidden: jax.Array, *, centered: bool = True) -> jax.Array:
    """[A, K] correlation of every latent indicator (column of `latents` [N, A]) with every hidden unit (column of
    `hidden` [N, K]) over the N samples (float32).

    centered: Pearson correlation; False: the cosine of the raw columns (the public code's "non-zero mean" one).
    A column that is constant over the samples (an indicator never or always on, a dead unit; in the centered case
    also any unit constant up to `CONSTANT_RTOL`) has no correlation: its entries are 0, as the public code's
    `compute_corr` gives them (it adds 1e-9 to the norms). Columns are shifted by their first row before the mean
    is taken, so an exactly constant column centers to exact zeros in float32. Entries are clipped to [-1, 1].
    """
    x, y = (jnp.asarray(a, jnp.float32) for a in (latents, hidden))
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"latents [N, A] and hidden [N, K] must share N, got {x.shape} and {y.shape}")

    def normalize(a):
        if centered:
            scale = jnp.max(jnp.abs(a), axis=0)
            a = a - a[:1]
            a = a - a.mean(axis=0)
            norm = jnp.linalg.norm(a, axis=0)
            keep = norm > CONSTANT_RTOL * scale * jnp.sqrt(a.shape[0])
        else:
            norm = jnp.linalg.norm(a, axis=0)
            keep = norm > 0
        return jnp.where(keep, a / jnp.where(keep, norm, 1.0), 0.0)

    # Cauchy-Schwarz bounds the exact value; float32 sums over N samples can step past it.
    return jnp.clip(normalize(x).T @ normalize(y), -1.0, 1.0)


def best_match(latents: jax.Array, hidden: jax.Array, *, centered: bool = True) -> tuple[jax.Array, jax.Array]:
    """(best correlation of each latent with any hidden unit [A], that unit's index [A])."""
    corr = correlation_matrix(latents, hidden, centered=centered)
    return corr.max(axis=1), corr.argmax(axis=1)


def varying(latents: jax.Array) -> jax.Array:
    """[A] bool: the latent's indicator takes both values over the samples."""
    x = jnp.asarray(latents, bool)
    return x.any(axis=0) & ~x.all(axis=0)


def layer_scores(latents: jax.Array, hidden: jax.Array, *, centered: bool = True) -> dict[str, jax.Array]:
    """A layer's score: {"all": the mean over the level's latents of their best correlation (a latent that never
    varies counts 0, as in the public code), "varying": the mean over the latents that vary (NaN if none),
    "num_varying": how many vary}."""
    best, _ = best_match(latents, hidden, centered=centered)
    on = varying(latents)
    count = on.sum()
    return {"all": best.mean(), "varying": jnp.where(count > 0, jnp.where(on, best, 0.0).sum() / count, jnp.nan),
            "num_varying": count}


_layer_scores = jax.jit(layer_scores, static_argnames=("centered",))


# ----------------------------------------------------------------------------- model pieces


def build_model(config, vocab_size: int, num_tokens: int, seq_len: int) -> attention_model.Transformer:
    """The table's transformer: post-LN blocks, no positional encoding, causal, MLP width mlp_multi x num_tokens."""
    m = config.model
    checks.integer("model.mlp_multi", m.mlp_multi, minimum=1)
    hidden = m.mlp_multi * num_tokens
    return attention_model.Transformer(attention_model.TransformerConfig(
        vocab_size=vocab_size, width=m.width, num_layers=m.num_layers, num_heads=m.num_heads,
        mlp_ratio=hidden / m.width, activation=m.activation, norm="post", positional="none", causal=True,
        max_len=seq_len, dropout=0.0, embed_scale=m.embed_scale, init=m.init, init_std=m.init_std,
        layer_norm_eps=m.layer_norm_eps))


def _is_mlp_up(module: nn.Module, method_name: str) -> bool:
    return module.name == "up" and method_name == "__call__"


def mlp_hidden(model: attention_model.Transformer, params: Any, tokens: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """(logits float32 [B, T, V], each block's MLP hidden units act(up(x)) [B, T, F], lowest block first)."""
    logits, state = model.apply({"params": nn.unbox(params)}, tokens, capture_intermediates=_is_mlp_up,
                                mutable=["intermediates"])
    act = attention_model.ACTIVATIONS[model.cfg.activation]
    inter = state["intermediates"]
    return logits, [act(inter[f"layers_{i}"]["mlp"]["up"]["__call__"][0]) for i in range(model.cfg.num_layers)]


def pooled_hidden(model: attention_model.Transformer, params: Any, tokens: jax.Array, num_classes: int
                  ) -> tuple[jax.Array, jax.Array]:
    """(class logits at the last position [B, C], hidden units maxed over positions [num_layers, B, F])."""
    logits, hidden = mlp_hidden(model, params, tokens)
    return logits[:, -1, :num_classes], jnp.stack([h.max(axis=1) for h in hidden])


def class_loss(model: attention_model.Transformer, num_classes: int) -> Callable:
    """(params, tokens [B, T], labels [B], weights [B]) -> sum_b weights_b CE(logits of the last position, label_b),
    the logits being the first `num_classes` outputs of the head."""

    def loss_fn(params, tokens, labels, weights):
        logits = model.apply({"params": params}, tokens)[:, -1, :num_classes]
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
        return jnp.sum(weights * ce)

    return loss_fn


def optimizer(o) -> optax.GradientTransformation:
    """Adam at a constant `lr` with weight decay on every parameter: added to the gradient before Adam
    (torch.optim.Adam's weight_decay, the public code) or, with `decoupled`, AdamW's."""
    lr = checks.number("optim.lr", o.lr, low=0.0, low_open=True)
    wd = checks.number("optim.weight_decay", o.weight_decay, low=0.0)
    if o.decoupled:
        return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=wd)
    return optax.chain(optax.add_decayed_weights(wd), optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
                       optax.scale(-lr))


# ----------------------------------------------------------------------------- the generators


def class_sequences(tree: synthetic.CompositionTree) -> np.ndarray:
    """int32 [C, L]: the one sequence of each class of a composition tree (as `sample_composition_tree` draws it)."""
    active = np.eye(tree.num_classes, dtype=bool)
    for s in range(len(tree.children), 0, -1):
        active = (active.astype(np.float32) @ tree.membership(s).astype(np.float32)) > 0
    present = jnp.asarray(np.pad(active, ((0, 0), (0, 1))))  # the padding token is never present
    seqs = synthetic.tokens_to_sequences(present, max(tree.seq_len, tree.num_tokens), tree.num_tokens - 1)
    return np.asarray(seqs)[:, -tree.seq_len:]


def composition_batch(class_tokens: jax.Array, key: jax.Array, batch_size: int, dedupe: bool
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A batch of `batch_size` uniform classes of a composition tree: (tokens, labels, weights summing to one).

    With `dedupe`, each class's fixed sequence is given once, weighted by its count in the batch: the loss and its
    gradient are those of the batch of `batch_size` sequences, for C sequences of compute.
    """
    c = class_tokens.shape[0]
    labels = jax.random.randint(key, (batch_size,), 0, c)
    if dedupe:
        weights = jnp.zeros(c, jnp.float32).at[labels].add(1.0 / batch_size)
        return class_tokens, jnp.arange(c, dtype=jnp.int32), weights
    return class_tokens[labels], labels.astype(jnp.int32), jnp.full(batch_size, 1.0 / batch_size, jnp.float32)


def latent_batch(root_codes: jax.Array, key: jax.Array, batch_size: int, tree: synthetic.LatentTree, seq_len: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`batch_size` draws of `tree` with its root codes replaced by `root_codes` (a run's, possibly traced):
    (tokens [B, seq_len] of the leaves present, pre-padded with id num_leaves; labels; weights 1/B)."""
    labels, levels = synthetic.sample_latent_tree(key, tree._replace(root_codes=root_codes), batch_size)
    tokens = synthetic.tokens_to_sequences(levels[-1], seq_len, tree.num_leaves)
    return tokens, labels, jnp.full(batch_size, 1.0 / batch_size, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One cell of the table: a generator and its sizes."""

    generator: str  # "composition" or "latent"
    num_classes: int
    levels: tuple[int, ...] = ()  # composition: latents per level below the classes
    combinations: tuple[int, ...] = ()  # composition: subset size per level, classes included

    @property
    def name(self) -> str:
        if self.generator == "composition":
            return f"composition C={self.num_classes} levels={list(self.levels)} comb={self.combinations[0]}"
        return f"latent D={self.num_classes}"

    @property
    def group(self) -> str:
        """Cells of one group have tensors of the same shapes and train as one program."""
        return f"{self.generator}_C{self.num_classes}"


@dataclasses.dataclass
class Group:
    """The runs of the cells of one group (cell-major, then seed): what the program needs and what is measured."""

    name: str
    cells: list[Cell]
    seeds: list[int]
    model: attention_model.Transformer
    batch_fn: Callable  # (run data, key) -> (tokens, labels, weights)
    run_data: jax.Array  # [R, ...]: class sequences (composition) or root codes (latent)
    eval_tokens: np.ndarray  # [R, n, L] the sequences the model is applied to
    eval_index: np.ndarray  # [R, N] rows of eval_tokens that make the N samples (composition: the labels)
    eval_labels: np.ndarray  # [R, N]
    eval_latents: list[list[np.ndarray]]  # [R][level] bool [N, A_level], level 0 right above the tokens
    reference: list[list[float]]  # [R][binary level] latent tree: `descendant_count_score`; composition: empty


def table_cells(config) -> tuple[list[Cell], list[str]]:
    """(the cells of the config, lowest first in the table's order; the reasons cells were left out)."""
    comp, cells, skipped = config.composition, [], []
    for c in comp.num_classes:
        for levels in comp.levels:
            for combos in comp.combinations:
                levels, combos = tuple(int(v) for v in levels), tuple(int(v) for v in combos)
                if len(combos) != len(levels) + 1:
                    raise ValueError(f"composition.combinations entry {combos} needs one size per level of "
                                     f"{levels} and one for the classes")
                try:
                    synthetic.composition_tree(comp.num_tokens, comp.seq_len, list(levels) + [c], list(combos),
                                               seed=config.seed)
                except ValueError as err:
                    skipped.append(f"composition C={c} levels={list(levels)} combinations={list(combos)}: {err}")
                    continue
                cells.append(Cell("composition", int(c), levels, combos))
    cells += [Cell("latent", int(d)) for d in config.latent.num_classes]
    return cells, skipped


def _latent_tree(config, num_classes: int, seed: int) -> synthetic.LatentTree:
    t = config.latent
    return synthetic.latent_tree(num_classes, t.height, rho=t.rho or None, branching=t.branching, seed=seed)


def build_group(config, cells: list[Cell]) -> Group:
    """Trees, training data and evaluation samples of every run of `cells` (one group)."""
    n = config.metric.num_samples
    seeds = [config.seed + i for i in range(config.num_seeds)]
    first, data, tokens, index, labels, latents, reference = cells[0], [], [], [], [], [], []
    if first.generator == "composition":
        comp = config.composition
        model = build_model(config, max(comp.num_tokens, first.num_classes), comp.num_tokens, comp.seq_len)
        batch_fn = lambda run, key: composition_batch(run, key, config.train.batch_size, config.train.dedupe)
        for cell in cells:
            for seed in seeds:
                tree = synthetic.composition_tree(comp.num_tokens, comp.seq_len, list(cell.levels) + [cell.num_classes],
                                                  list(cell.combinations), seed=seed)
                seqs = class_sequences(tree)
                _, y, active = synthetic.sample_composition_tree(_eval_key(seed), tree, n)
                data.append(seqs)
                tokens.append(seqs)
                index.append(np.asarray(y))
                labels.append(np.asarray(y))
                latents.append([np.asarray(a) for a in active])
    else:
        t = config.latent
        tree0 = _latent_tree(config, first.num_classes, seeds[0])
        if t.seq_len < tree0.num_leaves:
            raise ValueError(f"latent.seq_len={t.seq_len} cannot hold the {tree0.num_leaves} leaves of the tree")
        model = build_model(config, max(tree0.num_leaves + 1, first.num_classes), tree0.num_leaves + 1, t.seq_len)
        batch_fn = lambda run, key: latent_batch(run, key, config.train.batch_size, tree0, t.seq_len)
        for _ in cells:
            for seed in seeds:
                tree = _latent_tree(config, first.num_classes, seed)
                y, levels = synthetic.sample_latent_tree(_eval_key(seed), tree, n)
                data.append(tree.root_codes.astype(bool))
                tokens.append(np.asarray(synthetic.tokens_to_sequences(levels[-1], t.seq_len, tree.num_leaves)))
                index.append(np.arange(n))
                labels.append(np.asarray(y))
                onehot = np.eye(first.num_classes, dtype=bool)[np.asarray(y)]
                binary = [np.asarray(levels[s]) for s in range(len(levels) - 2, -1, -1)]
                latents.append(binary + [onehot])
                reference.append([descendant_count_score(b, np.asarray(levels[-1])) for b in binary])
    return Group(first.group, cells, seeds, model, batch_fn, jnp.asarray(np.stack(data)), np.stack(tokens),
                 np.stack(index), np.stack(labels), latents, reference)


def descendant_count_score(latents: np.ndarray, leaves: np.ndarray) -> float:
    """A reference for a latent tree's level: the mean over its latents (columns of `latents` [N, A]) of the
    Pearson correlation of each with the number of its descendant leaves present (`leaves` [N, A * k], node a's
    leaves are the a-th block of k). A hidden unit that counted them would score this; the best function of the
    sequence scores a little more (the latent's posterior also uses the rest of the tree)."""
    n, a = latents.shape
    counts = leaves.reshape(n, a, -1).sum(-1)
    return float(np.mean(np.diag(np.asarray(correlation_matrix(latents, counts)))))


def _eval_key(seed: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), 2)


def _run_keys(group: Group) -> tuple[jax.Array, jax.Array]:
    """(init keys [R], data keys [R]): run r of seed s uses fold_in(key(s), 0) and fold_in(key(s), 1)."""
    seeds = jnp.asarray([s for _ in group.cells for s in group.seeds])
    base = jax.vmap(jax.random.key)(seeds)
    return jax.vmap(lambda k: jax.random.fold_in(k, 0))(base), jax.vmap(lambda k: jax.random.fold_in(k, 1))(base)


# ----------------------------------------------------------------------------- the program


@dataclasses.dataclass(frozen=True)
class Program:
    """The jitted pieces of a group; every array has a leading run axis R.

    init: keys [R] -> (params, opt_state).
    train: (params, opt_state, run data [R, ...], data keys [R], first step []) -> (params, opt_state,
      losses [R, every]); the batch of step t of a run is batch_fn(its data, fold_in(its data key, t)).
    evaluate: (params, tokens [R, n, L]) -> (class logits [R, n, C], pooled hidden units [R, layers, n, F]),
      one run at a time (lax.map).
    """

    init: Callable
    train: Callable
    evaluate: Callable


def make_program(group: Group, tx: optax.GradientTransformation, every: int) -> Program:
    model, num_classes = group.model, group.cells[0].num_classes
    loss_fn = class_loss(model, num_classes)
    seq_len = group.eval_tokens.shape[-1]

    def init_one(key):
        params = nn.unbox(attention_model.init_params(model, key, seq_len))
        return params, tx.init(params)

    def train_one(params, opt_state, run, key, first_step):
        def body(carry, step):
            params, opt_state = carry
            tokens, labels, weights = group.batch_fn(run, jax.random.fold_in(key, step))
            loss, grads = jax.value_and_grad(loss_fn)(params, tokens, labels, weights)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), first_step + jnp.arange(every))
        return params, opt_state, losses

    def evaluate(params, tokens):
        return jax.lax.map(lambda pt: pooled_hidden(model, pt[0], pt[1], num_classes), (params, tokens))

    return Program(init=jax.jit(jax.vmap(init_one)),
                   train=jax.jit(jax.vmap(train_one, in_axes=(0, 0, 0, 0, None)), donate_argnums=(0, 1)),
                   evaluate=jax.jit(evaluate))


def measure(group: Group, program: Program, params: Any, centered: bool) -> list[dict[str, Any]]:
    """Per run: {"all": [layers], "varying": [layers], "num_varying": [layers], "accuracy", "eval_loss"}; layer s
    against latent level s (as many as both have)."""
    logits, pooled = jax.device_get(program.evaluate(params, jnp.asarray(group.eval_tokens)))
    out = []
    for r in range(len(group.eval_latents)):
        idx, y = group.eval_index[r], group.eval_labels[r]
        lg = np.asarray(logits[r], np.float64)[idx]
        logp = lg - lg.max(1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
        rec = {"all": [], "varying": [], "num_varying": [], "accuracy": float(np.mean(lg.argmax(1) == y)),
               "eval_loss": float(-np.mean(logp[np.arange(len(y)), y]))}
        for s in range(min(pooled.shape[1], len(group.eval_latents[r]))):
            sc = jax.device_get(_layer_scores(group.eval_latents[r][s], pooled[r, s][idx], centered=centered))
            rec["all"].append(float(sc["all"]))
            rec["varying"].append(float(sc["varying"]))
            rec["num_varying"].append(int(sc["num_varying"]))
        out.append(rec)
    return out


def train_group(config, group: Group, log=print) -> dict[str, Any]:
    """Trains every run of `group`; returns {"steps": [E], "records": [E][R] of `measure`, "train_loss": [E][R]
    (mean over the chunk ending there; NaN at step 0), "seconds"}."""
    steps, every = config.train.steps, config.train.every
    program = make_program(group, optimizer(config.optim), every)
    init_keys, data_keys = _run_keys(group)
    start = time.perf_counter()
    params, opt_state = program.init(init_keys)
    runs = len(group.eval_latents)
    result = {"steps": [0], "records": [measure(group, program, params, config.metric.centered)],
              "train_loss": [[float("nan")] * runs]}
    for first in range(0, steps, every):
        params, opt_state, losses = program.train(params, opt_state, group.run_data, data_keys, jnp.int32(first))
        losses = np.asarray(jax.device_get(losses), np.float64)
        result["steps"].append(first + every)
        result["train_loss"].append(losses.mean(1).tolist())
        result["records"].append(measure(group, program, params, config.metric.centered))
        elapsed = time.perf_counter() - start
        done = (first + every) / steps
        level0 = np.mean([r["all"][0] for r in result["records"][-1]])
        log(f"{group.name}: step {first + every}/{steps}, train loss {losses[:, -1].mean():.4f}, level-0 score "
            f"{level0:.3f} (mean of {runs} runs), {elapsed:.0f} s, ETA {elapsed / done - elapsed:.0f} s")
    result["seconds"] = time.perf_counter() - start
    result["nonfinite_runs"] = int((~np.isfinite(np.asarray(result["train_loss"][1:]))).any(0).sum())
    return result


# ----------------------------------------------------------------------------- the table


def _mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and standard deviation over seeds (ddof = 1, as the public table script's pandas std)."""
    v = np.asarray(values, np.float64)
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}


def summarize(cells: list[Cell], groups: dict[str, dict], num_seeds: int) -> dict[str, Any]:
    """Per cell: each level's score (all latents and varying ones), at initialization and at the end, accuracy and
    losses, each as mean, std and the per-seed values; and the mean curve of every level over the steps."""
    out = {}
    for cell in cells:
        g = groups[cell.group]
        k = [c["name"] for c in g["cells"]].index(cell.name)
        rows = slice(k * num_seeds, (k + 1) * num_seeds)
        first, last = g["records"][0][rows], g["records"][-1][rows]
        layers = len(last[0]["all"])
        entry = {"generator": cell.generator, "num_classes": cell.num_classes, "levels": list(cell.levels),
                 "combinations": list(cell.combinations), "steps": g["steps"],
                 "score": [_mean_std([r["all"][s] for r in last]) for s in range(layers)],
                 "score_varying": [_mean_std([r["varying"][s] for r in last]) for s in range(layers)],
                 "num_varying": [[r["num_varying"][s] for r in last] for s in range(layers)],
                 "num_latents": g["num_latents"][k * num_seeds][:layers],
                 "init_score": [_mean_std([r["all"][s] for r in first]) for s in range(layers)],
                 "init_score_varying": [_mean_std([r["varying"][s] for r in first]) for s in range(layers)],
                 "accuracy": _mean_std([r["accuracy"] for r in last]),
                 "eval_loss": _mean_std([r["eval_loss"] for r in last]),
                 "init_eval_loss": _mean_std([r["eval_loss"] for r in first]),
                 "final_train_loss": _mean_std(g["train_loss"][-1][rows]),
                 "reference": [_mean_std([ref[s] for ref in g["reference"][rows]])
                               for s in range(len(g["reference"][0]))] if g["reference"] else [],
                 "curves": [[[r["all"][s] for r in rec[rows]] for rec in g["records"]] for s in range(layers)]}
        out[cell.name] = entry
    return out


def _pm(d: dict) -> str:
    return f"{d['mean']:.2f} ± {d['std']:.2f}"


def docs_body(summary: dict, config, skipped: list[str], seconds: float) -> str:
    """Markdown: the table (mean ± std over seeds) and a second one with the rest of what was measured."""
    levels = config.metric.levels
    rows, extra = [], []
    for e in summary["cells"].values():
        if e["generator"] == "composition":
            what = ["composition", e["num_classes"], str(e["levels"] + ["C"]).replace("'", ""), e["combinations"][0]]
        else:
            t = config.latent
            what = ["latent", e["num_classes"], f"{t.branching}^{t.height} leaves", "-"]
        rows.append(what + [_pm(e[key][s]) for key in ("score", "score_varying", "init_score", "init_score_varying")
                            for s in range(levels)])
        refs = e["reference"]
        extra.append(what + [f"{min(e['num_varying'][s])}-{max(e['num_varying'][s])} of {e['num_latents'][s]}"
                             for s in range(levels)]
                     + [_pm(refs[s]) if s < len(refs) else "-" for s in range(levels)]
                     + [_pm(e["score"][-1]), _pm(e["accuracy"]),
                        f"{e['init_eval_loss']['mean']:.3f} -> {e['eval_loss']['mean']:.3f}"])
    head = ["generator", "classes", "levels", "comb."]
    table = benchlib.markdown_table(head + [f"level {s}{what}" for what in ("", ", varying", " at init",
                                                                          " at init, varying")
                                            for s in range(levels)], rows)
    table2 = benchlib.markdown_table(head + [f"level {s}: latents that vary" for s in range(levels)]
                                     + [f"level {s}, leaf-count reference" for s in range(levels)]
                                     + ["top block vs classes", "accuracy", "eval loss init -> end"], extra)
    m, t, o = config.model, config.train, config.optim
    corr = "Pearson correlation" if config.metric.centered else "uncentered cosine"
    text = (f"{config.num_seeds} seeds per cell, mean ± std (ddof 1). Model: {m.num_layers} post-LN blocks, width "
            f"{m.width}, {m.num_heads} head, ReLU MLP of width {m.mlp_multi}M, no positional encoding, causal; "
            f"{'AdamW' if o.decoupled else 'Adam + L2'} lr {o.lr:g}, weight decay {o.weight_decay:g}, batch "
            f"{t.batch_size}, {t.steps} steps. Score of level s: {corr} of each latent's indicator with each hidden "
            f"unit of block s (max over positions) on {config.metric.num_samples} fresh samples, best unit per "
            f"latent, mean over the level's latents (a latent that never varies counts 0); \"varying\": the mean "
            f"over the latents that vary in the samples only; \"at init\": the same scores of the untrained "
            f"model.\n\n{table}\n\n{comparison(summary)}\n\n"
            f"The same runs: how many latents vary in the samples (min-max over seeds); for the latent tree, the "
            f"score a unit counting each latent's descendant leaves present would get (a reference: the "
            f"composition tree's latents are functions of the class, so any varying one can be matched exactly); "
            f"the top block against the classes (one-hot labels); the "
            f"classification accuracy on the samples and the held-out loss at initialization and at the end."
            f"\n\n{table2}\n\nThe score (mean over seeds; level 0 / level 1) against the Adam step:\n\n"
            f"{curve_table(summary, levels)}\n\n{seconds:.0f} s of training and measurement.")
    if skipped:
        text += "\n\nCells left out: " + "; ".join(skipped) + "."
    return text


def comparison(summary: dict) -> str:
    """A sentence: the range over the composition cells of each level's mean score, against the paper's."""
    comp = [e for e in summary["cells"].values() if e["generator"] == "composition"]
    if not comp:
        return ""

    def span(key, s):
        means = [e[key][s]["mean"] for e in comp]
        return f"{min(means):.2f}-{max(means):.2f}" if len(comp) > 1 else f"{means[0]:.2f}"

    parts = [f"level {s}: {span('score', s)} (varying latents {span('score_varying', s)}; untrained "
             f"{span('init_score', s)}, varying {span('init_score_varying', s)})"
             for s in range(min(2, len(comp[0]["score"])))]
    lead = (f"Over the {len(comp)} composition cells the mean scores range " if len(comp) > 1
            else "The composition cell's mean scores: ")
    return (lead + "; ".join(parts)
            + f". The paper reports {PAPER_RANGES[0]} at level 0 and {PAPER_RANGES[1]} at level 1.")


def curve_table(summary: dict, levels: int) -> str:
    """Markdown: one row per cell, one column per measured step, "level 0 / level 1 / ..." means over seeds."""
    cells = summary["cells"]
    steps = next(iter(cells.values()))["steps"]
    rows = [[name] + [" / ".join(f"{np.mean(e['curves'][s][k]):.2f}" for s in range(levels))
                      for k in range(len(steps))] for name, e in cells.items()]
    return benchlib.markdown_table(["cell"] + [f"step {t}" for t in steps], rows)


def draw(summary: dict, levels: int, path: pathlib.Path) -> None:
    """One panel per level: each cell's score against the step (median over seeds, min-max shaded)."""
    fig, axes = plots.figure(1, levels, panel_size=(4.4, 3.6))
    for s, ax in enumerate(axes):
        for name, e in summary["cells"].items():
            values = np.asarray(e["curves"][s], np.float64).T  # [seeds, E]
            plots.plot_band(ax, np.asarray(e["steps"]), values, label=name if s == 0 else None)
        ax.set(xlabel="Adam step", ylabel=f"level {s} score", title=f"block {s} vs latent level {s}")
        ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside right center")
    plots.save(fig, path, dpi=90)


def check_config(config) -> None:
    """Refuses a config that cannot run, before any compute.

    Raises:
      ValueError: no cell, steps not a multiple of train.every, fewer than 2 seeds or samples, more table levels
        than blocks, or a latent tree whose levels cannot be matched with the blocks.
    """
    checks.integer("num_seeds", config.num_seeds, minimum=1)
    checks.integer("train.steps", config.train.steps, minimum=1)
    checks.integer("train.every", config.train.every, minimum=1)
    checks.integer("train.batch_size", config.train.batch_size, minimum=1)
    checks.integer("metric.num_samples", config.metric.num_samples, minimum=2)
    checks.integer("model.num_layers", config.model.num_layers, minimum=1)
    checks.integer("metric.levels", config.metric.levels, minimum=1, maximum=config.model.num_layers)
    if config.train.steps % config.train.every:
        raise ValueError(f"train.steps={config.train.steps} must be a multiple of train.every={config.train.every}")
    if config.latent.num_classes:
        checks.integer("latent.height", config.latent.height, minimum=config.metric.levels)
    if not config.composition.num_classes and not config.latent.num_classes:
        raise ValueError("no cell: composition.num_classes and latent.num_classes are both empty")


def block_name(variant: str) -> str:
    """The docs block (and figure stem) of a variant: joma_table1 for table, joma_table1_NAME otherwise."""
    name = variant.removesuffix("_smoke")
    return BLOCK if name == "table" else f"{BLOCK}_{name}"


def write_docs(config, body: str, figure: pathlib.Path) -> None:
    """The variant's block of docs/joma.md (under its command and machine) and its figure."""
    name = block_name(config.variant)
    command = (f"python -m experiments.joma_hierarchy --config configs/joma_hierarchy.py:{config.variant} "
               f"--workdir runs/{name}")
    benchlib.publish_figure(DOC, name, body, command, figure)


def check_workdir(config, workdir: str) -> None:
    """Refuses a workdir whose saved runs used other seeds or another config of `SECTIONS`; then saves this one's.

    Raises:
      ValueError: naming the field or section that differs.
    """
    path = pathlib.Path(workdir, loop.CONFIG_FILE)
    if path.exists():
        saved = json.loads(path.read_text())
        for field in SEEDS:
            if saved.get(field) != config[field]:
                raise ValueError(f"{workdir} holds runs with {field}={saved.get(field)}, not {config[field]}; "
                                 "use a new --workdir")
    loop.check_workdir_config(config, workdir, SECTIONS)


def run(config, workdir: str, log=print) -> dict[str, Any]:
    """Trains and measures every cell of the table; returns {"cells": `summarize`, "skipped", "seconds"}."""
    check_config(config)
    cells, skipped = table_cells(config)
    if not cells:
        raise ValueError(f"no valid cell: {skipped}")
    check_workdir(config, workdir)
    directory = pathlib.Path(workdir, GROUPS_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    groups: dict[str, dict] = {}
    for name in dict.fromkeys(c.group for c in cells):
        members = [c for c in cells if c.group == name]
        path = directory / f"{name}.json"
        if path.exists():
            groups[name] = json.loads(path.read_text())
            log(f"{name}: kept from {path}")
            continue
        group = build_group(config, members)
        log(f"{name}: {len(members)} cell(s) x {config.num_seeds} seeds, vocabulary {group.model.cfg.vocab_size}, "
            f"MLP width {group.model.cfg.mlp_hidden}")
        result = train_group(config, group, log=log)
        result["cells"] = [{"name": c.name} for c in members]
        result["reference"] = group.reference
        result["num_latents"] = [[int(x.shape[1]) for x in lat] for lat in group.eval_latents]
        path.write_text(json.dumps(result) + "\n")
        groups[name] = result
    seconds = time.perf_counter() - start
    summary = {"cells": summarize(cells, groups, config.num_seeds), "skipped": skipped, "seconds": seconds,
               "variant": config.variant}
    pathlib.Path(workdir, RESULTS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    figure = pathlib.Path(workdir, f"{block_name(config.variant)}.png")
    draw(summary, config.metric.levels, figure)
    body = docs_body(summary, config, skipped, sum(g["seconds"] for g in groups.values()))
    log(body)
    if config.write_docs:
        write_docs(config, body, figure)
    return summary


if __name__ == "__main__":
    cli.launch(run, "configs/joma_hierarchy.py:table")
