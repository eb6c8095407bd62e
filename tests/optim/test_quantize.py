"""Blockwise dynamic 8-bit quantization and 8-bit Adam against NumPy references and closed forms."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lorank.optim import quantize as q8


@pytest.mark.parametrize("signed", [True, False])
def test_code_map_structure(signed):
    table = q8.dynamic_code_map(signed).astype(np.float64)
    assert table.shape == (256,) and np.all(np.diff(table) > 0)
    assert 0.0 in table and table[-1] == 1.0
    if signed:
        pos, neg = table[table > 0], -table[table < 0]
        np.testing.assert_allclose(np.sort(pos[:-1]), np.sort(neg))  # symmetric except for +1
    positives = table[(table > 0) & (table < 1)]
    # decade e (values in [0.1, 1) * 10^(e-6)) holds 2^e (signed) or 2^(e+1) (unsigned) codes
    for e in range(7):
        lo, hi = 0.1 * 10.0 ** (e - 6), 10.0 ** (e - 6)
        count = np.sum((positives >= lo) & (positives < hi))
        assert count == (2**e if signed else 2 ** (e + 1)), (e, count)


def np_quantize(x, signed, block):
    """Reference: nearest code by brute force over the map, per-block absmax (float64)."""
    table = q8.dynamic_code_map(signed).astype(np.float64)
    flat = np.asarray(x, np.float64).ravel()
    out = np.empty_like(flat)
    for start in range(0, flat.size, block):
        chunk = flat[start:start + block]
        absmax = np.abs(chunk).max()
        if absmax == 0:
            out[start:start + block] = 0.0
            continue
        idx = np.argmin(np.abs(chunk[:, None] / absmax - table[None, :]), axis=1)
        out[start:start + block] = table[idx] * absmax
    return out.reshape(np.shape(x))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape, block", [((1000,), 256), ((37, 19), 64), ((4, 3, 50), 128)])
def test_roundtrip_matches_nearest_code_and_bound(signed, shape, block):
    rng = np.random.default_rng(0)
    x = rng.standard_cauchy(size=shape).astype(np.float32)  # heavy tails: many decades per block
    if not signed:
        x = np.abs(x)
    q = jax.jit(q8.quantize, static_argnames=("signed", "block_size"))(jnp.asarray(x), signed=signed,
                                                                       block_size=block)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == shape
    assert q.scales.shape == (math.ceil(x.size / block),)
    y = np.asarray(jax.jit(q8.dequantize)(q))
    blockmax = np.repeat(np.asarray(q.scales), block)[:x.size].reshape(shape)
    # ours is a nearest code (ties within float32 rounding of a decision point may go either way)
    ref = np_quantize(x, signed, block)
    assert np.all(np.abs(y - x) <= np.abs(ref - x) + 1e-6 * blockmax)
    assert np.mean(y == ref.astype(np.float32)) > 0.99
    assert np.all(np.abs(y - x) <= (q8.quantization_bound(signed) + 1e-6) * blockmax)  # + float32 rounding


def test_codes_roundtrip_exactly_and_zero_block():
    quantize = jax.jit(q8.quantize, static_argnames=("signed", "block_size"))
    table = q8.dynamic_code_map(True)
    x = jnp.asarray(np.concatenate([table * 3.0, np.zeros(44, np.float32)]))  # every code; absmax 3
    q = quantize(x, signed=True, block_size=300)
    np.testing.assert_array_equal(np.asarray(q.codes[:256]), np.arange(256))
    roundtrip = jax.jit(q8.dequantize)
    np.testing.assert_allclose(roundtrip(q), x, rtol=1e-7)
    z = quantize(jnp.zeros((300,)), signed=True, block_size=300)
    np.testing.assert_array_equal(roundtrip(z), np.zeros(300))


class NumpyAdam8bit:
    """Adam whose stored moments go through the reference quantizer after each step (float64 math)."""

    def __init__(self, b1, b2, eps, block, min_size):
        self.b1, self.b2, self.eps, self.block, self.min_size = b1, b2, eps, block, min_size
        self.t, self.m, self.v = 0, {}, {}

    def update(self, grads):
        self.t += 1
        out = {}
        for k, g in grads.items():
            g = np.asarray(g, np.float64)
            m = self.b1 * self.m.get(k, 0.0) + (1 - self.b1) * g
            v = self.b2 * self.v.get(k, 0.0) + (1 - self.b2) * g * g
            out[k] = (m / (1 - self.b1**self.t)) / (np.sqrt(v / (1 - self.b2**self.t)) + self.eps)
            if g.size >= self.min_size:
                m, v = np_quantize(m, True, self.block), np_quantize(v, False, self.block)
            self.m[k], self.v[k] = m, v
        return out


def test_adam_8bit_matches_reference_and_tracks_float_adam():
    shapes = {"w": (48, 40), "b": (40,)}
    tx = q8.scale_by_adam_8bit(b1=0.5, b2=0.75, block_size=64, min_size=100)
    ref = NumpyAdam8bit(0.5, 0.75, 1e-8, 64, 100)
    adam = optax.scale_by_adam(b1=0.5, b2=0.75)
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    state, astate = tx.init(params), adam.init(params)
    update, aupdate = jax.jit(tx.update), jax.jit(adam.update)
    rng = np.random.default_rng(1)
    for _ in range(6):
        g = {k: rng.normal(size=s).astype(np.float32) + 0.5 for k, s in shapes.items()}
        u, state = update(jax.tree.map(jnp.asarray, g), state)
        ua, astate = aupdate(jax.tree.map(jnp.asarray, g), astate)
        expected = ref.update(g)
        for k in shapes:
            np.testing.assert_allclose(u[k], expected[k], rtol=1e-4, atol=1e-5)
        # 8-bit moments stay close to float32 Adam's (same gradients)
        rel = np.linalg.norm(np.asarray(u["w"]) - np.asarray(ua["w"])) / np.linalg.norm(ua["w"])
        assert rel < 0.05, rel
    chex.assert_trees_all_close(u["b"], ua["b"], rtol=1e-6)  # small leaf: not quantized, Adam exactly
    assert isinstance(state.mu["w"], q8.QuantizedArray) and not isinstance(state.mu["b"], q8.QuantizedArray)


def test_adam_8bit_state_bytes_closed_form():
    params = {"w": jax.ShapeDtypeStruct((4096, 1000), jnp.float32), "b": jax.ShapeDtypeStruct((1000,), jnp.float32)}
    state = jax.eval_shape(q8.scale_by_adam_8bit(block_size=256, min_size=4096).init, params)
    n = 4096 * 1000
    expected = 2 * (n + 4 * math.ceil(n / 256)) + 2 * 4 * 1000 + 4  # codes + scales, small fp32, count
    assert q8.tree_nbytes(state) == expected
    fp32 = q8.tree_nbytes(jax.eval_shape(optax.scale_by_adam().init, params))
    assert abs(q8.tree_nbytes(state) / fp32 - 0.25) < 0.01


def test_adam_8bit_bad_input():
    with pytest.raises(ValueError, match="b1"):
        q8.scale_by_adam_8bit(b1=1.2)
    with pytest.raises(ValueError, match="block_size"):
        q8.scale_by_adam_8bit(block_size=0)
    with pytest.raises(ValueError, match="min_size"):
        q8.scale_by_adam_8bit(min_size=-1)
