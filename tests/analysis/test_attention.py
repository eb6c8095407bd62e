"""Attention entropy and mass support against hand values and float64 NumPy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorank.analysis import attention


def _causal_softmax(key, shape, scale=2.0):
    """Random causal attention, float64 NumPy [..., T, T] (zero above the diagonal)."""
    t = shape[-1]
    logits = scale * np.asarray(jax.random.normal(key, shape), np.float64)
    logits = np.where(np.tril(np.ones((t, t))) > 0, logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_entropy(probs, mask):
    """-sum p log p over allowed entries, float64, one row at a time."""
    out = np.zeros(probs.shape[:-1])
    for idx in np.ndindex(*probs.shape[:-1]):
        row = [p for p, m in zip(probs[idx], mask[idx]) if m and p > 0]
        out[idx] = -sum(p * math.log(p) for p in row)
    return out


def test_uniform_causal_rows_have_entropy_log_of_allowed_keys():
    t = 6
    probs = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]  # row i uniform over keys 0..i
    got = np.asarray(attention.row_entropy(jnp.asarray(probs, jnp.float32), attention.causal_mask(t)))
    np.testing.assert_allclose(got, [math.log(i + 1) for i in range(t)], rtol=1e-6, atol=1e-7)
    assert got[0] == 0.0  # one allowed key


def test_uniform_rows_without_a_mask():
    probs = np.full((2, 3, 5), 0.2)
    np.testing.assert_allclose(np.asarray(attention.row_entropy(probs)), math.log(5), rtol=1e-6)


def test_one_hot_rows_have_zero_entropy_and_support_one():
    probs = np.eye(4)[[2, 0, 3, 3]][None]  # [1, 4, 4], one-hot rows
    np.testing.assert_array_equal(np.asarray(attention.row_entropy(probs)), 0.0)
    np.testing.assert_array_equal(np.asarray(attention.mass_support(probs, 0.9)), 1)


def test_a_row_with_one_allowed_key_has_entropy_exactly_zero():
    probs = np.array([[0.9999, 0.0001], [0.5, 0.5]], np.float32)  # row 0 is off by rounding
    got = np.asarray(attention.row_entropy(probs, attention.causal_mask(2)))
    assert got[0] == 0.0
    np.testing.assert_allclose(got[1], math.log(2), rtol=1e-6)


def test_row_entropy_matches_a_float64_reference_on_random_causal_attention():
    probs = _causal_softmax(jax.random.key(0), (2, 3, 7, 7))
    mask = np.broadcast_to(np.tril(np.ones((7, 7), bool)), probs.shape)
    got = np.asarray(attention.row_entropy(jnp.asarray(probs, jnp.float32), attention.causal_mask(7)))
    np.testing.assert_allclose(got, _np_entropy(probs, mask), rtol=1e-5, atol=1e-6)


def test_mass_outside_the_mask_is_ignored():
    probs = np.array([[0.25, 0.25, 0.5]])
    mask = np.array([[True, True, False]])
    np.testing.assert_allclose(np.asarray(attention.row_entropy(probs, mask)), [0.5 * math.log(4)], rtol=1e-6)


@pytest.mark.parametrize("skip_first", [0, 1, 3])
def test_mean_entropy_matches_a_float64_reference(skip_first):
    probs = _causal_softmax(jax.random.key(1), (3, 2, 8, 8))
    mask = np.broadcast_to(np.tril(np.ones((8, 8), bool)), probs.shape)
    want = _np_entropy(probs, mask)[..., skip_first:].mean()
    got = float(attention.mean_entropy(jnp.asarray(probs, jnp.float32), causal=True, skip_first=skip_first))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_mean_entropy_skip_first_only_drops_the_zero_row():
    probs = _causal_softmax(jax.random.key(2), (2, 1, 5, 5))
    all_rows = float(attention.mean_entropy(probs, skip_first=0))
    without_first = float(attention.mean_entropy(probs, skip_first=1))
    np.testing.assert_allclose(all_rows, without_first * 4 / 5, rtol=1e-6)  # row 0 contributes 0


def test_mean_entropy_without_causal_mask():
    probs = np.full((1, 1, 4, 4), 0.25)
    np.testing.assert_allclose(float(attention.mean_entropy(probs, causal=False, skip_first=0)), math.log(4),
                               rtol=1e-6)


def test_uniform_mean_entropy_by_hand_and_against_mean_entropy():
    np.testing.assert_allclose(attention.uniform_mean_entropy(3, skip_first=1), (math.log(2) + math.log(3)) / 2)
    np.testing.assert_allclose(attention.uniform_mean_entropy(3, skip_first=0), (math.log(2) + math.log(3)) / 3)
    np.testing.assert_allclose(attention.uniform_mean_entropy(5, causal=False), math.log(5))
    t = 9
    probs = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    np.testing.assert_allclose(float(attention.mean_entropy(probs[None, None])), attention.uniform_mean_entropy(t),
                               rtol=1e-6)


@pytest.mark.parametrize("row, mass, keys", [
    ([0.5, 0.3, 0.15, 0.05], 0.9, 3),  # 0.5 + 0.3 = 0.8 < 0.9 <= 0.95
    ([0.05, 0.15, 0.5, 0.3], 0.9, 3),  # order does not matter
    ([0.95, 0.05, 0.0, 0.0], 0.9, 1),
    ([0.25, 0.25, 0.25, 0.25], 0.9, 4),  # 0.75 < 0.9
    ([0.25, 0.25, 0.25, 0.25], 0.5, 2),  # exactly half: no extra key from rounding
    ([0.1] * 10, 0.9, 9),
    ([0.4, 0.3, 0.2, 0.1], 1.0, 4),
])
def test_mass_support_on_hand_made_rows(row, mass, keys):
    got = attention.mass_support(np.asarray([row], np.float32), mass)
    assert got.dtype == jnp.int32
    assert int(got[0]) == keys


def test_mass_support_with_a_mask_counts_only_allowed_keys():
    probs = np.array([[0.3, 0.3, 0.4]])
    assert int(attention.mass_support(probs, 0.9, np.array([[True, True, False]]))[0]) == 2  # 0.6 < 0.9: all allowed
    assert int(attention.mass_support(probs, 0.5, np.array([[True, True, False]]))[0]) == 2


def test_mean_mass_support_of_uniform_causal_attention():
    t = 12
    probs = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    want = np.mean([math.ceil(0.9 * (i + 1) - 1e-9) for i in range(1, t)])
    np.testing.assert_allclose(float(attention.mean_mass_support(probs[None, None], 0.9)), want, rtol=1e-6)
    np.testing.assert_allclose(attention.uniform_mean_mass_support(t, 0.9), want, rtol=1e-12)
    assert attention.uniform_mean_mass_support(4, 0.5, skip_first=0) == np.mean([1, 1, 2, 2])  # ceil(0.5 n), by hand
    assert attention.uniform_mean_mass_support(10, 0.9, causal=False) == 9.0
    eye = np.broadcast_to(np.eye(t), (2, 3, t, t))
    assert float(attention.mean_mass_support(eye, 0.9)) == 1.0


def test_diagonal_mass_by_hand():
    t = 5
    previous = np.zeros((t, t))
    previous[0, 0] = 1.0
    previous[np.arange(1, t), np.arange(t - 1)] = 1.0  # every query but the first looks one step back
    assert float(attention.diagonal_mass(previous[None], offset=1)) == 1.0
    assert float(attention.diagonal_mass(previous[None], offset=0)) == 0.0
    uniform = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    np.testing.assert_allclose(float(attention.diagonal_mass(uniform, 0)), np.mean([1 / 2, 1 / 3, 1 / 4, 1 / 5]),
                               rtol=1e-6)
    np.testing.assert_allclose(float(attention.diagonal_mass(uniform, 2, skip_first=0)), np.mean([1 / 3, 1 / 4, 1 / 5]),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="offset=5 and skip_first=1 leave no query row of the 5"):
        attention.diagonal_mass(uniform, 5)


def test_jit_matches_eager():
    probs = jnp.asarray(_causal_softmax(jax.random.key(3), (2, 2, 6, 6)), jnp.float32)
    for fn in (attention.mean_entropy, attention.mean_mass_support):
        np.testing.assert_allclose(float(jax.jit(fn)(probs)), float(fn(probs)), rtol=1e-6)


def test_bad_arguments_are_clear_errors():
    probs = np.full((1, 1, 3, 3), 1 / 3)
    with pytest.raises(ValueError, match="skip_first=3 leaves no query row of the 3"):
        attention.mean_entropy(probs, skip_first=3)
    with pytest.raises(ValueError, match=r"mass must be a number in \(0, 1\], got 0.0"):
        attention.mass_support(probs, 0.0)
    with pytest.raises(ValueError, match="mass must be"):
        attention.mass_support(probs, 1.5)
    with pytest.raises(ValueError, match="causal must be one of"):
        attention.mean_entropy(probs, causal="yes")
