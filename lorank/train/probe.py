"""Evaluation of a frozen backbone: linear probe, kNN classifier, embedding spectrum.

- `extract_features`: a jitted, batched `apply_fn(images) -> features` over an array of
  images (no augmentation).
- `standardize`: the training features' mean and standard deviation applied to every set.
- `linear_probe`: full-batch multinomial logistic regression (L-BFGS, a fixed number of
  iterations, one jitted program for every fit). The L2 strength is chosen on a
  validation split carved from the training set, the probe is refitted on the whole
  training set at that strength, and the reported number is the refitted probe's test
  accuracy. The test set is never used to choose anything (the public SimCLR/BYOL code
  this replaces reports the best test accuracy over probe epochs, which selects on test).
- `knn_predict` / `knn_accuracy`: cosine similarity of L2-normalized features, the k most
  similar training examples vote with weights exp(similarity / temperature) (InstDisc,
  SimCLR's kNN monitor; k = 200, T = 0.1) or one vote each (`weighted=False`).
- `embedding_spectrum` / `embedding_effective_rank`: singular values and effective rank
  (`lorank.analysis.spectrum.effective_rank`) of the row-normalized, centered embeddings;
  `effective_rank` of a given spectrum.
- `probe_evaluator`: all of it as a `lorank.train.loop.Evaluator` of a training run.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorank import checks
from lorank.analysis import spectrum
from lorank.train import loop
from lorank.train import mesh as mesh_lib

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """`x` padded with copies of its last row to `rows` rows (a fixed batch shape: one compile)."""
    return x if len(x) == rows else np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])


def extract_features(apply_fn: Callable[[jax.Array], jax.Array], images: Any, batch_size: int) -> np.ndarray:
    """Features of `images`, batch by batch through jitted `apply_fn` (the last batch padded).

    Args:
      apply_fn: images [B, ...] -> features [B, D] (e.g. a backbone in eval mode).
      images: host array [N, ...].
      batch_size: images per call.

    Returns:
      float32 NumPy array [N, D].
    """
    checks.integer("batch_size", batch_size, minimum=1)
    images = np.asarray(images)
    if images.ndim < 1 or len(images) == 0:
        raise ValueError(f"images must be a non-empty array [N, ...], got shape {images.shape}")
    fn = jax.jit(apply_fn)
    size = min(batch_size, len(images))
    out = [np.asarray(jax.device_get(fn(_pad_rows(images[a:b], size))))[:b - a]
           for a, b in _batches(len(images), size)]
    return np.concatenate(out).astype(np.float32)


def standardize(train: Any, *others: Any, eps: float = 1e-6) -> tuple[np.ndarray, ...]:
    """(train, *others) standardized by the mean and standard deviation of `train`'s columns
    (a column with std < eps is only centered). All [N_i, D] -> float32 [N_i, D]."""
    train = np.asarray(train, np.float64)
    if train.ndim != 2 or len(train) == 0:
        raise ValueError(f"train features must be [N, D] with N >= 1, got shape {train.shape}")
    mean, std = train.mean(0), train.std(0)
    std = np.where(std < eps, 1.0, std)
    out = [train]
    for i, x in enumerate(others):
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != train.shape[1]:
            raise ValueError(f"features {i + 1} of shape {x.shape} do not match the train features {train.shape}")
        out.append(x)
    return tuple(((x - mean) / std).astype(np.float32) for x in out)


def _fit_logistic(x: jax.Array, y: jax.Array, weights: jax.Array, l2: jax.Array, num_classes: int,
                  steps: int) -> tuple[jax.Array, jax.Array]:
    """(W [D, C], b [C]) minimizing sum_i w_i CE(x_i W + b, y_i) / sum_i w_i + (l2 / 2) ||W||^2
    by `steps` L-BFGS iterations from zero (an iteration that finds a zero gradient changes nothing)."""

    def objective(params):
        w, b = params
        logits = x @ w + b
        ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        return jnp.sum(weights * ce) / jnp.sum(weights) + 0.5 * l2 * jnp.sum(w**2)

    # Armijo backtracking: a much smaller program than the default zoom line search, as good on this convex loss
    opt = optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(max_backtracking_steps=20, store_grad=True))
    value_and_grad = optax.value_and_grad_from_state(objective)
    params = (jnp.zeros((x.shape[1], num_classes), x.dtype), jnp.zeros((num_classes,), x.dtype))

    def body(carry, _):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, new_state = opt.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        new_params = optax.apply_updates(params, updates)
        ok = (optax.tree.norm(grad) > 1e-7) & jnp.isfinite(optax.tree.norm(new_params))
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        return (jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_state, state)), None

    (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
    return params


_FIT = jax.jit(_fit_logistic, static_argnums=(4, 5))


def _accuracy(params, x, y) -> float:
    w, b = (np.asarray(p) for p in jax.device_get(params))
    return float(np.mean(np.argmax(x @ w + b, axis=-1) == np.asarray(y)))


def _check_labelled(name: str, x: Any, y: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} features must be [N, D] with N >= 1, got shape {x.shape}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} labels must be integers [{len(x)}], got {y.dtype} {y.shape}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"{name} labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    return x, y.astype(np.int32)


def linear_probe(train_x: Any, train_y: Any, test_x: Any, test_y: Any, *, num_classes: int,
                 val_fraction: float = 0.1, l2_grid: Sequence[float] = L2_GRID, steps: int = 300,
                 seed: int = 0) -> dict[str, Any]:
    """Multinomial logistic regression on frozen features, its L2 strength chosen on validation.

    A random `val_fraction` of the training rows (seeded by `seed`) is held out; for every
    l2 in `l2_grid` a probe is fitted on the rest (features standardized by the rest's
    statistics) and scored on the held-out rows; the l2 with the best validation accuracy
    (the first in grid order among ties) is kept; the probe is refitted at that l2 on all
    training rows (standardized by their statistics) and scored on the test set.

    Args:
      train_x, test_x: features [N, D], [M, D].
      train_y, test_y: int labels [N], [M] in [0, num_classes).
      num_classes: number of classes.
      val_fraction: fraction of the training rows held out for choosing l2, in (0, 1).
      l2_grid: L2 strengths (coefficient l2 / 2 on ||W||^2, the bias unpenalized).
      steps: L-BFGS iterations per fit.
      seed: seed of the validation split.

    Returns:
      dict with test_acc (the refitted probe's test accuracy), val_acc (the chosen l2's
      validation accuracy), best_l2, train_acc (of the refitted probe), val_accs (one per l2).
    """
    checks.integer("num_classes", num_classes, minimum=2)
    train_x, train_y = _check_labelled("train", train_x, train_y, num_classes)
    test_x, test_y = _check_labelled("test", test_x, test_y, num_classes)
    if test_x.shape[1] != train_x.shape[1]:
        raise ValueError(f"test features {test_x.shape} do not match the train features {train_x.shape}")
    checks.number("val_fraction", val_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    checks.integer("steps", steps, minimum=1)
    checks.integer("seed", seed, minimum=0)
    grid = [checks.number(f"l2_grid[{i}]", v, low=0.0) for i, v in enumerate(l2_grid)]
    if not grid:
        raise ValueError("l2_grid must hold at least one L2 strength, got ()")
    n = len(train_x)
    n_val = int(round(val_fraction * n))
    if not 1 <= n_val < n:
        raise ValueError(f"val_fraction={val_fraction} of {n} training rows leaves no validation or no fitting rows")

    perm = np.random.default_rng(seed).permutation(n)
    val_rows, fit_rows = perm[:n_val], perm[n_val:]
    fit_mask = np.zeros(n, np.float32)
    fit_mask[fit_rows] = 1.0
    # standardized by the fitting rows' statistics only, so the held-out rows stay unseen
    _, x_sel = standardize(train_x[fit_rows], train_x)
    # one program for every fit: the grid's fits and the refit differ only in their inputs (l2, rows' weights)
    fit = _FIT
    val_accs = [_accuracy(fit(x_sel, train_y, fit_mask, np.float32(l2), num_classes, steps), x_sel[val_rows],
                          train_y[val_rows]) for l2 in grid]
    best = int(np.argmax(val_accs))

    x_all, x_test = standardize(train_x, test_x)
    final = fit(x_all, train_y, np.ones(n, np.float32), np.float32(grid[best]), num_classes, steps)
    return {"test_acc": _accuracy(final, x_test, test_y), "val_acc": float(val_accs[best]), "best_l2": grid[best],
            "train_acc": _accuracy(final, x_all, train_y), "val_accs": [float(v) for v in val_accs]}


def _normalize_rows(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_predict(train_x: Any, train_y: Any, test_x: Any, *, k: int = 200, temperature: float = 0.1,
                num_classes: int, weighted: bool = True, batch_size: int = 1024) -> np.ndarray:
    """kNN class predictions by cosine similarity of L2-normalized features.

    The k training rows most similar to a test row vote for their labels with weight
    exp(similarity / temperature) (`weighted`) or 1; the class with the most votes wins
    (the smallest class index among ties).

    Args:
      train_x: [N, D] features; train_y: int labels [N] in [0, num_classes).
      test_x: [M, D] features.
      k: neighbours, 1 <= k <= N.
      temperature: of the vote weights (> 0).
      num_classes: number of classes.
      weighted: exp(sim / T) votes (True) or majority voting (False).
      batch_size: test rows per jitted call.

    Returns:
      int32 NumPy array [M].
    """
    checks.integer("num_classes", num_classes, minimum=1)
    train_x, train_y = _check_labelled("train", train_x, train_y, num_classes)
    test_x = np.asarray(test_x)
    if test_x.ndim != 2 or len(test_x) == 0 or test_x.shape[1] != train_x.shape[1]:
        raise ValueError(f"test features must be [M, {train_x.shape[1]}] with M >= 1, got shape {test_x.shape}")
    checks.integer("k", k, minimum=1, maximum=len(train_x))
    checks.number("temperature", temperature, low=0.0, low_open=True)
    checks.boolean("weighted", weighted)
    checks.integer("batch_size", batch_size, minimum=1)
    bank = _normalize_rows(jnp.asarray(train_x, jnp.float32))
    labels = jnp.asarray(train_y)
    size = min(batch_size, len(test_x))
    test_x = test_x.astype(np.float32)
    out = [np.asarray(_knn_batch(bank, labels, _pad_rows(test_x[a:b], size), np.float32(temperature), k, num_classes,
                                 weighted))[:b - a] for a, b in _batches(len(test_x), size)]
    return np.concatenate(out)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _knn_batch(bank: jax.Array, labels: jax.Array, queries: jax.Array, temperature: jax.Array, k: int,
               num_classes: int, weighted: bool) -> jax.Array:
    """Predictions int32 [B] of queries [B, D] from the normalized bank [N, D] and its labels [N]."""
    sims, idx = jax.lax.top_k(_normalize_rows(queries) @ bank.T, k)  # [B, k]
    votes = jnp.exp(sims / temperature) if weighted else jnp.ones_like(sims)
    scores = jnp.sum(jax.nn.one_hot(labels[idx], num_classes) * votes[..., None], axis=1)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def knn_accuracy(train_x: Any, train_y: Any, test_x: Any, test_y: Any, *, k: int = 200, temperature: float = 0.1,
                 num_classes: int, weighted: bool = True, batch_size: int = 1024) -> float:
    """Accuracy of `knn_predict` on (test_x, test_y)."""
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, num_classes=num_classes,
                       weighted=weighted, batch_size=batch_size)
    test_y = np.asarray(test_y)
    if test_y.shape != pred.shape:
        raise ValueError(f"test labels must be [{len(pred)}], got shape {test_y.shape}")
    return float(np.mean(pred == test_y))


def _centered_normalized(z: jax.Array, normalize: bool) -> jax.Array:
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"embeddings must be [N, D] with N >= 2, got shape {z.shape}")
    z = _normalize_rows(z) if normalize else z
    return z - jnp.mean(z, axis=0)


def embedding_spectrum(z: Any, *, normalize: bool = True) -> jax.Array:
    """Singular values (decreasing) of the embeddings, each row L2-normalized (`normalize`), then
    centered over rows. [N, D] -> [min(N, D)]."""
    return spectrum.singular_values(_centered_normalized(z, normalize))


def embedding_effective_rank(z: Any, *, normalize: bool = True) -> jax.Array:
    """Effective rank exp(H(sigma / sum sigma)) (`lorank.analysis.spectrum.effective_rank`) of the
    row-normalized, centered embeddings: ~D for isotropic [N, D] embeddings, 1 for rank-one ones. [] float."""
    return spectrum.effective_rank(_centered_normalized(z, normalize))


def effective_rank(singular_values: Any) -> jax.Array:
    """Effective rank exp(H(sigma / sum sigma)) of a spectrum [K] (e.g. `embedding_spectrum`'s), by
    `lorank.analysis.spectrum.effective_rank` of diag(sigma), whose singular values are sigma. [] float."""
    s = jnp.asarray(singular_values, jnp.float32)
    if s.ndim != 1 or s.shape[0] == 0:
        raise ValueError(f"singular values must be a non-empty vector [K], got shape {s.shape}")
    return spectrum.effective_rank(jnp.diag(jnp.abs(s)))


def state_features(mesh, features_fn: Callable[[Any, Any, jax.Array], Any], batch_size: int
                   ) -> Callable[[Any, Any], Any]:
    """(state, images [N, ...]) -> features_fn(state.params, state.extra, images) as NumPy, batch by batch.

    Batches of `batch_size` (the last padded) are laid out on `mesh`, each process feeding its own
    rows; the jitted `features_fn` returns an array [B, D] or a tuple of them, replicated. Returns
    float32 [N, D] (or a tuple of such).
    """
    rows = mesh_lib.process_rows(mesh, (batch_size,))
    fn = jax.jit(features_fn, out_shardings=mesh_lib.replicated(mesh))

    def features(state, images):
        out = []
        for a, b in _batches(len(images), batch_size):
            local = _pad_rows(np.asarray(images[a:b]), batch_size)[rows]
            batch = mesh_lib.global_batch(mesh, local, (batch_size,))
            got = jax.device_get(fn(state.params, state.extra, batch))
            out.append(jax.tree.map(lambda x, size=b - a: np.asarray(x)[:size], got))
        return jax.tree.map(lambda *xs: np.concatenate(xs).astype(np.float32), *out)

    return features


def probe_evaluator(features_fn: Callable[[Any, Any, jax.Array], jax.Array], train_images: Any, train_labels: Any,
                    test_images: Any, test_labels: Any, *, num_classes: int, every: int,
                    knn_k: Sequence[int] = (200, 20), knn_temperature: float = 0.1, knn_weighted: bool = True,
                    batch_size: int = 256, linear: bool = True, l2_grid: Sequence[float] = L2_GRID,
                    probe_steps: int = 300, val_fraction: float = 0.1, seed: int = 0) -> loop.Evaluator:
    """An evaluator of a run's frozen backbone on labelled images (no augmentation).

    Every `every` steps the features of the train and test images are computed with
    `features_fn(params, extra, images [B, ...]) -> [B, D]` (jitted, batches of `batch_size`
    laid out on the run's mesh) and reported as probe/linear_acc (`linear_probe`, unless
    `linear` is False), probe/knn{k}_acc for each k of `knn_k` (`knn_accuracy`) and
    probe/effective_rank (`embedding_effective_rank` of the test features).

    Args:
      features_fn: (params, extra, images) -> features, e.g. the backbone in eval mode with
        extra["batch_stats"].
      train_images, test_images: host arrays [N, ...], [M, ...] (every process holds all of them).
      train_labels, test_labels: int [N], [M] in [0, num_classes).
      num_classes: number of classes.
      every: period in steps.
      knn_k, knn_temperature, knn_weighted: the kNN classifiers.
      batch_size: images per feature batch (divisible by the mesh's data-parallel size).
      linear, l2_grid, probe_steps, val_fraction, seed: the linear probe.
    """
    checks.integer("every", every, minimum=1)
    checks.integer("batch_size", batch_size, minimum=1)
    checks.integer("num_classes", num_classes, minimum=2)
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    for name, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        if np.ndim(images) < 2 or len(images) == 0 or labels.shape != (len(images),):
            raise ValueError(f"{name} images {np.shape(images)} and labels {labels.shape} must be [N, ...] and [N]")
    for k in knn_k:
        checks.integer("knn_k", k, minimum=1, maximum=len(train_labels))
    checks.number("knn_temperature", knn_temperature, low=0.0, low_open=True)

    def make(mesh):
        features = state_features(mesh, features_fn, batch_size)

        def evaluate(state):
            train_x, test_x = features(state, train_images), features(state, test_images)
            results = {}
            if linear:
                results["probe/linear_acc"] = linear_probe(
                    train_x, train_labels, test_x, test_labels, num_classes=num_classes, val_fraction=val_fraction,
                    l2_grid=l2_grid, steps=probe_steps, seed=seed)["test_acc"]
            for k in knn_k:
                results[f"probe/knn{k}_acc"] = knn_accuracy(
                    train_x, train_labels, test_x, test_labels, k=k, temperature=knn_temperature,
                    num_classes=num_classes, weighted=knn_weighted)
            results["probe/effective_rank"] = float(embedding_effective_rank(test_x))
            return results

        return evaluate

    return loop.Evaluator(every, make)
