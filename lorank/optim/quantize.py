"""Blockwise dynamic 8-bit quantization of optimizer states, in pure JAX.

An array is flattened and cut into blocks of `block_size` values; each block
keeps its absolute maximum as a float32 scale, and each value becomes the index
(uint8) of the nearest entry of a fixed 256-entry code map applied to
value / scale. The code maps are *dynamic* (Dettmers et al., "8-bit Optimizers
via Block-wise Quantization", 2022): an entry is 10^-e * f, an exponent e in
0..6 with a linear fraction f in [0.1, 1] whose resolution grows with the
magnitude, so small values keep relative precision. The signed map serves the
first Adam moment, the unsigned map (twice as many positive entries) the
second.

`scale_by_adam_8bit` is `optax.scale_by_adam` with both moments stored this
way: one byte per value plus 4 bytes per block, about a quarter of float32
(block 256: 1.0156 bytes per value). It is usable alone or as GaLore's inner
transformation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorank import checks

NUM_CODES = 256
_EXPONENTS = 7  # decades 1e-6 .. 1e0
MIN_SIZE = 4096  # default: leaves with fewer values keep unquantized moments


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """An array stored as 8-bit codes and per-block float32 scales (a pytree; the
    code map and block size are static).

    Shapes: `codes` has the shape of the array it encodes; blocks are taken
    over its row-major flattening (the last block zero-padded), so
    num_blocks = ceil(codes.size / block_size).
    """

    codes: jax.Array  # uint8 [*shape], index into the code map
    scales: jax.Array  # float32 [num_blocks], absmax of each block
    signed: bool = dataclasses.field(default=True, metadata=dict(static=True))
    block_size: int = dataclasses.field(default=256, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)


@functools.lru_cache(maxsize=None)
def dynamic_code_map(signed: bool) -> np.ndarray:
    """The sorted 256-entry dynamic code map, float32 [256], values in [-1, 1] or [0, 1].

    Decade e (e = 0..6, value scale 10^(e-6)) holds the midpoints of 2^e (signed,
    per sign) or 2^(e+1) (unsigned) equal sub-intervals of [0.1, 1]; the map
    adds exactly 0 and 1. Signed: 2 * 127 + 2 entries; unsigned: 254 + 2.
    """
    values = [0.0, 1.0]
    for e in range(_EXPONENTS):
        count = 2**e if signed else 2 ** (e + 1)
        edges = np.linspace(0.1, 1.0, count + 1)
        mids = (edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (e - (_EXPONENTS - 1))
        values.extend(mids.tolist())
        if signed:
            values.extend((-mids).tolist())
    table = np.sort(np.asarray(values, dtype=np.float64)).astype(np.float32)
    assert table.shape == (NUM_CODES,) and len(np.unique(table)) == NUM_CODES
    return table


@functools.lru_cache(maxsize=None)
def _decision_points(signed: bool) -> np.ndarray:
    """Midpoints between consecutive code-map entries, float32 [255]."""
    table = dynamic_code_map(signed).astype(np.float64)
    return ((table[:-1] + table[1:]) / 2.0).astype(np.float32)


def _nearest_code(normed: jax.Array, signed: bool) -> jax.Array:
    """Index of the nearest code-map entry: the number of decision points below each value.

    A branch-free binary search, 8 rounds of one compare (the first against a scalar, the
    others against a gather). Starting from a scalar rather than a zero index array keeps
    XLA from constant-folding a gather the size of `normed`, which made compiling large
    8-bit leaves slow.
    """
    points = np.concatenate([_decision_points(signed), [np.inf]]).astype(np.float32)  # [256]
    idx = jnp.where(normed > points[127], 128, 0).astype(jnp.int32)
    points = jnp.asarray(points)
    for step in (64, 32, 16, 8, 4, 2, 1):
        idx = jnp.where(normed > points[idx + step - 1], idx + step, idx)
    return idx


def num_blocks(size: int, block_size: int) -> int:
    """Number of scale blocks for an array of `size` values."""
    return max(1, math.ceil(size / block_size))


def quantize(x: jax.Array, *, signed: bool, block_size: int = 256) -> QuantizedArray:
    """Blockwise dynamic 8-bit quantization.

    Args:
      x: float array of any shape; values must be >= 0 when `signed` is False.
      signed: which code map to use.
      block_size: number of values sharing one scale.
    Returns:
      QuantizedArray with codes uint8 [*x.shape] and scales float32 [ceil(x.size / block_size)].
    """
    size = x.size
    blocks = num_blocks(size, block_size)
    flat = jnp.ravel(x).astype(jnp.float32)
    flat = jnp.pad(flat, (0, blocks * block_size - size)).reshape(blocks, block_size)
    absmax = jnp.max(jnp.abs(flat), axis=1)  # [blocks]
    safe = jnp.where(absmax > 0, absmax, 1.0)
    normed = flat / safe[:, None]
    codes = _nearest_code(normed, signed).astype(jnp.uint8).reshape(-1)[:size].reshape(x.shape)
    return QuantizedArray(codes=codes, scales=absmax, signed=signed, block_size=block_size)


def dequantize(q: QuantizedArray, dtype: Any = jnp.float32) -> jax.Array:
    """Inverse of `quantize`: code_map[codes] * scale of the code's block.

    Returns:
      [*q.codes.shape] array of `dtype`.
    """
    size, block_size = q.codes.size, q.block_size
    blocks = q.scales.shape[0]
    if blocks != num_blocks(size, block_size):
        raise ValueError(f"{blocks} scales do not fit {size} codes in blocks of block_size={block_size}")
    values = jnp.asarray(dynamic_code_map(q.signed))[q.codes.reshape(-1).astype(jnp.int32)]
    # Scales broadcast over a [blocks, block_size] view: no repeated copy of them is built.
    values = jnp.pad(values, (0, blocks * block_size - size)).reshape(blocks, block_size)
    return (values * q.scales[:, None]).reshape(-1)[:size].reshape(q.codes.shape).astype(dtype)


def quantization_bound(signed: bool) -> float:
    """Largest |dequantize(quantize(x)) - x| / blockmax(|x|) any input can incur (half the widest code gap)."""
    table = dynamic_code_map(signed).astype(np.float64)
    gaps = np.diff(table)
    if signed:
        # Normalized values lie in [-1, 1]; below the most negative code the error is -1 - table[0].
        return float(max(gaps.max() / 2.0, table[0] + 1.0))
    return float(gaps.max() / 2.0)


class ScaleByAdam8bitState(NamedTuple):
    """State of `scale_by_adam_8bit`.

    `mu` and `nu` have the params' tree structure; a leaf with at least
    `min_size` values is a QuantizedArray (codes uint8 [*param.shape], scales
    float32 [num_blocks]), a smaller one a plain array [*param.shape] in the
    parameter dtype.
    """

    count: jax.Array  # int32 [], steps taken
    mu: Any  # first moment, signed map
    nu: Any  # second moment, unsigned map


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def load_moment(x: Any) -> jax.Array:
    """A stored moment as float32: dequantized if it is a QuantizedArray."""
    return dequantize(x) if _is_quantized(x) else x.astype(jnp.float32)


def store_moment(value: jax.Array, like: Any) -> Any:
    """Store `value` the way `like` is stored (quantized with its map and block size, or plain in its dtype)."""
    if _is_quantized(like):
        return quantize(value, signed=like.signed, block_size=like.block_size)
    return value.astype(like.dtype)


def check_adam_hyperparameters(b1: Any, b2: Any, eps: Any, eps_root: Any = 0.0) -> None:
    """ValueError unless b1, b2 lie in [0, 1) and eps, eps_root are finite and >= 0 (tracers pass)."""
    checks.number("b1", b1, low=0, high=1, high_open=True)
    checks.number("b2", b2, low=0, high=1, high_open=True)
    checks.number("eps", eps, low=0)
    checks.number("eps_root", eps_root, low=0)


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
                       *, block_size: int = 256, min_size: int = MIN_SIZE) -> optax.GradientTransformation:
    """Adam's preconditioning with both moments stored in blockwise dynamic 8-bit.

    The update of a step is computed from the float32 moments before they are
    re-quantized: mu = b1 mu + (1 - b1) g, nu = b2 nu + (1 - b2) g^2,
    u = mu_hat / (sqrt(nu_hat + eps_root) + eps) with bias-corrected hats,
    exactly `optax.scale_by_adam`'s formula; only the stored moments are rounded.

    Args:
      b1, b2: moment decay rates in [0, 1).
      eps, eps_root: as in `optax.scale_by_adam`.
      block_size: values per quantization block (one float32 scale each).
      min_size: leaves with fewer values keep float32-style moments in their
        own dtype (quantizing biases and norm scales saves nothing).
    Returns:
      An optax GradientTransformation; its updates have the gradients' dtype.
    """
    check_adam_hyperparameters(b1, b2, eps, eps_root)
    checks.integer("block_size", block_size, minimum=1)
    checks.integer("min_size", min_size, minimum=0)

    def zeros(p, signed):
        if p.size >= min_size:
            return quantize(jnp.zeros(p.shape, jnp.float32), signed=signed, block_size=block_size)
        return jnp.zeros(p.shape, p.dtype)

    def init_fn(params):
        return ScaleByAdam8bitState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(lambda p: zeros(p, True), params),
            nu=jax.tree.map(lambda p: zeros(p, False), params))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        t = count.astype(jnp.float32)
        bc1 = 1.0 - jnp.asarray(b1, jnp.float32) ** t
        bc2 = 1.0 - jnp.asarray(b2, jnp.float32) ** t

        def leaf(g, mu_s, nu_s):
            g32 = g.astype(jnp.float32)
            mu = b1 * load_moment(mu_s) + (1.0 - b1) * g32
            nu = b2 * load_moment(nu_s) + (1.0 - b2) * g32 * g32
            u = (mu / bc1) / (jnp.sqrt(nu / bc2 + eps_root) + eps)
            return (u.astype(g.dtype),
                    store_moment(mu, mu_s), store_moment(nu, nu_s))

        treedef = jax.tree.structure(updates)
        g_leaves = treedef.flatten_up_to(updates)
        out = [leaf(g, m, v) for g, m, v in zip(g_leaves, treedef.flatten_up_to(state.mu),
                                                  treedef.flatten_up_to(state.nu))]
        new_updates = treedef.unflatten([o[0] for o in out])
        new_mu = treedef.unflatten([o[1] for o in out])
        new_nu = treedef.unflatten([o[2] for o in out])
        return new_updates, ScaleByAdam8bitState(count=count, mu=new_mu, nu=new_nu)

    return optax.GradientTransformation(init_fn, update_fn)


def tree_nbytes(tree: Any) -> int:
    """Total bytes of the array leaves of `tree` (arrays or jax.ShapeDtypeStruct: no allocation needed)."""
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
