"""Projector / predictor heads: shapes of the papers' heads, train and eval BatchNorm against a
NumPy float64 reference, the factory, refused inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorank.models import heads as H


def shapes(tree):
    return jax.tree.map(lambda x: tuple(x.shape), tree)


@pytest.mark.parametrize("preset,widths", [
    ("simclr_projector", [(64, 512), (512, 128)]),
    ("byol_predictor", [(64, 4096), (4096, 256)]),
    ("simsiam_projector", [(64, 2048), (2048, 2048), (2048, 2048)]),
])
def test_paper_heads_shapes(preset, widths):
    head = H.MLPHead(**H.PRESETS[preset])
    variables = jax.eval_shape(lambda k: nn.unbox(head.init(k, jnp.zeros((2, 64)), train=False)), jax.random.key(0))
    params = jax.tree.map(lambda x: x.shape, variables["params"])
    assert [params[f"dense{i}"]["kernel"] for i in range(len(widths))] == widths
    assert "bias" not in params["dense0"]  # a Linear followed by BatchNorm has no bias
    last = params[f"dense{len(widths) - 1}"]
    assert ("bias" in last) == (not H.PRESETS[preset].get("last_bn", False))
    out = jax.eval_shape(lambda v: head.apply(v, jnp.zeros((2, 64)), train=False), variables)
    assert out.shape == (2, widths[-1][1])


def _bn(y, mean, var, scale=1.0, bias=0.0):
    return (y - mean) / np.sqrt(var + 1e-5) * scale + bias


def test_mlp_head_train_and_eval_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    head = H.MLPHead(hidden=7, out=3)
    variables = nn.unbox(head.init(jax.random.key(1), x, train=False))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    x64 = x.astype(np.float64)
    h = x64 @ p["dense0"]["kernel"]
    out, updates = head.apply(variables, x, train=True, mutable=["batch_stats"])
    ref = np.maximum(_bn(h, h.mean(0), h.var(0), p["bn0"]["scale"], p["bn0"]["bias"]), 0) @ p["dense1"]["kernel"]
    np.testing.assert_allclose(out, ref + p["dense1"]["bias"], rtol=1e-4, atol=1e-5)
    stats = updates["batch_stats"]["bn0"]
    np.testing.assert_allclose(stats["mean"], 0.1 * h.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * h.var(0), rtol=1e-4)
    # eval mode uses the running statistics
    eval_out = head.apply({**variables, **updates}, x, train=False)
    ref = np.maximum(_bn(h, np.asarray(stats["mean"]), np.asarray(stats["var"]), p["bn0"]["scale"], p["bn0"]["bias"]),
                     0) @ p["dense1"]["kernel"]
    np.testing.assert_allclose(eval_out, ref + p["dense1"]["bias"], rtol=1e-4, atol=1e-5)


def test_last_bn_without_affine_standardizes_outputs():
    x = np.random.default_rng(2).normal(size=(16, 5)).astype(np.float32)
    head = H.MLPHead(hidden=8, out=4, last_bn=True)
    variables = nn.unbox(head.init(jax.random.key(0), x, train=False))
    assert set(variables["params"]) == {"dense0", "bn0", "dense1"} and "bn1" in variables["batch_stats"]
    out, _ = head.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.var(0), 1.0, rtol=1e-2)


def test_without_batch_norm_and_one_layer():
    x = np.ones((3, 5), np.float32)
    plain = H.MLPHead(hidden=4, out=2, batch_norm=False)
    variables = nn.unbox(plain.init(jax.random.key(0), x, train=False))
    assert "batch_stats" not in variables and set(shapes(variables["params"])["dense0"]) == {"kernel", "bias"}
    single = H.MLPHead(out=2, num_layers=1)
    assert set(single.init(jax.random.key(0), x, train=False)["params"]) == {"dense0"}


def test_projector_factory():
    x = np.random.default_rng(3).normal(size=(4, 6)).astype(np.float32)
    mlp = H.projector("mlp2", hidden=8, out=3)
    assert isinstance(mlp, H.MLPHead) and (mlp.hidden, mlp.out, mlp.num_layers) == (8, 3, 2)
    linear = H.projector("linear", out=5)
    variables = nn.unbox(linear.init(jax.random.key(0), x))
    assert shapes(variables["params"]) == {"dense": {"kernel": (6, 5)}}
    np.testing.assert_allclose(linear.apply(variables, x, train=True), x @ np.asarray(
        variables["params"]["dense"]["kernel"]), rtol=1e-5, atol=1e-6)
    none = H.projector("none")
    np.testing.assert_array_equal(none.apply(none.init(jax.random.key(0), x), x, train=True), x)
    assert H.projector_dim("none", 6) == 6 and H.projector_dim("mlp2", 6, out=3) == 3


def test_bad_names_fields_and_inputs_are_named():
    with pytest.raises(ValueError, match="mlp3"):
        H.projector("mlp3")
    with pytest.raises(ValueError, match="hidden"):
        H.projector("mlp2", hidden=0)
    with pytest.raises(ValueError, match="out"):
        H.projector("linear", out=-1)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        H.MLPHead().init(jax.random.key(0), jnp.zeros((2, 3, 4)), train=False)
