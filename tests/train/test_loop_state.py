"""The loop's general contract on a linear-regression task with every kind of state.

The task has boxed parameters, a non-gradient state of three kinds (an EMA target
copied from the boxed parameters, a running second moment set after the optimizer
step, a running input mean the loss itself returns), pytree batches, per-step
noise from the step's key, an evaluator with its own period. Checked here: the
recursions against NumPy float64, bit-exact resume, 8 devices against 1, the
layout of the non-gradient state, evaluator periods, non-finite steps and
checkpoint verification.
"""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lorank.train import checkpoints, loop, mesh as mesh_lib

D, K, B = 6, 4, 8
RHO, LR = 0.9, 0.05
W_TRUE = np.random.default_rng(0).normal(size=(D, K))


def toy_task(noise=0.1, nan_batch_at=None, nan_cov_at=None, eval_every=3):
    def init_params(key):
        return {"w": nn.with_logical_partitioning(nn.initializers.normal(0.3), ("embed", "mlp"))(key, (D, K))}

    def init_extra(key, boxed):
        return {"ema": jax.tree.map(lambda x: x, boxed), "cov": jnp.zeros((D, D)), "mean": jnp.zeros(D)}

    def loss_fn(params, extra, batch, rng):
        x = batch["x"] + noise * jax.random.normal(rng, batch["x"].shape)
        pred = x @ params["w"]
        loss = jnp.mean(jnp.sum((pred - batch["y"]) ** 2, axis=1))
        mean = 0.5 * extra["mean"] + 0.5 * jnp.mean(x, axis=0)
        return loss, {"extra": {**extra, "mean": mean}, "cov": x.T @ x / x.shape[0],
                      "metrics": {"pred_sq": jnp.mean(pred ** 2)}}

    def update_extra(step, params, extra, aux):
        ema = jax.tree.map(lambda e, p: RHO * e + (1 - RHO) * p, extra["ema"], params)
        cov = 0.5 * extra["cov"] + 0.5 * aux["cov"]
        if nan_cov_at is not None:
            cov = jnp.where(step == nan_cov_at, jnp.nan, cov)
        return params, {**extra, "ema": ema, "cov": cov}

    def train_batch(step, rows):
        x = np.random.default_rng(step + 1).normal(size=(B, D))
        if step == nan_batch_at:
            x[0, 0] = np.nan
        batch = {"x": x.astype(np.float32), "y": (x @ W_TRUE).astype(np.float32)}
        return jax.tree.map(lambda a: a[rows], batch) if rows is not None else batch

    val = np.random.default_rng(99).normal(size=(2 * B, D))
    val_batches = {"x": val.astype(np.float32), "y": (val @ W_TRUE).astype(np.float32)}
    ema_loss = loop.mean_loss_evaluator(
        lambda params, extra, batch: jnp.mean(jnp.sum((batch["x"] @ extra["ema"]["w"] - batch["y"]) ** 2, 1)),
        val_batches, B, eval_every, name="ema_loss")
    return loop.Task(init_params=init_params, loss_fn=loss_fn, train_batch=train_batch, init_extra=init_extra,
                     update_extra=update_extra, evaluators=(ema_loss,), items_per_step=B, item_name="rows",
                     axis_rules=(("embed", "fsdp"), ("mlp", "tensor")))


def cfg(steps=6, **kw):
    kw = {"log_every": 1, "eval_every": 3, "checkpoint_every": 2, "keep_checkpoints": 5, **kw}
    return loop.LoopConfig(steps=steps, batch_size=B, **kw)


def one_device():
    return mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])


def eight_devices():
    return mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def quiet(_):
    pass


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def test_ema_running_statistics_and_sgd_follow_their_recursions(tmp_path):
    """Without input noise, every quantity after 3 steps equals a float64 NumPy recursion:
    the EMA and the second moment are updated after the optimizer step, the running mean
    inside the loss."""
    task = toy_task(noise=0.0)
    state, history = loop.run(task, optax.sgd(LR), cfg(steps=3), one_device(), str(tmp_path), log=quiet)
    init = host(jax.jit(loop.state_layout(task, optax.sgd(LR), one_device(), jax.random.key(0))[0])(
        jax.random.key(0)))
    w = init.params["w"].astype(np.float64)
    ema, cov, mean = w.copy(), np.zeros((D, D)), np.zeros(D)
    for step in range(3):
        batch = task.train_batch(step, None)
        x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
        grad = 2 * x.T @ (x @ w - y) / B
        mean = 0.5 * mean + 0.5 * x.mean(0)
        w = w - LR * grad
        ema = RHO * ema + (1 - RHO) * w
        cov = 0.5 * cov + 0.5 * x.T @ x / B
    got = host(state)
    np.testing.assert_allclose(got.params["w"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.extra["ema"]["w"], ema, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.extra["cov"], cov, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.extra["mean"], mean, rtol=1e-5, atol=1e-6)
    assert int(got.step) == 3 and int(got.skipped) == 0
    assert [r["step"] for r in history if "pred_sq" in r] == [1, 2, 3]  # the loss's metrics are logged


def test_resume_retraces_an_uninterrupted_run_bit_exactly_on_eight_devices(tmp_path):
    """Per-step noise keys, the EMA target, the running statistics and the optimizer state all
    survive an interruption: stopped at 3 and resumed, the state equals the straight run's bit for bit."""
    tx = optax.adam(0.05)
    straight, h_straight = loop.run(toy_task(), tx, cfg(), eight_devices(), str(tmp_path / "straight"), log=quiet)
    workdir = str(tmp_path / "resumed")
    loop.run(toy_task(), tx, cfg(), eight_devices(), workdir, stop_at=3, log=quiet)
    lines = []
    resumed, _ = loop.run(toy_task(), tx, cfg(), eight_devices(), workdir, log=lines.append)
    assert any("resumed" in ln and "step 3" in ln for ln in lines)
    jax.tree.map(np.testing.assert_array_equal, host(resumed), host(straight))
    records = [json.loads(x) for x in open(pathlib.Path(workdir) / loop.METRICS_FILE)]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records[1:]] == [r["loss"] for r in h_straight[1:]]


def test_metrics_logged_after_the_last_checkpoint_are_dropped_on_resume(tmp_path):
    tx = optax.adam(0.05)
    loop.run(toy_task(), tx, cfg(steps=8, checkpoint_every=4), one_device(), str(tmp_path), stop_at=4, log=quiet)
    with open(tmp_path / loop.METRICS_FILE, "a") as f:  # records of steps 5-6 whose checkpoint never landed
        f.write(json.dumps({"step": 5, "loss": 9.0}) + "\n" + json.dumps({"step": 6, "loss": 9.0}) + "\n")
    loop.run(toy_task(), tx, cfg(steps=8, checkpoint_every=4), one_device(), str(tmp_path), log=quiet)
    records = [json.loads(x) for x in open(tmp_path / loop.METRICS_FILE)]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert all(r.get("loss") != 9.0 for r in records)


def test_eight_devices_equal_one_and_the_extra_state_is_laid_out(tmp_path):
    tx = optax.adam(0.05)
    one, _ = loop.run(toy_task(), tx, cfg(), one_device(), str(tmp_path / "one"), log=quiet)
    eight, _ = loop.run(toy_task(), tx, cfg(), eight_devices(), str(tmp_path / "eight"), log=quiet)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), host(eight), host(one))
    spec = eight.params["w"].sharding.spec
    assert spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert eight.extra["ema"]["w"].sharding.spec == spec  # a boxed copy of the parameters is laid out like them
    assert eight.extra["cov"].sharding.is_fully_replicated


def test_evaluators_run_at_step_zero_at_their_period_and_at_the_end(tmp_path):
    lines = []
    loop.run(toy_task(eval_every=3), optax.adam(0.05), cfg(steps=7), one_device(), str(tmp_path), log=lines.append)
    records = [json.loads(x) for x in open(tmp_path / loop.METRICS_FILE)]
    assert [r["step"] for r in records if "ema_loss" in r] == [0, 3, 6, 7]
    assert records[-1]["ema_loss"] < records[0]["ema_loss"]
    assert any(ln.startswith("step 7/7 | ema_loss") for ln in lines)


def test_a_nonfinite_loss_stops_the_run_naming_the_step_and_keeps_the_checkpoints(tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite at step 5 .* step 4 in .*checkpoints, is intact"):
        loop.run(toy_task(nan_batch_at=4), optax.adam(0.05), cfg(steps=8), one_device(), str(tmp_path), log=quiet)
    manager = checkpoints.open_manager(str(tmp_path / loop.CHECKPOINT_DIR))
    assert manager.all_steps() == [2, 4]
    task = toy_task()
    _, abstract, shardings = loop.state_layout(task, optax.adam(0.05), one_device(), jax.random.key(0))
    for step in (2, 4):
        assert checkpoints.verify_files(checkpoints.step_path(manager, step)) is None
        assert checkpoints.nonfinite_leaves(checkpoints.restore(manager, step, abstract, shardings)) == []


def test_skip_policy_skips_the_nonfinite_step_and_counts_it(tmp_path):
    lines = []
    state, history = loop.run(toy_task(nan_batch_at=4), optax.adam(0.05), cfg(steps=8, on_nonfinite="skip"),
                              one_device(), str(tmp_path), log=lines.append)
    assert int(state.skipped) == 1 and int(state.step) == 8
    assert checkpoints.nonfinite_leaves(state) == []
    assert any("step 5 skipped" in ln for ln in lines)
    assert [r["skipped"] for r in history if "skipped" in r] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_a_nonfinite_state_is_never_checkpointed(tmp_path):
    """The loss stays finite but the running statistic becomes NaN at step 3: the save at step 4
    refuses, naming the leaf; checkpoint 2 is the newest on disk."""
    with pytest.raises(FloatingPointError, match=r"train state at step 4 holds non-finite values in extra/cov"):
        loop.run(toy_task(nan_cov_at=3), optax.adam(0.05), cfg(steps=6), one_device(), str(tmp_path), log=quiet)
    assert checkpoints.open_manager(str(tmp_path / loop.CHECKPOINT_DIR)).all_steps() == [2]


def test_a_corrupt_newest_checkpoint_is_named_moved_aside_and_the_run_falls_back(tmp_path, damage):
    tx = optax.adam(0.05)
    straight, _ = loop.run(toy_task(), tx, cfg(steps=8), one_device(), str(tmp_path / "straight"), log=quiet)
    workdir = tmp_path / "run"
    loop.run(toy_task(), tx, cfg(steps=8), one_device(), str(workdir), stop_at=6, log=quiet)
    damaged = damage(workdir / loop.CHECKPOINT_DIR / "6")
    lines = []
    resumed, _ = loop.run(toy_task(), tx, cfg(steps=8), one_device(), str(workdir), log=lines.append)
    assert any("is corrupt" in ln and str(damaged) in ln for ln in lines)
    assert any("resumed" in ln and "step 4" in ln for ln in lines)
    assert (workdir / checkpoints.CORRUPT_DIR / "6").is_dir()  # kept for inspection
    jax.tree.map(np.testing.assert_array_equal, host(resumed), host(straight))


def test_nonfinite_values_in_an_unsealed_checkpoint_are_caught_and_none_intact_is_an_error(tmp_path, damage):
    tx = optax.adam(0.05)
    task = toy_task()
    loop.run(task, tx, cfg(steps=4), one_device(), str(tmp_path), log=quiet)
    _, abstract, shardings = loop.state_layout(task, tx, one_device(), jax.random.key(0))
    manager = checkpoints.open_manager(str(tmp_path / loop.CHECKPOINT_DIR))
    state = checkpoints.restore(manager, 4, abstract, shardings)
    bad = state.replace(extra={**state.extra, "cov": state.extra["cov"] * jnp.nan}, step=state.step + 2)
    # orbax alone, in its standard format (the layout of our checkpoints): no manifest, NaN inside
    with checkpoints.ocp.CheckpointManager(manager.directory) as plain:
        plain.save(6, args=checkpoints.ocp.args.StandardSave(bad))
    manager.reload()
    warnings = []
    restored, step = checkpoints.restore_newest_intact(manager, abstract, shardings, warn=warnings.append)
    assert step == 4 and any("non-finite values in extra/cov" in w for w in warnings)
    for s in (2, 4):
        damage(checkpoints.step_path(manager, s))
    with pytest.raises(checkpoints.NoIntactCheckpoint, match=r"no intact checkpoint .*6: non-finite.*4: checksum"):
        loop.restore_latest(str(tmp_path), abstract, shardings, warn=quiet)


def test_an_init_from_closed_over_weights_takes_them_as_arguments_not_constants():
    """A fine-tuning start: the init returns given weights; the program stays small and lays them out."""
    start = np.random.default_rng(3).normal(size=(512, 256)).astype(np.float32)

    def init_state(key):
        params = {"w": jnp.asarray(start)}
        return loop.TrainState(jnp.zeros((), jnp.int32), params, {}, {}, jnp.zeros((), jnp.int32))

    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 8})
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    replicated = mesh_lib.replicated(mesh)
    shardings = loop.TrainState(replicated, {"w": sharding}, {}, {}, replicated)
    state = loop.init_on_mesh(init_state, shardings, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(state.params["w"]), start)
    assert state.params["w"].sharding == sharding
    embedded = jax.jit(init_state).lower(jax.random.key(0)).as_text()
    assert len(embedded) > start.nbytes  # the plain jit copies the weights into the program ...
    hoisted, consts = loop.hoist_constants(init_state, jax.random.key(0))
    assert len(jax.jit(hoisted).lower(jax.random.key(0), consts).as_text()) < start.nbytes / 100  # ... not here
