"""The generic loop on the LLaMA task: sharded equals single-device, accumulation, padding, errors.

Resume, metrics after an interruption, the non-gradient state, evaluators, non-finite steps and
checkpoint verification are tested on a cheaper task in test_loop_state.py."""

import jax
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from lorank.models import llama
from lorank.train import lm, loop, mesh as mesh_lib

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_layers=1, max_len=16)
TOKENS = (np.arange(20_000) * 7919 % 61).astype(np.int32)  # a deterministic stream over 61 symbols


def make_task(loop_cfg, model=None):
    model = model or llama.Llama(CFG)
    return lm.make_lm_task(model, TOKENS[:18_000], TOKENS[18_000:], loop_cfg, seq_len=16, eval_batches=2)


def adamw():
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 3, 20, 3e-4), weight_decay=0.1))


def quiet(_):
    pass


def params_of(state):
    return jax.device_get(state.params)


def assert_trees_close(a, b, rtol, atol=0.0):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def test_sharded_step_equals_single_device_step(tmp_path):
    cfg = loop.LoopConfig(steps=3, batch_size=8, log_every=1, eval_every=3, checkpoint_every=3)
    single = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
    sharded = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    s1, h1 = loop.run(make_task(cfg), adamw(), cfg, single, str(tmp_path / "one"), log=quiet)
    s8, h8 = loop.run(make_task(cfg), adamw(), cfg, sharded, str(tmp_path / "eight"), log=quiet)
    losses = lambda h: [r["loss"] for r in h if "loss" in r]
    np.testing.assert_allclose(losses(h8), losses(h1), rtol=1e-5)
    assert_trees_close(params_of(s8), params_of(s1), rtol=1e-5, atol=1e-7)
    # the parameters really are split over the mesh
    q = s8.params["layers_0"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    mu = s8.opt_state[1][0].mu["layers_0"]["attn"]["q_proj"]["kernel"]
    assert mu.sharding.spec == q.sharding.spec  # Adam moments follow their parameter


def test_gradient_accumulation_equals_one_big_batch():
    model = llama.Llama(CFG)
    big = loop.LoopConfig(steps=1, batch_size=8)
    task = make_task(big, model)
    mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
    init_state, _, _ = loop.state_layout(task, optax.sgd(0.1), mesh, jax.random.key(0))
    state = init_state(jax.random.key(0))
    step = jax.jit(loop.make_train_step(task.loss_fn, optax.sgd(0.1)))
    batch = task.train_batch(0)
    s1, m1 = step(state, batch[None])
    s4, m4 = step(state, batch.reshape(4, 2, -1))
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    assert_trees_close(s4.params, s1.params, rtol=1e-5, atol=1e-7)


def test_batch_not_divisible_by_data_parallel_size_is_rejected_before_compute(tmp_path):
    cfg = loop.LoopConfig(steps=2, batch_size=6)
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match=r"micro-batch 6 .* data-parallel size 4"):
        loop.run(make_task(cfg), adamw(), cfg, mesh, str(tmp_path), log=quiet)
    assert not (tmp_path / loop.CHECKPOINT_DIR).exists()


@pytest.mark.parametrize("field, value", [("steps", 0), ("steps", -5), ("batch_size", 0), ("grad_accum", 0)])
def test_non_positive_counts_are_rejected(field, value):
    kwargs = {"steps": 10, "batch_size": 8, field: value}
    with pytest.raises(ValueError, match=f"train.{field} must be an integer >= 1, got {value}"):
        loop.LoopConfig(**kwargs)


def test_workdir_of_another_model_is_refused(tmp_path):
    config = ConfigDict({"model": {"hidden_size": 32}, "data": {}, "train": {"log_every": 5}, "optim": {}})
    loop.check_workdir_config(config, str(tmp_path))
    config.train.log_every = 7  # reporting intervals may change between resumptions
    loop.check_workdir_config(config, str(tmp_path))
    config.model.hidden_size = 64
    with pytest.raises(ValueError, match="different `model` config"):
        loop.check_workdir_config(config, str(tmp_path))


def test_padded_targets_are_left_out_of_the_loss():
    model = llama.Llama(CFG)
    params = lm.init_params_fn(model)(jax.random.key(0))
    seqs = np.asarray(TOKENS[:34].reshape(2, 17)).copy()
    seqs[0, 10:] = 0  # the first document ends after 10 tokens and is padded with id 0
    logits = np.asarray(model.apply({"params": params}, seqs[:, :-1]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, seqs[:, 1:, None], -1)[..., 0]
    keep = seqs[:, 1:] != 0
    got = float(lm.next_token_loss(model, pad_id=0)(params, seqs))
    np.testing.assert_allclose(got, nll[keep].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(lm.next_token_loss(model)(params, seqs)), nll.mean(), rtol=1e-5)
