"""GaLore: gradient low-rank projection (Zhao et al., ICML 2024) as an optax transformation.

For each selected weight matrix W [m, n] with gradient G, `scale_by_galore` keeps
an orthonormal projector from the top-r singular vectors of G, refreshed every T
optimizer steps, and runs an inner transformation (Adam by default) on the
projected gradient only, so the inner state has r instead of min(m, n) rows
or columns. The inner update is projected back to [m, n] and multiplied by
`scale`. All weights are still trained. Placements (`proj_type`: left P [m, r],
right Q [r, n], or both) and matrix views of >2-D leaves are described in
`lorank.optim.projection`; the SVDs and their sign convention in
`lorank.optim.svd`; optimizers built on this transformation in
`lorank.optim.galore_optimizers`.

Conventions beyond the reference algorithm:

- `align_signs=True` flips each new singular vector to a non-negative dot
  product with the previous projector's vector of the same index, so the inner
  moments carried across a refresh keep their sign meaning.
  `reproject_moments=True` instead maps first moments (state fields named in
  `moment_fields`) into the new subspace: mu <- P_new^T P_old mu (left),
  mu Q_old Q_new^T (right).
- The SVD runs in float32 on the upcast gradient; projectors are stored in the
  parameter dtype unless `projector_dtype` says otherwise.
- A refresh whose gradient or SVD is not finite is refused: the old projector
  stays, the refresh is retried at the next step, and the state counts it
  (`nonfinite`, `last_nonfinite`).
- `lazy_threshold`: adaptive refresh in the manner of Q-GaLore. At each refresh
  the mean |cosine| between the new and old top-r singular vectors is
  compared with the threshold; after `lazy_patience` consecutive stable
  refreshes the leaf's interval doubles (up to `max_update_proj_gap`), and an
  unstable refresh resets it to T.
- Refresh times are per leaf and count optimizer steps (`count`), so under
  `optax.MultiSteps` they count optimizer steps, not micro-batches.
- Every leaf of an initial state is its own array, so an eagerly initialised
  state can be donated to a jitted step.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from lorank import checks
from lorank.optim import projection as pj
from lorank.optim import quantize as q8
from lorank.optim import svd as svd_lib
from lorank.optim.labels import path_str
from lorank.optim.projection import PROJ_TYPES, LeafPlan


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


def _initial_projector(plan: LeafPlan, dtype: Any, update_proj_gap: Any) -> ProjectorState:
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
      proj_type: "std", "reverse_std", "left", "right" or "full" (`lorank.optim.projection`).
      inner: gradient-only transformation run on the projected gradients (and on
        unprojected leaves at full rank); it gets params=None. Default
        `optax.scale_by_adam()`.
      galore_mask: which leaves are projected: a pytree (or prefix) of Python
        bools, or a callable params -> such a pytree (e.g.
        `lorank.models.llama.galore_mask`). None: every 2-D leaf and every
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
    checks.one_of("svd", svd, svd_lib.SVD_METHODS)
    oversample = svd_lib.DEFAULT_OVERSAMPLE if oversample is None else checks.integer("oversample", oversample, 0)
    power_iters = svd_lib.DEFAULT_POWER_ITERS if power_iters is None else checks.integer("power_iters", power_iters, 0)
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

    def init_fn(params):
        if rank is None:
            raise ValueError("rank is traced at init; it fixes state shapes, so it must be a Python int "
                             "(with optax.inject_hyperparams under jit, pass static_args=('rank',))")
        leaves, treedef = jax.tree.flatten(params)
        plans = pj.leaf_plans(params, rank, proj_type, galore_mask, matrix_axes)
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

    def _refresh(g: jax.Array, old: ProjectorState, plan: LeafPlan, count: jax.Array, key: jax.Array):
        """New ProjectorState from the gradient's matrix view; (state, refused, changed)."""
        g32 = g.astype(jnp.float32)
        if svd == "exact":
            u, vh = svd_lib.exact_top_singular(g32, plan.rank)
        else:
            u, vh = svd_lib.randomized_top_singular(g32, plan.rank, key, oversample=oversample,
                                                    power_iters=power_iters)
        new_left = u if plan.side in ("left", "full") else None
        new_right = vh if plan.side in ("right", "full") else None
        if align_signs:
            new_left = None if new_left is None else svd_lib.align_signs(new_left, old.left, axis=0)
            new_right = None if new_right is None else svd_lib.align_signs(new_right, old.right, axis=1)
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
                    pj.reproject_moment(q8.load_moment(e), plan, (old.left, old.right), (new.left, new.right),
                                        precision), e)
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
        axes = pj.matrix_axes_per_leaf(matrix_axes, updates)
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
            plan = pj.plan_for_projectors(tuple(g.shape), proj.left, proj.right, ax, path_str(path))
            mat = pj.to_matrix(g, plan)
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

        low = [m if plan is None else pj.project(m, plan, new.left, new.right, precision)
               for m, plan, new in zip(mats, plans, news)]
        low_updates, inner_state = inner.update(treedef.unflatten(low), inner_state, None)
        out = []
        for g, u, plan, new in zip(leaves, treedef.flatten_up_to(low_updates), plans, news):
            if plan is None:
                out.append(u)
                continue
            full = pj.from_matrix(pj.project_back(u, plan, new.left, new.right, precision), plan)
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
