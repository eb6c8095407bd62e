"""The per-layer update schedule: the same training as the standard step with per-leaf clipping,
in the pretraining experiment on 8 devices and across a resume; its plan; its errors."""

import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorank import config_files
from lorank.models import llama
from lorank.train import lm, loop, mesh as mesh_lib, methods, per_layer, pretrain

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "llama.py"


def smoke_config(name="adamw", chunk=0, schedule="per_layer"):
    config = config_files.load(CONFIG, "smoke")
    config.model.num_layers = 1  # embedding, one block, head: every kind of stage at half the compile
    config.analysis.grad_rank = False
    config.optim.name = name
    config.optim.warmup_steps = 0
    config.optim.clip_norm = 0.3  # below the smoke model's leaf norms: clipping acts
    config.optim.clip_scope = "per_leaf"
    config.optim.update_schedule = schedule
    config.optim.update_chunk = chunk
    return config


def one_device():
    return mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])


def plans(config, pad_id=None):
    """(joint plan, per-layer plan) of `config` on one device."""
    model = lm.build_llama(config)
    task = dataclasses.replace(lm.shapes_task(model), loss_fn=loop.plain_loss(lm.next_token_loss(model, pad_id)))
    method = methods.build_method(config, task, llama.FAMILY)
    key = jax.random.key(1)
    return (loop.joint_step_plan(method.task, method.tx, one_device(), key),
            lm.step_plan(config, model, method, one_device(), key, pad_id=pad_id))


@pytest.mark.parametrize("name, chunk, pad_id", [
    ("adamw", 0, None), ("adamw", 4096, 0), ("galore8bit", 4096, None), ("galore_adafactor", 4096, None)])
def test_per_layer_step_equals_the_standard_step(name, chunk, pad_id):
    """Same loss, gradient norm and parameters after 3 steps as loop.make_train_step with per-leaf
    clipping (float32); the embedding and LM head (256 x 32) in row chunks where asked (none for
    Adafactor's factored moments); padded targets left out of both losses."""
    joint, layered = plans(smoke_config(name, chunk), pad_id)
    key = jax.random.key(1)
    standard, state = joint.init_state(key), layered.init_state(key)
    chunked = [piece for piece in state.opt_state if "[" in piece]
    assert bool(chunked) == (chunk > 0 and name in per_layer.ELEMENTWISE), chunked
    batch = jax.random.randint(jax.random.key(2), (1, 2, 33), 0, 256)
    batch = batch.at[:, :, 20:].set(0)  # a padded tail (pad id 0)
    step_a, step_b = jax.jit(joint.step), jax.jit(layered.step)
    for _ in range(3):
        standard, metrics_a = step_a(standard, batch)
        state, metrics_b = step_b(state, batch)
        np.testing.assert_allclose(metrics_b["loss"], metrics_a["loss"], rtol=1e-6)
        np.testing.assert_allclose(metrics_b["grad_norm"], metrics_a["grad_norm"], rtol=1e-5)
    # 8-bit moments: float noise can flip a value across a code boundary (a change of ~1e-3 of an update)
    atol = 1e-5 if "8bit" in name else 1e-6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=atol), standard.params, state.params)
    assert not np.allclose(standard.params["lm_head"]["kernel"], joint.init_state(key).params["lm_head"]["kernel"])


def test_padding_changes_the_loss():
    """The pad mask acts: with pad id 0 the loss of a zero-padded batch differs from the unmasked one."""
    _, masked = plans(smoke_config(), pad_id=0)
    _, plain = plans(smoke_config())
    state = masked.init_state(jax.random.key(1))
    batch = jax.random.randint(jax.random.key(2), (1, 2, 33), 1, 256).at[:, :, 20:].set(0)
    loss_masked = jax.jit(masked.step)(state, batch)[1]["loss"]
    loss_plain = jax.jit(plain.step)(plain.init_state(jax.random.key(1)), batch)[1]["loss"]
    assert abs(float(loss_masked) - float(loss_plain)) > 1e-3


def test_per_layer_step_skips_the_update_on_a_nonfinite_loss():
    _, layered = plans(smoke_config(chunk=4096))
    state = layered.init_state(jax.random.key(0))
    state = state.replace(params={**state.params, "lm_head": {"kernel": state.params["lm_head"]["kernel"] * jnp.nan}})
    new, metrics = jax.jit(layered.step)(state, jnp.zeros((1, 2, 33), jnp.int32))
    assert not np.isfinite(metrics["loss"])
    for name in ("embed", "layers_0"):
        jax.tree.map(np.testing.assert_array_equal, new.params[name], state.params[name])


def test_every_piece_state_matrix_is_sharded():
    """On a (2, 2, 2) mesh every optimizer-state matrix of every piece (row chunks included) is split."""
    config = smoke_config("galore8bit", chunk=4096)
    model = lm.build_llama(config)
    method = methods.build_method(config, lm.shapes_task(model), llama.FAMILY)
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    plan = lm.step_plan(config, model, method, mesh, jax.random.key(0))
    leaves = jax.tree.leaves(plan.abstract_state.opt_state)
    shardings = jax.tree.leaves(plan.shardings.opt_state, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    assert len(leaves) == len(shardings) and any("[" in name for name in plan.abstract_state.opt_state)
    for leaf, sharding in zip(leaves, shardings):
        if leaf.ndim >= 2:
            assert any(axis is not None for axis in sharding.spec), (leaf.shape, sharding.spec)


def run_metrics(workdir):
    with open(os.path.join(workdir, loop.METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


def test_pretraining_per_layer_on_eight_devices_equals_one_and_resumes(tmp_path):
    """experiments.pretrain with update_schedule=per_layer (8-bit GaLore, chunked embedding and LM
    head): its loss falls; a (2, 2, 2) mesh of 8 devices trains as 1 device; a run stopped at
    step 6 and resumed ends where the uninterrupted one ends."""
    quiet = lambda _: None  # noqa: E731
    config = smoke_config("galore8bit", chunk=4096)
    config.optim.warmup_steps = 2
    one = pretrain.run(config, str(tmp_path / "one"), log=quiet)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    pretrain.run(config, str(tmp_path / "eight"), stop_at=6, log=quiet)
    eight = pretrain.run(config, str(tmp_path / "eight"), log=quiet)

    evals = [r["eval_loss"] for r in run_metrics(tmp_path / "one") if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.05, evals
    losses = lambda d: [r["loss"] for r in run_metrics(d) if "loss" in r]  # noqa: E731
    assert len(losses(tmp_path / "eight")) == len(losses(tmp_path / "one"))
    np.testing.assert_allclose(losses(tmp_path / "eight"), losses(tmp_path / "one"), rtol=2e-4)
    assert eight["final_eval_loss"] == pytest.approx(one["final_eval_loss"], rel=1e-4)
    assert eight["sample"] == one["sample"]


@pytest.mark.parametrize("change, message", [
    ({"optim.update_schedule": "layered"}, "unknown optim.update_schedule='layered'"),
    ({"optim.name": "lora"}, "optim.name='lora' factors them"),
    ({"train.grad_accum": 2, "train.batch_size": 16}, "train.grad_accum=2 must be 1"),
    ({"optim.clip_scope": "global"}, "optim.clip_scope='global' must be 'per_leaf'"),
    ({"optim.update_chunk": 1000}, "optim.update_chunk=1000 must be 0"),
])
def test_bad_per_layer_settings_are_rejected_before_anything_is_written(tmp_path, change, message):
    config = smoke_config()
    for field, value in change.items():
        section, name = field.split(".")
        config[section][name] = value
    with pytest.raises(ValueError, match=message):
        pretrain.run(config, str(tmp_path / "run"), log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_global_clipping_is_fine_when_clipping_is_off():
    config = smoke_config()
    config.optim.clip_scope, config.optim.clip_norm = "global", 0.0
    per_layer.check_config(config)


def test_row_chunks_cover_the_rows_in_whole_quantization_blocks():
    chunks = per_layer.row_chunks(32000, 4096, 2**24, 256)
    assert chunks[0] == (0, 4096) and chunks[-1][1] == 32000
    assert all(b == a2 for (_, b), (a2, _) in zip(chunks, chunks[1:]))
    assert all((b - a) * 4096 <= 2**24 for a, b in chunks)
    # 100 columns: a block of 256 values ends on a row boundary every 64 rows.
    assert all(a * 100 % 256 == 0 for a, _ in per_layer.row_chunks(1000, 100, 10_000, 256))


def test_update_plan_and_piece_trees():
    params = {"embed": {"embedding": jnp.zeros((64, 32))}, "final_norm": {"scale": jnp.zeros(32)},
              "lm_head": {"kernel": jnp.zeros((32, 64))}, "layers_0": {"w": {"kernel": jnp.zeros((32, 32))}}}
    groups = [("final_norm", "lm_head"), ("layers_0",), ("embed",)]
    plan = per_layer.update_plan(params, groups, chunk_values=1024, block_size=256,
                                 chunkable=lambda path, shape: path[0] != "layers_0")
    names = [[p.name for p in pieces] for pieces in plan]
    assert names == [["final_norm+lm_head", "lm_head/kernel[0:16]", "lm_head/kernel[16:32]"], ["layers_0"],
                     ["embed/embedding[0:32]", "embed/embedding[32:64]"]]
    head = {k: params[k] for k in ("final_norm", "lm_head")}
    assert jax.tree.structure(per_layer.piece_tree(head, plan[0][0])) == jax.tree.structure(
        {"final_norm": {"scale": 0}})
    assert per_layer.piece_tree(head, plan[0][2])["lm_head"]["kernel"].shape == (16, 64)


def test_layer_groups_follow_the_backward_pass():
    cfg = dataclasses.replace(lm.build_llama(smoke_config()).cfg, num_layers=2)
    stages = llama.per_layer_stages(cfg, inputs_of=lambda b: b, loss_of=lambda logits, b: logits)
    assert per_layer.layer_groups(stages) == [("final_norm", "lm_head"), ("layers_1",), ("layers_0",), ("embed",)]
