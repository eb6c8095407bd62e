"""Non-contrastive tasks: EMA, the running correlation and the predictor it writes follow their recursions;
a resumed BYOL run (EMA target and F in the checkpoint) equals an uninterrupted one; 8 devices equal 1;
bad input fails early. (That the no-predictor run collapses and DirectPred's does not is the smoke
headline of configs/bench_noncontrastive.py in tests/test_configs.py.)"""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorank.data import augment
from lorank.dynamics import directpred
from lorank.models import resnet, heads
from lorank.train import loop as loop_lib, mesh as mesh_lib, noncontrastive, ssl


def tiny_encoder():
    return ssl.Encoder(resnet.backbone("small_convnet", width=4, widths=(1, 2)), heads.projector("mlp2", hidden=16,
                                                                                                  out=8))


def images(n=16, size=8, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, size, size, 3)).astype(np.float32)


def test_ema_update_and_its_cosine_schedule():
    rng = np.random.default_rng(0)
    target, online = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    got = ssl.ema_update({"w": jnp.asarray(target)}, {"w": jnp.asarray(online)}, jnp.float32(0.9))
    np.testing.assert_allclose(np.asarray(got["w"]), 0.9 * target + 0.1 * online, rtol=1e-6, atol=1e-6)
    cfg = ssl.NonContrastiveConfig(ema_rate=0.99, ema_schedule="cosine")
    rates = [float(ssl.ema_rate(cfg, jnp.int32(k), 100)) for k in (0, 50, 100)]
    np.testing.assert_allclose(rates, [0.99, 1 - 0.01 * 0.5, 1.0], rtol=1e-6)
    assert float(ssl.ema_rate(ssl.NonContrastiveConfig(ema_rate=0.99), jnp.int32(70), 100)) == pytest.approx(0.99)


def test_cosine_distance_against_numpy():
    rng = np.random.default_rng(1)
    p, t = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    cos = np.sum(p * t, 1) / np.linalg.norm(p, axis=1) / np.linalg.norm(t, axis=1)
    assert float(ssl.cosine_distance(jnp.asarray(p), jnp.asarray(t))) == pytest.approx(np.mean(2 - 2 * cos), rel=1e-5)


@pytest.mark.parametrize("freq", [1, 2])
def test_update_extra_moves_the_target_the_correlation_and_writes_the_predictor(freq):
    cfg = ssl.NonContrastiveConfig(predictor="directpred", rho=0.3, freq=freq, ema_rate=0.9)
    x = images()
    task = ssl.make_task(tiny_encoder(), cfg, augment.SimCLRAugment(), lambda step, rows=None: {"images": x},
                         image_shape=x.shape[1:], total_steps=10)
    key = jax.random.key(0)
    boxed = task.init_params(key)
    params, extra = nn.unbox(boxed), nn.unbox(task.init_extra(key, boxed))
    _, aux = jax.jit(task.loss_fn)(params, extra, {"images": jnp.asarray(x)}, jax.random.key(1))
    f = np.asarray(aux["f"], np.float64)
    new_params, new_extra = task.update_extra(jnp.int32(1), params, aux["extra"], aux)
    np.testing.assert_allclose(np.asarray(new_extra["corr"]), f.T @ f / len(f), rtol=1e-5, atol=1e-6)
    for t, t0, o in zip(jax.tree.leaves(new_extra["target"]["params"]), jax.tree.leaves(extra["target"]["params"]),
                        jax.tree.leaves(params["online"])):
        np.testing.assert_allclose(np.asarray(t), 0.9 * np.asarray(t0) + 0.1 * np.asarray(o), rtol=1e-5, atol=1e-7)
    w_p = np.asarray(ssl.predictor_kernel(new_params["predictor"]))
    if freq == 1:
        np.testing.assert_allclose(w_p, np.asarray(directpred.directpred_predictor(new_extra["corr"], eps=0.01)),
                                   rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(w_p, np.asarray(ssl.predictor_kernel(params["predictor"])))
    second_params, second = task.update_extra(jnp.int32(2), new_params, new_extra, aux)
    np.testing.assert_allclose(np.asarray(second["corr"]), 0.3 * np.asarray(new_extra["corr"]) + 0.7 * f.T @ f / len(f),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ssl.predictor_kernel(second_params["predictor"])),
                               np.asarray(directpred.directpred_predictor(second["corr"], eps=0.01)), rtol=1e-5,
                               atol=1e-6)


def test_simsiam_without_stop_gradient_differs_in_its_gradient_only():
    x = jnp.asarray(images())
    grads = {}
    for stop in (True, False):
        cfg = ssl.NonContrastiveConfig(method="simsiam", predictor="linear", stop_gradient=stop)
        task = ssl.make_task(tiny_encoder(), cfg, augment.SimCLRAugment(), lambda step, rows=None: None,
                             image_shape=x.shape[1:], total_steps=10)
        boxed = task.init_params(jax.random.key(0))
        params, extra = nn.unbox(boxed), nn.unbox(task.init_extra(jax.random.key(0), boxed))
        def loss(p, task=task, extra=extra):
            return task.loss_fn(p, extra, {"images": x}, jax.random.key(2))[0]

        grads[stop] = (float(jax.jit(loss)(params)), jax.jit(jax.grad(loss))(params))
    assert grads[True][0] == grads[False][0]
    delta = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads[True][1]),
                                                             jax.tree.leaves(grads[False][1])))
    assert delta > 1e-6


@pytest.mark.parametrize("kwargs, name", [({"rho": 1.0}, "rho"), ({"rho": -0.1}, "rho"), ({"freq": 0}, "freq"),
                                          ({"eps": -0.01}, "eps"), ({"ema_rate": 1.5}, "ema_rate"),
                                          ({"predictor": "deep"}, "predictor"),
                                          ({"stop_gradient": False}, "simsiam")])
def test_bad_hyperparameters_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ssl.NonContrastiveConfig(**kwargs)


def records(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_resumed_byol_run_equals_an_uninterrupted_one_and_eight_devices_equal_one(tmp_path, small_ssl_config):
    whole = noncontrastive.run(small_ssl_config("noncontrastive.py"), str(tmp_path / "whole"), log=lambda _: None)
    noncontrastive.run(small_ssl_config("noncontrastive.py"), str(tmp_path / "split"), stop_at=4, log=lambda _: None)
    resumed = noncontrastive.run(small_ssl_config("noncontrastive.py"), str(tmp_path / "split"), log=lambda _: None)
    assert resumed["loss"] == whole["loss"] and resumed["probe/linear_acc"] == whole["probe/linear_acc"]
    losses = [r["loss"] for r in records(tmp_path / "whole") if "loss" in r]
    assert losses == [r["loss"] for r in records(tmp_path / "split") if "loss" in r]
    config = small_ssl_config("noncontrastive.py")
    task, tx, _ = noncontrastive.build(config, noncontrastive.load_data(config.data))
    one_device = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
    loop_lib.run(task, tx, loop_lib.LoopConfig.from_config(config.train), one_device, str(tmp_path / "one"),
                 log=lambda _: None)
    np.testing.assert_allclose([r["loss"] for r in records(tmp_path / "one") if "loss" in r], losses, rtol=2e-4)
