"""GaLore: gradient low-rank projection (Zhao et al., ICML 2024) as optax transformations.

For each selected weight matrix W [m, n] with gradient G, GaLore keeps an
orthonormal projector from the top-r singular vectors of G, refreshed every T
optimizer steps, and runs an inner transformation (Adam by default) on the
projected gradient only, so the inner state has r instead of min(m, n) rows
or columns. The inner update is projected back to [m, n] and multiplied by
`scale`. All weights are still trained.

Placements (`proj_type`), with U, S, Vh = svd(G) and r the rank:

    side    projector           projected gradient R      update
    left    P = U[:, :r] [m,r]  R = P^T G      [r, n]     P inner(R)
    right   Q = Vh[:r]   [r,n]  R = G Q^T      [m, r]     inner(R) Q
    full    P and Q             R = P^T G Q^T  [r, r]     P inner(R) Q

"std" puts the projector on the smaller dimension (right when m >= n, else
left; the reference package's default), "reverse_std" on the larger one (what
`optax.contrib.galore` does; it keeps less state).

Conventions beyond the reference algorithm:

- Signs: each projector vector is flipped so that its entry of largest
  magnitude is positive (first such entry on ties), so results do not depend
  on the LAPACK behind `jnp.linalg.svd`. `align_signs=True` then flips each new
  vector to a non-negative dot product with the previous projector's vector of
  the same index, so the inner moments carried across a refresh keep their
  sign meaning. `reproject_moments=True` instead maps first moments (state
  fields named in `moment_fields`) into the new subspace:
  mu <- P_new^T P_old mu (left), mu Q_old Q_new^T (right).
- The SVD runs in float32 on the upcast gradient; projectors are stored in the
  parameter dtype unless `projector_dtype` says otherwise.
- A refresh whose gradient or SVD is not finite is refused: the old projector
  stays, the refresh is retried at the next step, and the state counts it
  (`nonfinite`, `last_nonfinite`).
- `svd="randomized"`: a randomized range finder (Halko, Martinsson, Tropp 2011)
  with `power_iters` QR-stabilised power iterations and `oversample` extra
  columns replaces the full SVD.
- `lazy_threshold`: adaptive refresh in the manner of Q-GaLore. At each refresh
  the mean |cosine| between the new and old top-r singular vectors is
  compared with the threshold; after `lazy_patience` consecutive stable
  refreshes the leaf's interval doubles (up to `max_update_proj_gap`), and an
  unstable refresh resets it to T.
- Refresh times are per leaf and count optimizer steps (`count`), so under
  `optax.MultiSteps` they count optimizer steps, not micro-batches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lorank import checks
from lorank.optim import quantize as q8
from lorank.optim.labels import path_str

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("exact", "randomized")
DEFAULT_OVERSAMPLE = 8  # randomized SVD: extra random columns beyond the rank
DEFAULT_POWER_ITERS = 2  # randomized SVD: power iterations


# --------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class MatrixAxes:
    """Which axes of a parameter form the rows and the columns of its matrix view.

    A leaf [embed, heads, head_dim] with `MatrixAxes(rows=0, cols=(1, 2))` is
    projected as the matrix [embed, heads * head_dim]: the leaf is transposed to
    rows + cols order and reshaped. Negative axes count from the end.
    """

    rows: Union[int, Sequence[int]] = 0
    cols: Union[int, Sequence[int]] = 1

    def resolve(self, ndim: int, where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(rows, cols) as non-negative axis tuples; ValueError unless they partition range(ndim)."""
        as_tuple = lambda a: (a,) if isinstance(a, (int, np.integer)) else tuple(a)  # noqa: E731
        rows, cols = as_tuple(self.rows), as_tuple(self.cols)
        if not rows or not cols:
            raise ValueError(f"{where}: MatrixAxes needs at least one row and one column axis, got {self}")
        for a in rows + cols:
            if not -ndim <= a < ndim:
                raise ValueError(f"{where}: axis {a} of {self} is out of range for a {ndim}-d leaf")
        rows = tuple(int(a) % ndim for a in rows)
        cols = tuple(int(a) % ndim for a in cols)
        if sorted(rows + cols) != list(range(ndim)):
            raise ValueError(f"{where}: {self} must use each of the leaf's {ndim} axes exactly once")
        return rows, cols


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one projected leaf (never part of a pytree)."""

    path: str
    shape: tuple[int, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    m: int
    n: int
    side: str  # "left" | "right" | "full"
    rank: int

    @property
    def low_shape(self) -> tuple[int, int]:
        """Shape of the projected gradient."""
        r = self.rank
        return {"left": (r, self.n), "right": (self.m, r), "full": (r, r)}[self.side]


def _side(proj_type: str, m: int, n: int) -> str:
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def _broadcast_to_leaves(spec: Any, params: Any, what: str, is_leaf=None) -> list:
    """Per-leaf values of `spec`, a pytree prefix of `params` (or a callable on params)."""
    if callable(spec) and not isinstance(spec, MatrixAxes):
        spec = spec(params)
    treedef = jax.tree.structure(params)
    try:
        return treedef.flatten_up_to(spec) if treedef.num_leaves else []
    except (ValueError, TypeError):
        pass
    try:
        expanded = jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), spec, params,
                                is_leaf=is_leaf)
        return treedef.flatten_up_to(expanded)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{what} does not match the params: its tree {jax.tree.structure(spec, is_leaf=is_leaf)} "
            f"is not a prefix of the params' tree {treedef} ({err})") from None


def _plans(params: Any, rank: int, proj_type: str, galore_mask: Any, matrix_axes: Any) -> list:
    """One _Plan (projected) or None (inner at full rank) per leaf of `params`."""
    with_path, _ = jax.tree_util.tree_flatten_with_path(params)
    is_axes = lambda x: x is None or isinstance(x, MatrixAxes)  # noqa: E731
    axes = (_broadcast_to_leaves(matrix_axes, params, "matrix_axes", is_leaf=is_axes)
            if matrix_axes is not None else [None] * len(with_path))
    masks = (_broadcast_to_leaves(galore_mask, params, "galore_mask")
             if galore_mask is not None else [None] * len(with_path))
    plans = []
    for (path, leaf), ax, sel in zip(with_path, axes, masks):
        where = path_str(path) or "<root>"
        shape = tuple(leaf.shape)
        if ax is not None and not isinstance(ax, MatrixAxes):
            raise ValueError(f"matrix_axes leaf at {where} must be a MatrixAxes or None, got {ax!r}")
        selected = ((len(shape) == 2 or ax is not None) if sel is None
                    else checks.boolean(f"galore_mask leaf at {where}", sel))
        if not selected:
            plans.append(None)
            continue
        if ax is None:
            if len(shape) != 2:
                raise ValueError(
                    f"galore_mask selects {where} of shape {shape}, which is not a matrix; "
                    "give it a MatrixAxes in matrix_axes or leave it out of the mask")
            ax = MatrixAxes(0, 1)
        rows, cols = ax.resolve(len(shape), where)
        m = math.prod(shape[a] for a in rows)
        n = math.prod(shape[a] for a in cols)
        if min(m, n) <= rank:
            plans.append(None)  # smaller dimension at most the rank: nothing to save
            continue
        plans.append(_Plan(where, shape, rows, cols, m, n, _side(proj_type, m, n), rank))
    return plans


def _to_matrix(x: jax.Array, plan: _Plan) -> jax.Array:
    perm = plan.rows + plan.cols
    if perm != tuple(range(len(perm))):
        x = jnp.transpose(x, perm)
    return x.reshape(plan.m, plan.n)


def _from_matrix(y: jax.Array, plan: _Plan) -> jax.Array:
    perm = plan.rows + plan.cols
    y = y.reshape(tuple(plan.shape[a] for a in perm))
    if perm != tuple(range(len(perm))):
        y = jnp.transpose(y, np.argsort(perm))
    return y


# --------------------------------------------------------------------------- SVD


def canonical_signs(vectors: jax.Array, axis: int) -> jax.Array:
    """Flip each vector so its largest-magnitude entry is positive.

    Args:
      vectors: [k, r] with vectors as columns (axis=0), or [r, k] as rows (axis=1).
      axis: the axis running along each vector.
    Returns:
      same shape and dtype; the first entry of largest |value| of each vector is >= 0.
    """
    idx = jnp.argmax(jnp.abs(vectors), axis=axis, keepdims=True)
    pivot = jnp.take_along_axis(vectors, idx, axis=axis)
    return vectors * jnp.where(pivot < 0, -1, 1).astype(vectors.dtype)


def _align_signs(new: jax.Array, old: jax.Array, axis: int) -> jax.Array:
    """Flip vectors of `new` whose dot product with the same vector of `old` is negative."""
    dots = jnp.sum(new * old.astype(new.dtype), axis=axis, keepdims=True)
    return new * jnp.where(dots < 0, -1, 1).astype(new.dtype)


def exact_top_singular(g: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Top-`rank` singular vectors by a full SVD, signs canonical.

    Args:
      g: [m, n] float32.
    Returns:
      (U_r [m, r], Vh_r [r, n]).
    """
    u, _, vh = jnp.linalg.svd(g, full_matrices=False)
    return canonical_signs(u[:, :rank], axis=0), canonical_signs(vh[:rank], axis=1)


def randomized_top_singular(g: jax.Array, rank: int, key: jax.Array, *, oversample: int = 8,
                            power_iters: int = 2) -> tuple[jax.Array, jax.Array]:
    """Approximate top-`rank` singular vectors by a randomized range finder, signs canonical.

    Y = G Omega with Omega Gaussian [n, rank + oversample], then `power_iters`
    rounds of Y <- G (G^T Y) with QR re-orthonormalisation, Q = qr(Y), and the
    exact SVD of the small B = Q^T G. Cost (2 power_iters + 2) m n k flops for
    k = rank + oversample, against O(m n min(m, n)) for the full SVD.

    Args:
      g: [m, n] float32.
      key: PRNG key for Omega.
    Returns:
      (U_r [m, r], Vh_r [r, n]), orthonormal columns / rows.
    """
    m, n = g.shape
    k = min(rank + oversample, m, n)
    omega = jax.random.normal(key, (n, k), g.dtype)
    y = g @ omega
    for _ in range(power_iters):
        y, _ = jnp.linalg.qr(y)
        z, _ = jnp.linalg.qr(g.T @ y)
        y = g @ z
    basis, _ = jnp.linalg.qr(y)  # [m, k]
    ub, _, vh = jnp.linalg.svd(basis.T @ g, full_matrices=False)  # [k, k], [k, n]
    u = basis @ ub[:, :rank]
    return canonical_signs(u, axis=0), canonical_signs(vh[:rank], axis=1)


# --------------------------------------------------------------------------- state


class ProjectorState(NamedTuple):
    """Projector and refresh schedule of one projected leaf (matrix view [m, n], rank r).

    `left` is None for right projection, `right` is None for left projection.
    """

    left: Optional[jax.Array]  # [m, r] P, orthonormal columns (left, full)
    right: Optional[jax.Array]  # [r, n] Q, orthonormal rows (right, full)
    next_refresh: jax.Array  # int32 [], optimizer step at which the next SVD is due
    gap: jax.Array  # int32 [], current refresh interval (T unless lengthened adaptively)
    streak: jax.Array  # int32 [], consecutive stable refreshes (adaptive refresh)
    refreshes: jax.Array  # int32 [], SVDs accepted so far


class ScaleByGaloreState(NamedTuple):
    """State of `scale_by_galore`."""

    count: jax.Array  # int32 [], optimizer steps taken
    projectors: Any  # params' tree: ProjectorState at projected leaves, optax.MaskedNode elsewhere
    inner_state: Any  # inner's state over the tree of projected gradients ([r, n], [m, r] or [r, r])
    nonfinite: jax.Array  # int32 [], refreshes refused because the gradient or its SVD was not finite
    last_nonfinite: jax.Array  # int32 [], step of the last refused refresh, -1 if none


def _initial_projector(plan: _Plan, dtype: Any, update_proj_gap: Any) -> ProjectorState:
    """Zero projectors due for a refresh at step 0, interval `update_proj_gap`.

    Every leaf is a fresh array (`jnp.array` copies even an array argument, such as
    a hyperparameter of `optax.inject_hyperparams`), so no two leaves of a state share
    a buffer and an eagerly initialised state can be donated to a jitted step.
    """
    r = plan.rank
    return ProjectorState(
        left=jnp.zeros((plan.m, r), dtype) if plan.side in ("left", "full") else None,
        right=jnp.zeros((r, plan.n), dtype) if plan.side in ("right", "full") else None,
        next_refresh=jnp.zeros([], jnp.int32),
        gap=jnp.array(update_proj_gap, jnp.int32),
        streak=jnp.zeros([], jnp.int32),
        refreshes=jnp.zeros([], jnp.int32))


def _plan_from_state(g: jax.Array, proj: ProjectorState, ax: Optional[MatrixAxes], where: str) -> _Plan:
    shape = tuple(g.shape)
    rows, cols = (ax or MatrixAxes(0, 1)).resolve(len(shape), where)
    m = math.prod(shape[a] for a in rows)
    n = math.prod(shape[a] for a in cols)
    if proj.left is not None and proj.right is not None:
        side, rank = "full", proj.left.shape[1]
    elif proj.left is not None:
        side, rank = "left", proj.left.shape[1]
    else:
        side, rank = "right", proj.right.shape[0]
    return _Plan(where, shape, rows, cols, m, n, side, rank)


def _project(g: jax.Array, proj: ProjectorState, plan: _Plan, precision) -> jax.Array:
    """Matrix view [m, n] -> low-rank shape, in the promoted dtype of gradient and projector."""
    mm = lambda a, b: jnp.matmul(a, b, precision=precision)  # noqa: E731
    if plan.side == "left":
        return mm(proj.left.T, g)
    if plan.side == "right":
        return mm(g, proj.right.T)
    return mm(mm(proj.left.T, g), proj.right.T)


def _project_back(u: jax.Array, proj: ProjectorState, plan: _Plan, precision) -> jax.Array:
    """Low-rank shape -> matrix view [m, n]."""
    mm = lambda a, b: jnp.matmul(a, b, precision=precision)  # noqa: E731
    if plan.side == "left":
        return mm(proj.left, u)
    if plan.side == "right":
        return mm(u, proj.right)
    return mm(mm(proj.left, u), proj.right)


def _reproject_moment(mu: jax.Array, old: ProjectorState, new: ProjectorState, plan: _Plan,
                      precision) -> jax.Array:
    """A first moment in the old subspace's coordinates -> the new subspace's."""
    mm = lambda a, b: jnp.matmul(a, b, precision=precision)  # noqa: E731
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    out = mu.astype(jnp.float32)
    if plan.side in ("left", "full"):
        out = mm(mm(f32(new.left).T, f32(old.left)), out)
    if plan.side in ("right", "full"):
        out = mm(out, mm(f32(old.right), f32(new.right).T))
    return out


# --------------------------------------------------------------------------- transformation


def scale_by_galore(
    rank: int,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    inner: Optional[optax.GradientTransformation] = None,
    *,
    galore_mask: Any = None,
    matrix_axes: Any = None,
    svd: str = "exact",
    oversample: Optional[int] = None,
    power_iters: Optional[int] = None,
    seed: int = 0,
    align_signs: bool = False,
    reproject_moments: bool = False,
    moment_fields: Sequence[str] = ("mu", "trace"),
    lazy_threshold: Optional[float] = None,
    lazy_patience: int = 2,
    max_update_proj_gap: Optional[int] = None,
    projector_dtype: Any = None,
    precision: Any = None,
) -> optax.GradientTransformation:
    """Runs `inner` on rank-`rank` projections of the selected gradient matrices.

    Args:
      rank: r, the projection rank (a Python int: it fixes state shapes).
      update_proj_gap: T, optimizer steps between SVD refreshes (steps 0, T, 2T, ...).
      scale: multiplies the projected-back update of projected leaves.
      proj_type: "std", "reverse_std", "left", "right" or "full" (module docstring).
      inner: gradient-only transformation run on the projected gradients (and on
        unprojected leaves at full rank); it gets params=None. Default
        `optax.scale_by_adam()`.
      galore_mask: which leaves are projected: a pytree (or prefix) of Python
        bools, or a callable params -> such a pytree (e.g.
        `lorank.optim.labels.llama_galore_mask`). None: every 2-D leaf and every
        leaf with a MatrixAxes. Selected leaves whose smaller matrix dimension
        is at most `rank` run through `inner` at full rank, unscaled.
      matrix_axes: None, a MatrixAxes, a pytree (prefix) of MatrixAxes/None, or a
        callable params -> such a pytree; the matrix view of >2-D leaves.
      svd: "exact" (jnp.linalg.svd) or "randomized" (range finder).
      oversample, power_iters: randomized SVD parameters (None: 8 and 2). They fix
        shapes and loop counts: under optax.inject_hyperparams give them via static_args.
      seed: seeds the randomized SVD (key = fold_in(fold_in(key(seed), leaf), step)).
      align_signs: align each new singular vector's sign with the previous projector's.
      reproject_moments: map first moments (inner state fields named in
        `moment_fields`) into the new subspace at each refresh.
      lazy_threshold: enable adaptive refresh with this mean |cosine| threshold in (0, 1].
      lazy_patience: stable refreshes in a row before the interval doubles.
      max_update_proj_gap: cap of the adaptive interval (default 8 T).
      projector_dtype: storage dtype of projectors (default: the parameter's).
      precision: `jax.lax.Precision` of the projection matmuls.
    Returns:
      An optax GradientTransformation with state ScaleByGaloreState. Updates
      have the gradients' dtypes.
    """
    rank = checks.integer_or_traced("rank", rank, minimum=1)
    gap_value = checks.integer_or_traced("update_proj_gap", update_proj_gap, minimum=1)
    checks.one_of("proj_type", proj_type, PROJ_TYPES)
    checks.one_of("svd", svd, SVD_METHODS)
    oversample = DEFAULT_OVERSAMPLE if oversample is None else checks.integer("oversample", oversample, 0)
    power_iters = DEFAULT_POWER_ITERS if power_iters is None else checks.integer("power_iters", power_iters, 0)
    checks.integer_or_traced("seed", seed, minimum=0)
    checks.integer_or_traced("lazy_patience", lazy_patience, minimum=1)
    checks.number("scale", scale)
    if lazy_threshold is not None:
        checks.number("lazy_threshold", lazy_threshold, low=0, high=1, low_open=True)
    if max_update_proj_gap is not None:
        checks.integer_or_traced("max_update_proj_gap", max_update_proj_gap,
                                 minimum=1 if gap_value is None else gap_value)
    if isinstance(moment_fields, str):
        moment_fields = (moment_fields,)
    moment_fields = tuple(moment_fields)
    if inner is None:
        inner = optax.scale_by_adam()
    if not hasattr(inner, "init") or not hasattr(inner, "update"):
        raise ValueError(f"inner must be an optax GradientTransformation, got {inner!r}")
    if projector_dtype is not None:
        projector_dtype = jnp.dtype(projector_dtype)
    adaptive = lazy_threshold is not None
    max_gap = max_update_proj_gap if max_update_proj_gap is not None else 8 * update_proj_gap

    def _resolve_axes(tree: Any) -> list:
        if matrix_axes is None:
            return [None] * len(jax.tree.leaves(tree))
        is_axes = lambda x: x is None or isinstance(x, MatrixAxes)  # noqa: E731
        return _broadcast_to_leaves(matrix_axes, tree, "matrix_axes", is_leaf=is_axes)

    def init_fn(params):
        if rank is None:
            raise ValueError("rank is traced at init; it fixes state shapes, so it must be a Python int "
                             "(with optax.inject_hyperparams under jit, pass static_args=('rank',))")
        leaves, treedef = jax.tree.flatten(params)
        plans = _plans(params, rank, proj_type, galore_mask, matrix_axes)
        projectors, proxies = [], []
        for p, plan in zip(leaves, plans):
            if plan is None:
                projectors.append(optax.MaskedNode())
                proxies.append(p)
                continue
            dtype = projector_dtype or p.dtype
            projectors.append(_initial_projector(plan, dtype, update_proj_gap))
            proxies.append(jnp.zeros(plan.low_shape, jnp.promote_types(p.dtype, dtype)))
        return ScaleByGaloreState(
            count=jnp.zeros([], jnp.int32),
            projectors=treedef.unflatten(projectors),
            inner_state=inner.init(treedef.unflatten(proxies)),
            nonfinite=jnp.zeros([], jnp.int32),
            last_nonfinite=jnp.full([], -1, jnp.int32))

    def _refresh(g: jax.Array, old: ProjectorState, plan: _Plan, count: jax.Array, key: jax.Array):
        """New ProjectorState from the gradient's matrix view; (state, refused, changed)."""
        g32 = g.astype(jnp.float32)
        if svd == "exact":
            u, vh = exact_top_singular(g32, plan.rank)
        else:
            u, vh = randomized_top_singular(g32, plan.rank, key, oversample=oversample,
                                            power_iters=power_iters)
        new_left = u if plan.side in ("left", "full") else None
        new_right = vh if plan.side in ("right", "full") else None
        if align_signs:
            new_left = None if new_left is None else _align_signs(new_left, old.left, axis=0)
            new_right = None if new_right is None else _align_signs(new_right, old.right, axis=1)
        ok = jnp.all(jnp.isfinite(g32))
        sims = []
        for new, prev, axis in ((new_left, old.left, 0), (new_right, old.right, 1)):
            if new is not None:
                ok &= jnp.all(jnp.isfinite(new))
                sims.append(jnp.mean(jnp.abs(jnp.sum(new * prev.astype(jnp.float32), axis=axis))))
        similarity = sum(sims) / len(sims)
        base_gap = jnp.asarray(update_proj_gap, jnp.int32)
        if adaptive:
            stable = similarity >= lazy_threshold
            streak = jnp.where(stable, old.streak + 1, 0)
            lengthen = streak >= lazy_patience
            gap = jnp.where(stable, old.gap, base_gap)
            gap = jnp.where(lengthen, jnp.minimum(2 * gap, jnp.asarray(max_gap, jnp.int32)), gap)
            streak = jnp.where(lengthen, 0, streak)
        else:
            streak, gap = old.streak, base_gap
        keep = lambda new, prev: None if new is None else jnp.where(ok, new.astype(prev.dtype), prev)  # noqa: E731
        state = ProjectorState(
            left=keep(new_left, old.left),
            right=keep(new_right, old.right),
            next_refresh=jnp.where(ok, count + gap, count + 1).astype(jnp.int32),
            gap=jnp.where(ok, gap, old.gap).astype(jnp.int32),
            streak=jnp.where(ok, streak, old.streak).astype(jnp.int32),
            refreshes=old.refreshes + ok.astype(jnp.int32))
        return state, ~ok, ok

    def _reproject_inner(inner_state, treedef, plans, olds, news, changed):
        """Maps first-moment fields of the inner state into the refreshed subspaces."""

        def moment_tree(tree):
            try:
                entries = treedef.flatten_up_to(tree)
            except (ValueError, TypeError):
                return tree
            out = []
            for e, plan, old, new, ch in zip(entries, plans, olds, news, changed):
                if plan is None or not hasattr(e, "shape") or tuple(e.shape) != plan.low_shape:
                    out.append(e)
                    continue
                moved = lambda e=e, plan=plan, old=old, new=new: q8.store_moment(  # noqa: E731
                    _reproject_moment(q8.load_moment(e), old, new, plan, precision), e)
                out.append(jax.lax.cond(ch, moved, lambda e=e: e))
            return treedef.unflatten(out)

        def visit(node):
            if hasattr(node, "_fields"):
                return type(node)(*[moment_tree(v) if f in moment_fields else visit(v)
                                    for f, v in zip(node._fields, node)])
            if isinstance(node, (tuple, list)):
                return type(node)(visit(v) for v in node)
            if isinstance(node, dict):
                return {k: visit(v) for k, v in node.items()}
            return node

        return visit(inner_state)

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        with_path = jax.tree_util.tree_flatten_with_path(updates)[0]
        proj_leaves = treedef.flatten_up_to(state.projectors)
        axes = _resolve_axes(updates)
        count = state.count
        base_key = jax.random.PRNGKey(seed)
        plans, olds, news, mats, refused, changed = [], [], [], [], [], []
        for i, (g, proj, ax, (path, _)) in enumerate(zip(leaves, proj_leaves, axes, with_path)):
            if not isinstance(proj, ProjectorState):
                plans.append(None)
                olds.append(None)
                news.append(None)
                mats.append(g)
                refused.append(jnp.zeros([], bool))
                changed.append(jnp.zeros([], bool))
                continue
            plan = _plan_from_state(g, proj, ax, path_str(path))
            mat = _to_matrix(g, plan)
            key = jax.random.fold_in(jax.random.fold_in(base_key, i), count)
            no_change = lambda mat, proj, key: (proj, jnp.zeros([], bool), jnp.zeros([], bool))  # noqa: E731
            new, ref, ch = jax.lax.cond(
                count >= proj.next_refresh,
                lambda mat, proj, key, plan=plan: _refresh(mat, proj, plan, count, key),
                no_change, mat, proj, key)
            plans.append(plan)
            olds.append(proj)
            news.append(new)
            mats.append(mat)
            refused.append(ref)
            changed.append(ch)

        inner_state = state.inner_state
        if reproject_moments and any(p is not None for p in plans):
            inner_state = _reproject_inner(inner_state, treedef, plans, olds, news, changed)

        low = [m if plan is None else _project(m, new, plan, precision)
               for m, plan, new in zip(mats, plans, news)]
        low_updates, inner_state = inner.update(treedef.unflatten(low), inner_state, None)
        out = []
        for g, u, plan, new in zip(leaves, treedef.flatten_up_to(low_updates), plans, news):
            if plan is None:
                out.append(u)
                continue
            full = _from_matrix(_project_back(u, new, plan, precision), plan)
            out.append((scale * full).astype(g.dtype))

        any_refused = jnp.any(jnp.stack(refused)) if refused else jnp.zeros([], bool)
        n_refused = sum(r.astype(jnp.int32) for r in refused) if refused else 0
        new_state = ScaleByGaloreState(
            count=optax.safe_int32_increment(count),
            projectors=treedef.unflatten([optax.MaskedNode() if n is None else n for n in news]),
            inner_state=inner_state,
            nonfinite=state.nonfinite + n_refused,
            last_nonfinite=jnp.where(any_refused, count, state.last_nonfinite).astype(jnp.int32))
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------- optimizers


# Keyword options every optimizer factory passes through to `scale_by_galore` unchanged.
_GALORE_OPTIONS = ("galore_mask", "matrix_axes", "svd", "oversample", "power_iters", "seed", "align_signs",
                   "reproject_moments", "lazy_threshold", "lazy_patience", "max_update_proj_gap",
                   "projector_dtype", "precision")


def _galore_options(factory_locals: dict) -> dict:
    """The `scale_by_galore` keyword options among a factory's arguments."""
    return {name: factory_locals[name] for name in _GALORE_OPTIONS}


def _with_decay_and_lr(galore: optax.GradientTransformation, learning_rate: Any, weight_decay: Any,
                       mask: Any) -> optax.GradientTransformation:
    """galore -> decoupled weight decay in full parameter space -> -learning_rate."""
    checks.number("weight_decay", weight_decay, low=0)
    if not callable(learning_rate):
        checks.number("learning_rate", learning_rate)
    return optax.chain(galore, optax.add_decayed_weights(weight_decay, mask),
                       optax.scale_by_learning_rate(learning_rate))


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    galore_mask: Any = None,
    matrix_axes: Any = None,
    svd: str = "exact",
    oversample: Optional[int] = None,
    power_iters: Optional[int] = None,
    seed: int = 0,
    align_signs: bool = False,
    reproject_moments: bool = False,
    lazy_threshold: Optional[float] = None,
    lazy_patience: int = 2,
    max_update_proj_gap: Optional[int] = None,
    projector_dtype: Any = None,
    precision: Any = None,
) -> optax.GradientTransformation:
    """AdamW whose moments live in GaLore's rank-`rank` subspaces.

    chain(scale_by_galore(inner=scale_by_adam(b1, b2, eps)), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate)): weight decay is decoupled and applied in
    full parameter space, to every leaf `mask` selects (optax's meaning: a pytree
    of bools or a callable on params; None decays all). Leaves outside
    `galore_mask` get plain AdamW. `learning_rate` may be a schedule; under
    `optax.inject_hyperparams` pass static_args=("rank", "galore_mask", "mask",
    "matrix_axes") for the ones given as callables. Other arguments: see
    `scale_by_galore`.
    """
    q8.check_adam_hyperparameters(b1, b2, eps)
    inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    galore = scale_by_galore(rank, update_proj_gap, scale, proj_type, inner, **_galore_options(locals()))
    return _with_decay_and_lr(galore, learning_rate, weight_decay, mask)


def galore_adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    block_size: int = 256,
    min_size: int = q8.MIN_SIZE,
    galore_mask: Any = None,
    matrix_axes: Any = None,
    svd: str = "exact",
    oversample: Optional[int] = None,
    power_iters: Optional[int] = None,
    seed: int = 0,
    align_signs: bool = False,
    reproject_moments: bool = False,
    lazy_threshold: Optional[float] = None,
    lazy_patience: int = 2,
    max_update_proj_gap: Optional[int] = None,
    projector_dtype: Any = None,
    precision: Any = None,
) -> optax.GradientTransformation:
    """`galore_adamw` with both Adam moments in blockwise dynamic 8-bit (`scale_by_adam_8bit`).

    Low-rank and full-rank moments with at least `min_size` values are stored as
    uint8 codes plus one float32 scale per `block_size` values.
    """
    inner = q8.scale_by_adam_8bit(b1=b1, b2=b2, eps=eps, block_size=block_size, min_size=min_size)
    galore = scale_by_galore(rank, update_proj_gap, scale, proj_type, inner, **_galore_options(locals()))
    return _with_decay_and_lr(galore, learning_rate, weight_decay, mask)


def _shapes_as_params(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Calls `tx.update` with the updates as `params`, for transformations that read only the
    params' shapes and dtypes (optax.scale_by_factored_rms), which GaLore's inner never receives."""
    return optax.GradientTransformation(tx.init, lambda updates, state, params=None: tx.update(
        updates, state, updates))


def galore_adafactor(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    decay_rate: float = 0.8,
    clipping_threshold: Optional[float] = 1.0,
    momentum: Optional[float] = None,
    eps: float = 1e-30,
    min_dim_size_to_factor: int = 128,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    galore_mask: Any = None,
    matrix_axes: Any = None,
    svd: str = "exact",
    oversample: Optional[int] = None,
    power_iters: Optional[int] = None,
    seed: int = 0,
    align_signs: bool = False,
    reproject_moments: bool = False,
    lazy_threshold: Optional[float] = None,
    lazy_patience: int = 2,
    max_update_proj_gap: Optional[int] = None,
    projector_dtype: Any = None,
    precision: Any = None,
) -> optax.GradientTransformation:
    """Adafactor (factored second moment) on GaLore's projected gradients.

    inner = scale_by_factored_rms(decay_rate, eps, min_dim_size_to_factor), then
    update clipping by block RMS (`clipping_threshold`, None to skip), then an
    optional momentum trace (`momentum`; the field `trace` is what
    `reproject_moments` maps). A [r, n] projected gradient keeps r + n second-moment
    values instead of r n. Adafactor's parameter-scale and relative step size are
    not applied (the inner transformation never sees parameters); pass a
    schedule as `learning_rate`.
    """
    checks.number("decay_rate", decay_rate, low=0, high=1)
    checks.number("eps", eps, low=0)
    if momentum is not None:
        checks.number("momentum", momentum, low=0, high=1, high_open=True)
    if clipping_threshold is not None:
        checks.number("clipping_threshold", clipping_threshold, low=0)
    parts = [_shapes_as_params(optax.scale_by_factored_rms(
        decay_rate=decay_rate, epsilon=eps, min_dim_size_to_factor=min_dim_size_to_factor))]
    if clipping_threshold is not None:
        parts.append(optax.clip_by_block_rms(clipping_threshold))
    if momentum is not None:
        parts.append(optax.trace(decay=momentum))
    galore = scale_by_galore(rank, update_proj_gap, scale, proj_type, optax.chain(*parts),
                             **_galore_options(locals()))
    return _with_decay_and_lr(galore, learning_rate, weight_decay, mask)


# --------------------------------------------------------------------------- inspection


def find_galore_states(opt_state: Any) -> list[ScaleByGaloreState]:
    """Every ScaleByGaloreState inside an (arbitrarily nested) optimizer state."""
    found = []
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ScaleByGaloreState)):
        if isinstance(node, ScaleByGaloreState):
            found.append(node)
    return found


def galore_metrics(opt_state: Any) -> dict[str, jax.Array]:
    """Scalars to log: SVD refreshes accepted, refreshes refused as non-finite, step of the last refusal.

    Returns {} when the state holds no GaLore transformation.
    """
    states = find_galore_states(opt_state)
    if not states:
        return {}
    is_proj = lambda x: isinstance(x, ProjectorState)  # noqa: E731
    refreshes = [p.refreshes for s in states
                 for p in jax.tree.leaves(s.projectors, is_leaf=is_proj) if is_proj(p)]
    return {
        "galore/refreshes": sum(refreshes) if refreshes else jnp.zeros([], jnp.int32),
        "galore/nonfinite_refreshes": sum(s.nonfinite for s in states),
        "galore/last_nonfinite_step": jnp.max(jnp.stack([s.last_nonfinite for s in states])),
    }


# --------------------------------------------------------------------------- sharding


def _merged_spec(spec: tuple, axes: tuple[int, ...]) -> Any:
    """Mesh axes of a dimension merged from `axes` (major first): the major axis's
    when the minor ones are unsharded, else None (replicated)."""
    parts = [spec[a] for a in axes]
    if all(p is None for p in parts[1:]):
        return parts[0]
    return None


def _drop_match(shape: tuple[int, ...], ref_shape: tuple[int, ...], ref_spec: tuple) -> Optional[tuple]:
    """ref_spec for `shape` when it equals ref_shape or ref_shape less one axis (factored moments)."""
    if shape == ref_shape:
        return ref_spec
    if len(shape) + 1 == len(ref_shape):
        for i in range(len(ref_shape)):
            if ref_shape[:i] + ref_shape[i + 1:] == shape:
                return ref_spec[:i] + ref_spec[i + 1:]
    return None


def _infer_axes(shape: tuple[int, ...], m: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Contiguous split of `shape` whose leading product is m (used when no MatrixAxes is given)."""
    for k in range(1, len(shape)):
        if math.prod(shape[:k]) == m:
            return tuple(range(k)), tuple(range(k, len(shape)))
    raise ValueError(f"cannot infer the matrix view of a leaf of shape {shape} with {m} rows; pass matrix_axes")


def galore_state_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any, *,
                           mesh: Any = None, matrix_axes: Any = None) -> Any:
    """NamedShardings for `tx.init(params)`, derived from the parameters' shardings.

    For a leaf of matrix view [m, n] whose rows are sharded over mesh axes a and
    columns over b: P [m, r] -> (a, None), Q [r, n] -> (None, b), a left-projected
    moment [r, n] -> (None, b), a right-projected one [m, r] -> (a, None), a
    two-sided [r, r] moment and all scalars replicated. Anywhere in the state, a
    subtree with the params' structure gets each leaf's parameter sharding where
    the shapes agree (or agree but for one dropped axis, as for factored
    moments); quantized moments' codes follow the moment, their scales are
    replicated; everything else is replicated.

    Args:
      tx: the optimizer (any optax chain containing scale_by_galore, or none).
      params: parameters or their jax.ShapeDtypeStructs.
      param_shardings: NamedSharding per parameter, or PartitionSpec with `mesh`.
      mesh: the mesh when param_shardings are PartitionSpecs.
      matrix_axes: the MatrixAxes given to scale_by_galore for >2-D leaves, if any
        (otherwise a contiguous split is inferred).
    Returns:
      A pytree of NamedSharding matching jax.eval_shape(tx.init, params), for
      `jax.jit(..., out_shardings=...)`.
    """
    state = jax.eval_shape(tx.init, params)
    p_leaves, p_def = jax.tree.flatten(params)
    spec_leaves = p_def.flatten_up_to(param_shardings)
    if mesh is None:
        meshes = [s.mesh for s in spec_leaves if isinstance(s, NamedSharding)]
        if not meshes:
            raise ValueError("param_shardings holds no NamedSharding; pass mesh= with PartitionSpecs")
        mesh = meshes[0]
    specs = []
    for p, s in zip(p_leaves, spec_leaves):
        spec = s.spec if isinstance(s, NamedSharding) else s
        if not isinstance(spec, PartitionSpec):
            raise ValueError(f"param_shardings leaf {s!r} is neither a NamedSharding nor a PartitionSpec")
        specs.append(tuple(spec) + (None,) * (len(p.shape) - len(spec)))
    if matrix_axes is None:
        axes_leaves = [None] * len(p_leaves)
    else:
        is_axes = lambda x: x is None or isinstance(x, MatrixAxes)  # noqa: E731
        axes_leaves = _broadcast_to_leaves(matrix_axes, params, "matrix_axes", is_leaf=is_axes)
    replicated = NamedSharding(mesh, PartitionSpec())
    named = lambda spec: NamedSharding(mesh, PartitionSpec(*spec))  # noqa: E731

    def leaf_sharding(x, candidates):
        if x is None or not hasattr(x, "shape"):
            return x
        for ref_shape, ref_spec in candidates:
            spec = _drop_match(tuple(x.shape), ref_shape, ref_spec)
            if spec is not None:
                return named(spec)
        return replicated

    def params_like(node, candidates_per_leaf):
        entries = p_def.flatten_up_to(node)
        out = []
        for e, cands in zip(entries, candidates_per_leaf):
            if isinstance(e, q8.QuantizedArray):
                out.append(q8.QuantizedArray(leaf_sharding(e.codes, cands), replicated, e.signed, e.block_size))
            elif hasattr(e, "shape"):
                out.append(leaf_sharding(e, cands))
            else:
                out.append(generic(e, None))
        return p_def.unflatten(out)

    def is_params_like(node):
        if p_def.num_leaves == 0 or jax.tree_util.treedef_is_leaf(p_def):
            return False
        try:
            p_def.flatten_up_to(node)
            return True
        except (ValueError, TypeError):
            return False

    param_cands = [[(tuple(p.shape), spec)] for p, spec in zip(p_leaves, specs)]

    def galore_node(node: ScaleByGaloreState):
        proj_entries = p_def.flatten_up_to(node.projectors)
        proj_out, cands = [], []
        for p, spec, ax, proj in zip(p_leaves, specs, axes_leaves, proj_entries):
            if not isinstance(proj, ProjectorState):
                proj_out.append(proj)
                cands.append([(tuple(p.shape), spec)])
                continue
            m = proj.left.shape[0] if proj.left is not None else math.prod(p.shape) // proj.right.shape[1]
            n = math.prod(p.shape) // m
            rows, cols = (ax.resolve(len(p.shape), "matrix_axes") if ax is not None
                          else _infer_axes(tuple(p.shape), m))
            row_spec, col_spec = _merged_spec(spec, rows), _merged_spec(spec, cols)
            left = None if proj.left is None else named((row_spec, None))
            right = None if proj.right is None else named((None, col_spec))
            proj_out.append(ProjectorState(left, right, replicated, replicated, replicated, replicated))
            if proj.left is not None and proj.right is not None:
                low = (proj.left.shape[1], proj.right.shape[0])
                cands.append([(low, (None, None))])
            elif proj.left is not None:
                cands.append([((proj.left.shape[1], n), (None, col_spec))])
            else:
                cands.append([((m, proj.right.shape[0]), (row_spec, None))])
        return ScaleByGaloreState(
            count=replicated, projectors=p_def.unflatten(proj_out),
            inner_state=generic(node.inner_state, cands), nonfinite=replicated, last_nonfinite=replicated)

    def generic(node, cands):
        cands = cands if cands is not None else param_cands
        if node is None:
            return None
        if isinstance(node, ScaleByGaloreState):
            return galore_node(node)
        if isinstance(node, q8.QuantizedArray):
            return q8.QuantizedArray(replicated, replicated, node.signed, node.block_size)
        if hasattr(node, "shape") and hasattr(node, "dtype"):
            return replicated
        if not jax.tree_util.tree_leaves(node):
            return node  # an empty state (optax.EmptyState, MaskedNode) holds no array to place
        if is_params_like(node):
            return params_like(node, cands)
        children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
        if jax.tree_util.treedef_is_leaf(treedef):
            return replicated
        return treedef.unflatten([generic(c, cands) for c in children])

    return generic(state, None)
