"""experiments.joma_text: the MLP stable ranks it measures (against NumPy float64), the entropy turn it
reports, its clipped Adam (against a NumPy transcription of PyTorch's clip_grad_norm_ + Adam), its config
checks, and one tiny run whose last recorded stable ranks are those of the trained kernels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from experiments import joma_text
from lorank.train import attention_lm
from lorank import config_files
from lorank.models import attention as attention_model

CONFIG = "configs/joma_text.py"


def np_stable_rank(m) -> float:
    s = np.linalg.svd(np.asarray(m, np.float64), compute_uv=False)
    return float(np.sum(s**2) / s[0] ** 2)


def with_singular_values(key, rows, cols, s):
    """A [rows, cols] float32 matrix with singular values `s` (random orthonormal factors)."""
    k1, k2 = jax.random.split(key)
    u, _ = np.linalg.qr(np.asarray(jax.random.normal(k1, (rows, rows)), np.float64))
    v, _ = np.linalg.qr(np.asarray(jax.random.normal(k2, (cols, cols)), np.float64))
    d = np.zeros((rows, cols))
    d[np.arange(len(s)), np.arange(len(s))] = s
    return (u @ d @ v.T).astype(np.float32)


def mlp_params(ups, downs):
    return {f"layers_{i}": {"mlp": {"up": {"kernel": u, "bias": np.zeros(u.shape[1], np.float32)},
                                    "down": {"kernel": d, "bias": np.zeros(d.shape[1], np.float32)}}}
            for i, (u, d) in enumerate(zip(ups, downs))}


def test_mlp_stable_ranks_are_those_of_the_up_and_down_kernels_of_each_layer():
    keys = jax.random.split(jax.random.key(0), 4)
    # hand-computed: singular values (2, 1, 1) -> (4 + 1 + 1) / 4 = 1.5; (1, 1, 1, 1) -> 4; (3, 0, ...) -> 1
    up0 = with_singular_values(keys[0], 6, 3, [2.0, 1.0, 1.0])
    up1 = with_singular_values(keys[1], 6, 4, [1.0, 1.0, 1.0, 1.0])
    down0 = with_singular_values(keys[2], 3, 6, [3.0])
    down1 = np.asarray(jax.random.normal(keys[3], (4, 6)), np.float32)
    params = mlp_params([up0, up1], [down0, down1])
    out = jax.jit(joma_text.mlp_stable_ranks(2))(params)
    assert set(out) == {"mlp_up_srank/layer_0", "mlp_up_srank/layer_1", "mlp_down_srank/layer_0",
                        "mlp_down_srank/layer_1"}
    np.testing.assert_allclose(out["mlp_up_srank/layer_0"], 1.5, rtol=1e-5)
    np.testing.assert_allclose(out["mlp_up_srank/layer_1"], 4.0, rtol=1e-5)
    np.testing.assert_allclose(out["mlp_down_srank/layer_0"], 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["mlp_down_srank/layer_1"], np_stable_rank(down1), rtol=1e-5)
    # boxed parameters (as the model initializes them) give the same numbers
    boxed = jax.tree.map(lambda x: nn.Partitioned(jnp.asarray(x), names=(None,) * np.ndim(x)), params)
    boxed_out = joma_text.mlp_stable_ranks(2)(boxed)
    for k, v in out.items():
        np.testing.assert_allclose(boxed_out[k], v, rtol=1e-6)


def test_mlp_stable_ranks_of_an_initialized_model_match_numpy_float64():
    """A 3-block model with an MLP twice as wide as the stream (up [16, 32], down [32, 16])."""
    model = attention_model.Transformer(attention_model.TransformerConfig(width=16, num_layers=3, mlp_ratio=2.0,
                                                                          max_len=8))
    params = nn.unbox(attention_model.init_params(model, jax.random.key(3), 8))
    out = joma_text.mlp_stable_ranks(3)(params)
    for i in range(3):
        mlp = params[f"layers_{i}"]["mlp"]
        assert mlp["up"]["kernel"].shape == (16, 32)
        np.testing.assert_allclose(out[f"mlp_up_srank/layer_{i}"], np_stable_rank(mlp["up"]["kernel"]), rtol=1e-5)
        np.testing.assert_allclose(out[f"mlp_down_srank/layer_{i}"], np_stable_rank(mlp["down"]["kernel"]),
                                   rtol=1e-5)
    ups = [float(out[f"mlp_up_srank/layer_{i}"]) for i in range(3)]
    assert len(set(ups)) == 3  # each layer's own kernel, not one layer's three times


def test_mlp_stable_ranks_refuse_a_missing_layer():
    params = mlp_params([np.eye(3, dtype=np.float32)], [np.eye(3, dtype=np.float32)])
    with pytest.raises(ValueError, match="layers_1"):
        joma_text.mlp_stable_ranks(2)(params)


def test_entropy_turn_of_a_drop_then_bounce():
    steps = [0, 10, 20, 30, 40]
    turn = joma_text.entropy_turn(steps, [3.0, 2.5, 2.0, 2.2, 2.4], threshold=0.1)
    assert turn["min"] == 2.0 and turn["min_step"] == 20
    np.testing.assert_allclose([turn["drop"], turn["rise"], turn["rebound"]], [1.0, 0.4, 0.4])
    assert turn["bounced"] and (turn["rebound_from"], turn["rebound_to"]) == (20, 40)


def test_entropy_turn_of_a_monotone_fall_and_of_a_transient_dip():
    steps = [0, 10, 20, 30, 40]
    fall = joma_text.entropy_turn(steps, [3.0, 2.8, 2.6, 2.4, 2.2], threshold=0.1)
    assert not fall["bounced"] and fall["rise"] == 0 and fall["rebound"] == 0 and fall["min_step"] == 40
    # a dip at step 10 and a rebound to step 20, then a fall below it: no bounce after the minimum,
    # but a rebound of 0.3 from step 10 to step 20
    dip = joma_text.entropy_turn(steps, [3.0, 2.6, 2.9, 2.3, 2.1], threshold=0.1)
    assert not dip["bounced"] and dip["min_step"] == 40
    np.testing.assert_allclose(dip["rebound"], 0.3)
    assert (dip["rebound_from"], dip["rebound_to"]) == (10, 20)
    # a rise smaller than the threshold is no bounce
    assert not joma_text.entropy_turn(steps, [3.0, 2.5, 2.0, 2.05, 2.05], threshold=0.1)["bounced"]
    with pytest.raises(ValueError, match="one value per step"):
        joma_text.entropy_turn(steps, [3.0], threshold=0.1)


def torch_clip_adam(grads, lr, b1, b2, eps, max_norm):
    """NumPy float64 transcription of torch.nn.utils.clip_grad_norm_ then torch.optim.Adam: the updates."""
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        if max_norm > 0:
            g = g * min(1.0, max_norm / (np.linalg.norm(g) + 1e-6))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        out.append(-lr * m_hat / (np.sqrt(v_hat) + eps))
    return out


@pytest.mark.parametrize("clip_norm", [0.5, 0.0])
def test_optimizer_is_clipped_adam(clip_norm):
    o = ConfigDict({"lr": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "clip_norm": clip_norm})
    grads = [np.array([3.0, -4.0, 0.1]), np.array([0.01, 0.02, -0.03]), np.array([-2.0, 1.0, 5.0])]
    tx = joma_text.optimizer(o)
    params = jnp.zeros(3)
    state = tx.init(params)
    for g, want in zip(grads, torch_clip_adam(grads, o.lr, o.b1, o.b2, o.eps, clip_norm)):
        update, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
        np.testing.assert_allclose(update, want, rtol=2e-4, atol=1e-9)


def test_optimizer_refuses_a_bad_learning_rate():
    o = ConfigDict({"lr": 0.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "clip_norm": 0.5})
    with pytest.raises(ValueError, match="optim.lr"):
        joma_text.optimizer(o)


def test_config_checks_name_the_bad_field():
    config = config_files.load_module(CONFIG).get_config("layers_smoke")
    for field, value, match in (("depths", (), "depths is empty"), ("depths", (1, 1), "repeats"),
                                ("depths", (0,), "depths entry")):
        bad = ConfigDict(config.to_dict())
        bad[field] = value
        with pytest.raises(ValueError, match=match):
            joma_text.check_config(bad)
    bad = ConfigDict(config.to_dict())
    bad.analysis.snapshot_steps = (7,)  # attention_lm's check of the analysis section applies
    with pytest.raises(ValueError, match="snapshot_steps"):
        joma_text.check_config(bad)


def test_a_tiny_run_records_the_stable_ranks_of_its_trained_kernels(tmp_path):
    config = config_files.load_module(CONFIG).get_config("layers_smoke")
    config.model.width = config.model.max_len = config.data.seq_len = 8
    config.train.update(steps=4, batch_size=8, log_every=2, eval_every=2, eval_batches=1, checkpoint_every=4)
    config.analysis.update(every=2, eval_rows=8)  # 8 rows: the tests' 8 fake devices
    config.optim.lr = 1e-2  # large enough for the kernels to move in 4 steps
    data, held_out = attention_lm.load_data(config, 8, 8)
    result, state = joma_text.train_depth(config, 2, data, held_out, str(tmp_path), log=lambda _: None)
    assert result["steps"] == [0, 2, 4] and result["depth"] == 2
    assert len(result["entropy"]) == len(result["up_srank"]) == len(result["down_srank"]) == 2
    params = nn.unbox(state.params)
    for i in range(2):
        mlp = params[f"layers_{i}"]["mlp"]
        np.testing.assert_allclose(result["up_srank"][i][-1], np_stable_rank(mlp["up"]["kernel"]), rtol=1e-4)
        np.testing.assert_allclose(result["down_srank"][i][-1], np_stable_rank(mlp["down"]["kernel"]), rtol=1e-4)
    assert result["up_srank"][0][0] != result["up_srank"][0][-1]  # the record follows training
    # started again with the same workdir, the finished run is read back, not retrained
    again, state_again = joma_text.train_depth(config, 2, data, held_out, str(tmp_path), log=lambda _: None)
    assert again["entropy"] == result["entropy"] and again["up_srank"] == result["up_srank"]
    assert again["seconds"] >= result["seconds"]  # the loop time of both calls
    np.testing.assert_array_equal(nn.unbox(state_again.params)["layers_1"]["mlp"]["up"]["kernel"],
                                  params["layers_1"]["mlp"]["up"]["kernel"])
