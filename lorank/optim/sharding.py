"""Shardings of optimizer states (and of any state that mirrors the parameters), from the parameters'.

`tree_shardings(tree, params, param_shardings)` gives a NamedSharding for every
array leaf of any pytree of arrays or jax.ShapeDtypeStructs, by these rules:

- a subtree with the params' tree structure (Adam moments, an EMA target,
  a trace) gives each leaf its parameter's sharding where the shapes agree, or
  agree but for one dropped axis (factored second moments drop that axis of the
  spec);
- a QuantizedArray's codes follow the moment they encode, its per-block scales
  are replicated;
- inside a ScaleByGaloreState, for a parameter of matrix view [m, n] whose rows
  are sharded over mesh axes a and columns over b: P [m, r] -> (a, None),
  Q [r, n] -> (None, b), a left-projected moment [r, n] -> (None, b), a
  right-projected one [m, r] -> (a, None), a two-sided [r, r] moment replicated.
  A merged dimension of a MatrixAxes view keeps its major axis's mesh axes when
  the minor ones are unsharded, else it is replicated;
- everything else (counts, schedules, scalars, statistics of other shapes) is
  replicated.

`optimizer_state_shardings(tx, params, param_shardings)` applies this to
`jax.eval_shape(tx.init, params)`, for `jax.jit(..., out_shardings=...)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lorank.optim import projection as pj
from lorank.optim import quantize as q8
from lorank.optim.galore import ProjectorState, ScaleByGaloreState

# (shape, spec) pairs a leaf's sharding is looked up in: the first whose shape fits wins.
_Candidates = list[tuple[tuple[int, ...], tuple]]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The parameters' layout that the shardings are derived from (one entry per parameter leaf)."""

    mesh: Any
    treedef: Any  # the params' tree structure
    shapes: tuple  # each parameter's shape
    specs: tuple  # each parameter's PartitionSpec entries, padded with None to its rank
    axes: tuple  # each parameter's MatrixAxes, or None

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def named(self, spec: tuple) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def param_candidates(self) -> list[_Candidates]:
        return [[(shape, spec)] for shape, spec in zip(self.shapes, self.specs)]

    def mirrors_params(self, node: Any) -> bool:
        """True when `node` has the params' tree structure (as a prefix: its entries may be subtrees)."""
        if self.treedef.num_leaves == 0 or jax.tree_util.treedef_is_leaf(self.treedef):
            return False
        try:
            self.treedef.flatten_up_to(node)
            return True
        except (ValueError, TypeError):
            return False


def _layout(params: Any, param_shardings: Any, mesh: Any, matrix_axes: Any) -> _Layout:
    """The _Layout of `params` sharded by `param_shardings` (NamedShardings, or PartitionSpecs with `mesh`)."""
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
    return _Layout(mesh, p_def, tuple(tuple(p.shape) for p in p_leaves), tuple(specs),
                   tuple(pj.matrix_axes_per_leaf(matrix_axes, params)))


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


def _leaf_sharding(x: Any, candidates: _Candidates, layout: _Layout) -> Any:
    """The first candidate's spec whose shape fits `x` (see _drop_match), else replicated."""
    if x is None or not hasattr(x, "shape"):
        return x
    for ref_shape, ref_spec in candidates:
        spec = _drop_match(tuple(x.shape), ref_shape, ref_spec)
        if spec is not None:
            return layout.named(spec)
    return layout.replicated


def _mirror_shardings(node: Any, candidates_per_leaf: list[_Candidates], layout: _Layout) -> Any:
    """Shardings of a subtree with the params' structure: entry i looks in candidates_per_leaf[i]."""
    out = []
    for e, cands in zip(layout.treedef.flatten_up_to(node), candidates_per_leaf):
        if isinstance(e, q8.QuantizedArray):
            out.append(q8.QuantizedArray(_leaf_sharding(e.codes, cands, layout), layout.replicated,
                                         e.signed, e.block_size))
        elif hasattr(e, "shape"):
            out.append(_leaf_sharding(e, cands, layout))
        else:
            out.append(_shardings(e, None, layout))
    return layout.treedef.unflatten(out)


def _projector_shardings(shape: tuple[int, ...], spec: tuple, axes: Any, proj: ProjectorState,
                         layout: _Layout) -> tuple[ProjectorState, _Candidates]:
    """Shardings of one leaf's ProjectorState, and the candidates for its projected moments."""
    m = proj.left.shape[0] if proj.left is not None else math.prod(shape) // proj.right.shape[1]
    n = math.prod(shape) // m
    rows, cols = axes.resolve(len(shape), "matrix_axes") if axes is not None else _infer_axes(shape, m)
    row_spec, col_spec = _merged_spec(spec, rows), _merged_spec(spec, cols)
    rep = layout.replicated
    left = None if proj.left is None else layout.named((row_spec, None))
    right = None if proj.right is None else layout.named((None, col_spec))
    if proj.left is not None and proj.right is not None:
        cands = [((proj.left.shape[1], proj.right.shape[0]), (None, None))]
    elif proj.left is not None:
        cands = [((proj.left.shape[1], n), (None, col_spec))]
    else:
        cands = [((m, proj.right.shape[0]), (row_spec, None))]
    return ProjectorState(left, right, rep, rep, rep, rep), cands


def _galore_shardings(node: ScaleByGaloreState, layout: _Layout) -> ScaleByGaloreState:
    """Shardings of a ScaleByGaloreState: projectors and the inner state over projected gradients."""
    proj_out, cands = [], []
    for shape, spec, axes, proj in zip(layout.shapes, layout.specs, layout.axes,
                                       layout.treedef.flatten_up_to(node.projectors)):
        if isinstance(proj, ProjectorState):
            proj_sharding, low_cands = _projector_shardings(shape, spec, axes, proj, layout)
            proj_out.append(proj_sharding)
            cands.append(low_cands)
        else:
            proj_out.append(proj)
            cands.append([(shape, spec)])
    rep = layout.replicated
    return ScaleByGaloreState(count=rep, projectors=layout.treedef.unflatten(proj_out),
                              inner_state=_shardings(node.inner_state, cands, layout),
                              nonfinite=rep, last_nonfinite=rep)


def _shardings(node: Any, cands: Optional[list[_Candidates]], layout: _Layout) -> Any:
    """Shardings of any subtree; `cands` are the per-parameter candidates for subtrees mirroring the params
    (None: the parameters' own shapes and specs)."""
    if node is None:
        return None
    if isinstance(node, ScaleByGaloreState):
        return _galore_shardings(node, layout)
    if isinstance(node, q8.QuantizedArray):
        return q8.QuantizedArray(layout.replicated, layout.replicated, node.signed, node.block_size)
    if hasattr(node, "shape") and hasattr(node, "dtype"):
        return layout.replicated
    if not jax.tree_util.tree_leaves(node):
        return node  # an empty state (optax.EmptyState, MaskedNode) holds no array to place
    if layout.mirrors_params(node):
        return _mirror_shardings(node, cands if cands is not None else layout.param_candidates(), layout)
    children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    if jax.tree_util.treedef_is_leaf(treedef):
        return layout.replicated
    return treedef.unflatten([_shardings(c, cands, layout) for c in children])


def tree_shardings(tree: Any, params: Any, param_shardings: Any, *, mesh: Any = None,
                   matrix_axes: Any = None) -> Any:
    """NamedShardings for any pytree of arrays, derived from the parameters' shardings (module docstring).

    Args:
      tree: a pytree of arrays or jax.ShapeDtypeStructs: an optimizer state, an
        EMA target, BatchNorm statistics, ...
      params: parameters or their jax.ShapeDtypeStructs.
      param_shardings: NamedSharding per parameter, or PartitionSpec with `mesh`.
      mesh: the mesh when param_shardings are PartitionSpecs.
      matrix_axes: the MatrixAxes given to scale_by_galore for >2-D leaves, if any
        (otherwise a contiguous split is inferred).
    Returns:
      A pytree of NamedSharding with the structure of `tree` (QuantizedArrays
      keep their static fields, empty states stay as they are).
    """
    return _shardings(tree, None, _layout(params, param_shardings, mesh, matrix_axes))


def optimizer_state_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any, *,
                              mesh: Any = None, matrix_axes: Any = None) -> Any:
    """NamedShardings for `tx.init(params)`: `tree_shardings` of `jax.eval_shape(tx.init, params)`.

    Args:
      tx: any optax transformation (lorank's GaLore and 8-bit ones, optax's own, chains of them).
      params, param_shardings, mesh, matrix_axes: as for `tree_shardings`.
    Returns:
      A pytree of NamedSharding matching jax.eval_shape(tx.init, params), for
      `jax.jit(..., out_shardings=...)`.
    """
    state = jax.eval_shape(tx.init, params)
    return tree_shardings(state, params, param_shardings, mesh=mesh, matrix_axes=matrix_axes)
