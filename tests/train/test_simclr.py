"""Contrastive tasks: the task's loss is the library loss of the encoder's projections of the step's views;
DirectCLR sees the first d0 features; 8 devices equal 1 (loss, BatchNorm statistics, one step); a resumed
run equals an uninterrupted one; bad input fails before compute; LARS and SGD-W follow their rules; GaLore
on conv kernels holds less state than Adam. (That a smoke run's probe beats the untrained network is the
headline of configs/ssl.py:smoke in tests/test_configs.py.)"""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from lorank import config_files, contrastive
from lorank.data import augment
from lorank.models import heads, resnet
from lorank.train import contrastive as driver, loop as loop_lib, mesh as mesh_lib, optimizers, simclr, ssl

REPO = pathlib.Path(__file__).resolve().parents[2]


def encoder(projector="mlp2"):
    return ssl.Encoder(resnet.backbone("small_convnet", width=4, widths=(1, 2)),
                       heads.projector(projector, hidden=16, out=8))


def images(n=16, size=8, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, size, size, 3)).astype(np.float32)


AUG = augment.SimCLRAugment(crop_area=(0.3, 1.0))


def _task(cfg, enc, x):
    return simclr.make_task(enc, cfg, AUG, lambda step, rows: {"images": x}, image_shape=x.shape[1:])


@pytest.mark.parametrize("loss, projector, d0", [("infonce", "mlp2", 0), ("r_s", "linear", 0),
                                                 ("infonce", "none", 3)])
def test_task_loss_is_the_library_loss_of_the_views(loss, projector, d0):
    cfg = simclr.SimCLRConfig(loss=loss, tau=0.3, directclr_dim=d0)
    enc, x = encoder(projector), images()
    task = _task(cfg, enc, x)
    key = jax.random.key(1)
    params = task.init_params(key)
    extra = task.init_extra(key, params)
    rng = jax.random.key(7)
    got, aux = task.loss_fn(params, extra, {"images": x}, rng)
    v1, v2 = augment.two_views(rng, x, AUG)
    variables = {"params": params, "batch_stats": extra["stats"]}
    (h1, z1), s1 = enc.apply(variables, v1, train=True, mutable=["batch_stats"])
    (h2, z2), s2 = enc.apply({"params": params, **s1}, v2, train=True, mutable=["batch_stats"])
    if d0:
        want = contrastive.family_loss("infonce", h1[:, :d0], h2[:, :d0], tau=0.3)
    else:
        want = contrastive.contrastive_loss(loss, z1, z2, tau=0.3)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), aux["extra"]["stats"],
                 s2["batch_stats"])


def npz_config(small_ssl_config, **ssl_fields):
    """configs/ssl.py's smoke config on the fixture's small npz of images (warmup 2 of its 8 steps)."""
    c = small_ssl_config("ssl.py", **ssl_fields)
    c.optim.warmup_steps = 2
    return c


def records(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_resumed_run_equals_an_uninterrupted_one_and_eight_devices_equal_one(tmp_path, small_ssl_config):
    whole = driver.run(npz_config(small_ssl_config), str(tmp_path / "whole"), log=lambda _: None)
    driver.run(npz_config(small_ssl_config), str(tmp_path / "split"), stop_at=4, log=lambda _: None)
    resumed = driver.run(npz_config(small_ssl_config), str(tmp_path / "split"), log=lambda _: None)
    assert resumed["loss"] == whole["loss"] and resumed["probe/linear_acc"] == whole["probe/linear_acc"]
    losses = [r["loss"] for r in records(tmp_path / "whole") if "loss" in r]
    assert losses == [r["loss"] for r in records(tmp_path / "split") if "loss" in r]
    assert sorted(driver.load_spectra(str(tmp_path / "split"))) == [0, 4, 8]  # spectra of both invocations kept

    config = npz_config(small_ssl_config)
    data = driver.noncontrastive.load_data(config.data)
    task, tx, _ = driver.build(config, data)
    loop_config = loop_lib.LoopConfig.from_config(config.train)
    states = {}
    for devices in (8, 1):
        mesh = mesh_lib.make_mesh({"data": devices}, devices=jax.devices()[:devices])
        plan = loop_lib.joint_step_plan(task, tx, mesh, jax.random.key(0))
        state = loop_lib.init_on_mesh(plan.init_state, plan.shardings, jax.random.key(0))
        step = jax.jit(plan.step, in_shardings=(plan.shardings, mesh_lib.batch_sharding(mesh, leading_dims=1)))
        batch = mesh_lib.global_batch(mesh, task.train_batch(0, None), (1, loop_config.batch_size))
        states[devices] = jax.device_get(step(state, batch))
    (s8, m8), (s1, m1) = states[8], states[1]
    assert float(m8["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
    for a, b in ((s8.extra, s1.extra), (s8.params, s1.params)):
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-4, atol=2e-6), a, b)


@pytest.mark.parametrize("fields, match", [
    ({"loss": "nce"}, "unknown contrastive loss"), ({"tau": 0.0}, "tau"), ({"p": 1.0}, "p must be"),
    ({"gamma": 0.5}, "gamma must be"), ({"directclr_dim": 4, "loss": "r_H"}, "DirectCLR"),
    ({"negatives": "all"}, "negatives"), ({"temperature": 0.5}, "unknown fields"),
])
def test_bad_loss_fields_are_refused_naming_them(fields, match):
    section = ConfigDict({"loss": "infonce", **fields})
    with pytest.raises(ValueError, match=match):
        simclr.SimCLRConfig.from_config(section)


def test_bad_runs_fail_before_compute(tmp_path, small_ssl_config):
    def fails(match, **changes):
        c = npz_config(small_ssl_config)
        for path, value in changes.items():
            section, field = path.split("__")
            c[section][field] = value
        with pytest.raises(ValueError, match=match):
            driver.run(c, str(tmp_path / "never"), log=lambda _: None)
        assert not (tmp_path / "never").exists()

    fails("at least 2 images", train__batch_size=1)
    fails("unknown optim.name", optim__name="adagrad")
    fails("projector='none'", ssl__directclr_dim=4)
    fails("exceeds the backbone's feature dimension", ssl__directclr_dim=100, model__projector="none")
    fails("downsample|SmallConvNet|size", data__downsample=16)  # 1-pixel images for a 3-layer ConvNet


def test_lars_scales_each_kernel_by_its_trust_ratio_and_skips_batchnorm():
    c = ConfigDict({"weight_decay": 0.1, "b1": 0.0, "b2": 0.999, "eps": 1e-8, "trust_coefficient": 0.01})
    tx = optimizers.update_rule(c, "lars", 1.0, resnet.FAMILY)
    w, g = np.full((3, 2), 2.0, np.float32), np.full((3, 2), 0.5, np.float32)
    scale, gs = np.full((2,), 1.0, np.float32), np.full((2,), 0.25, np.float32)
    params, grads = {"kernel": jnp.asarray(w), "scale": jnp.asarray(scale)}, {"kernel": jnp.asarray(g),
                                                                            "scale": jnp.asarray(gs)}
    updates, _ = tx.update(grads, tx.init(params), params)
    g_wd = g + 0.1 * w
    trust = 0.01 * np.linalg.norm(w) / np.linalg.norm(g_wd)
    np.testing.assert_allclose(updates["kernel"], -trust * g_wd, rtol=1e-5)
    np.testing.assert_allclose(updates["scale"], -gs, rtol=1e-6)  # no decay, no trust ratio
    sgdw = optimizers.update_rule(c, "sgdw", 0.5, resnet.FAMILY)
    updates, _ = sgdw.update(grads, sgdw.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.5 * g_wd, rtol=1e-6)
    np.testing.assert_allclose(updates["scale"], -0.5 * gs, rtol=1e-6)


def test_galore_projects_the_convnet_kernels_and_holds_less_state_than_adam():
    config = config_files.load(REPO / "configs" / "ssl.py", "cpu")
    cfg = simclr.SimCLRConfig()
    enc = ssl.build_encoder(config.model)
    x = np.zeros((4, 16, 16, 3), np.float32)
    task = simclr.make_task(enc, cfg, AUG, lambda step, rows: {"images": x}, image_shape=x.shape[1:])
    mask = resnet.family("small_convnet").galore_mask(nn.unbox(jax.eval_shape(task.init_params,
                                                                                   jax.random.key(0))))
    projected = sorted("/".join(str(getattr(k, "key", k)) for k in path)
                       for path, on in jax.tree_util.tree_leaves_with_path(mask) if on)
    assert projected == ["backbone/conv2/kernel", "backbone/conv3/kernel"]
    sizes = {}
    for name in ("adamw", "galore"):
        config.optim.name = name
        tx, _ = optimizers.build_optimizer(config.optim, 1000, resnet.family("small_convnet"))
        sizes[name] = driver.optimizer_state_bytes(task, tx)[0]
    assert sizes["galore"] < sizes["adamw"]
