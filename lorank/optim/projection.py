"""Which leaves GaLore projects, their matrix views, and the projections themselves.

A projected leaf of any rank is seen as a matrix [m, n]: `MatrixAxes` says which
of its axes form the rows and which the columns (the leaf is transposed to
rows + cols order and reshaped). With U, S, Vh = svd(G) and r the rank, a
placement (`proj_type`) keeps

    side    projector           projected gradient R      back to [m, n]
    left    P = U[:, :r] [m,r]  R = P^T G      [r, n]     P R
    right   Q = Vh[:r]   [r,n]  R = G Q^T      [m, r]     R Q
    full    P and Q             R = P^T G Q^T  [r, r]     P R Q

"std" puts the projector on the smaller dimension (right when m >= n, else
left; the reference package's default), "reverse_std" on the larger one (what
`optax.contrib.galore` does; it keeps less state).

`LeafPlan` is the static description of one projected leaf (shapes, axes, side,
rank); it is never part of a pytree. The functions here are pure: projectors
come in as arrays (`left` P [m, r] or None, `right` Q [r, n] or None).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lorank import checks
from lorank.optim.labels import path_str

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


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
class LeafPlan:
    """Static description of one projected leaf of shape `shape`, matrix view [m, n], rank r."""

    path: str
    shape: tuple[int, ...]
    rows: tuple[int, ...]  # the leaf's axes that form the m rows
    cols: tuple[int, ...]  # the leaf's axes that form the n columns
    m: int
    n: int
    side: str  # "left" | "right" | "full"
    rank: int

    @property
    def low_shape(self) -> tuple[int, int]:
        """Shape of the projected gradient: [r, n] (left), [m, r] (right) or [r, r] (full)."""
        r = self.rank
        return {"left": (r, self.n), "right": (self.m, r), "full": (r, r)}[self.side]


def projection_side(proj_type: str, m: int, n: int) -> str:
    """The side ("left", "right" or "full") a placement of PROJ_TYPES takes on an [m, n] matrix."""
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def broadcast_to_leaves(spec: Any, params: Any, what: str, is_leaf=None) -> list:
    """Per-leaf values of `spec`, a pytree prefix of `params` (or a callable on params).

    Returns:
      one entry per leaf of `params`, in flattening order.
    Raises:
      ValueError naming `what` when `spec` is not a prefix of the params' tree.
    """
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


def matrix_axes_per_leaf(matrix_axes: Any, params: Any) -> list:
    """The MatrixAxes (or None) of each leaf of `params`, from scale_by_galore's `matrix_axes` argument."""
    if matrix_axes is None:
        return [None] * len(jax.tree.leaves(params))
    is_axes = lambda x: x is None or isinstance(x, MatrixAxes)  # noqa: E731
    return broadcast_to_leaves(matrix_axes, params, "matrix_axes", is_leaf=is_axes)


def leaf_plans(params: Any, rank: int, proj_type: str, galore_mask: Any, matrix_axes: Any) -> list:
    """One LeafPlan (projected) or None (inner at full rank) per leaf of `params`.

    A leaf is selected by `galore_mask` (None: every 2-D leaf and every leaf with
    a MatrixAxes) and projected when the smaller dimension of its matrix view
    exceeds `rank`. Raises ValueError naming the leaf for a mask or axes that do
    not fit it.
    """
    with_path, _ = jax.tree_util.tree_flatten_with_path(params)
    axes = matrix_axes_per_leaf(matrix_axes, params)
    masks = (broadcast_to_leaves(galore_mask, params, "galore_mask")
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
        plans.append(LeafPlan(where, shape, rows, cols, m, n, projection_side(proj_type, m, n), rank))
    return plans


def plan_for_projectors(shape: tuple[int, ...], left: Optional[Any], right: Optional[Any],
                        axes: Optional[MatrixAxes], where: str) -> LeafPlan:
    """The LeafPlan of a leaf of `shape` whose projectors are `left` [m, r] and/or `right` [r, n].

    Only the projectors' shapes are read (arrays or ShapeDtypeStructs); the side
    and rank follow from which of them exist.
    """
    rows, cols = (axes or MatrixAxes(0, 1)).resolve(len(shape), where)
    m = math.prod(shape[a] for a in rows)
    n = math.prod(shape[a] for a in cols)
    if left is not None and right is not None:
        side, rank = "full", left.shape[1]
    elif left is not None:
        side, rank = "left", left.shape[1]
    else:
        side, rank = "right", right.shape[0]
    return LeafPlan(where, tuple(shape), rows, cols, m, n, side, rank)


def to_matrix(x: jax.Array, plan: LeafPlan) -> jax.Array:
    """Leaf [*plan.shape] -> its matrix view [m, n]."""
    perm = plan.rows + plan.cols
    if perm != tuple(range(len(perm))):
        x = jnp.transpose(x, perm)
    return x.reshape(plan.m, plan.n)


def from_matrix(y: jax.Array, plan: LeafPlan) -> jax.Array:
    """Matrix view [m, n] -> leaf [*plan.shape] (inverse of `to_matrix`)."""
    perm = plan.rows + plan.cols
    y = y.reshape(tuple(plan.shape[a] for a in perm))
    if perm != tuple(range(len(perm))):
        y = jnp.transpose(y, np.argsort(perm))
    return y


def _matmul(precision: Any):
    return lambda a, b: jnp.matmul(a, b, precision=precision)


def project(g: jax.Array, plan: LeafPlan, left: Optional[jax.Array], right: Optional[jax.Array],
            precision: Any = None) -> jax.Array:
    """Matrix view g [m, n] -> plan.low_shape, in the promoted dtype of gradient and projectors.

    left: P [m, r] (sides left, full); right: Q [r, n] (sides right, full).
    """
    mm = _matmul(precision)
    if plan.side == "left":
        return mm(left.T, g)
    if plan.side == "right":
        return mm(g, right.T)
    return mm(mm(left.T, g), right.T)


def project_back(u: jax.Array, plan: LeafPlan, left: Optional[jax.Array], right: Optional[jax.Array],
                 precision: Any = None) -> jax.Array:
    """plan.low_shape -> matrix view [m, n]: P u, u Q or P u Q."""
    mm = _matmul(precision)
    if plan.side == "left":
        return mm(left, u)
    if plan.side == "right":
        return mm(u, right)
    return mm(mm(left, u), right)


def reproject_moment(mu: jax.Array, plan: LeafPlan, old: tuple, new: tuple, precision: Any = None) -> jax.Array:
    """A first moment in the old subspace's coordinates -> the new subspace's, float32.

    Args:
      mu: plan.low_shape.
      old, new: (left P [m, r] or None, right Q [r, n] or None) before and after a refresh.
    Returns:
      P_new^T P_old mu (left), mu Q_old Q_new^T (right), both for full; plan.low_shape.
    """
    mm = _matmul(precision)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    (old_left, old_right), (new_left, new_right) = old, new
    out = mu.astype(jnp.float32)
    if plan.side in ("left", "full"):
        out = mm(mm(f32(new_left).T, f32(old_left)), out)
    if plan.side in ("right", "full"):
        out = mm(out, mm(f32(old_right), f32(new_right).T))
    return out
