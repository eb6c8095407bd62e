"""Every training method: it learns, 8 devices equal 1, every state leaf is laid out, sizes, errors."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lorank import config_files
from lorank.models import llama
from lorank.train import lm, loop, mesh as mesh_lib, methods

# One block: every method's structure is there (attention and MLP kernels, embedding, head) at half the compile.
CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_layers=1, max_len=16)
TOKENS = (np.arange(20_000) * 7919 % 61).astype(np.int32)  # a deterministic stream over 61 symbols
STEPS = 6


def smoke_config(name):
    config = config_files.load("configs/llama.py", "smoke")
    config.optim.name = name
    config.optim.rank = 4
    config.optim.update_proj_gap = 3  # GaLore refreshes its projections at steps 0 and 3
    config.optim.relora_reset_every = 3  # ReLoRA merges after step 3
    config.optim.relora_restart_warmup = 1
    config.train.steps = STEPS
    if name == "lars":  # a layer moves lr * trust_coefficient (0.001) of its norm per step: SimCLR's scale of lr
        config.optim.lr = 10.0
    return config


def make_method(name, loop_cfg):
    task = lm.make_lm_task(llama.Llama(CFG), TOKENS[:18_000], TOKENS[18_000:], loop_cfg, seq_len=16, eval_batches=2)
    return methods.build_method(smoke_config(name), task, llama.FAMILY)


def quiet(_):
    pass


@pytest.mark.parametrize("name", methods.METHODS)
def test_method_learns_and_eight_devices_equal_one(name, tmp_path):
    """Six steps through the loop on one device and on a (2, 2, 2) mesh: the same losses and
    parameters, and the training loss falls (the evaluators are left out: the loop's own tests
    cover them, and the per-method question is the update)."""
    cfg = loop.LoopConfig(steps=STEPS, batch_size=8, log_every=1, eval_every=STEPS, checkpoint_every=STEPS)
    single = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
    sharded = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    method = make_method(name, cfg)
    task = dataclasses.replace(method.task, evaluators=())
    s1, h1 = loop.run(task, method.tx, cfg, single, str(tmp_path / "one"), log=quiet)
    s8, h8 = loop.run(task, method.tx, cfg, sharded, str(tmp_path / "eight"), log=quiet)

    losses = lambda h: [r["loss"] for r in h if "loss" in r]  # noqa: E731
    assert losses(h8)[-1] < losses(h8)[0] - 0.02, f"{name}: training loss {losses(h8)}"
    np.testing.assert_allclose(losses(h8), losses(h1), rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                                         rtol=2e-4, atol=2e-6),
                 jax.device_get(s8.params), jax.device_get(s1.params))


@pytest.mark.parametrize("name", methods.METHODS)
def test_every_optimizer_state_matrix_is_sharded_like_its_parameter(name):
    cfg = loop.LoopConfig(steps=STEPS, batch_size=8)
    method = make_method(name, cfg)
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, abstract, shardings = loop.state_layout(method.task, method.tx, mesh, jax.random.key(0))
    state_leaves = jax.tree.leaves(abstract.opt_state)
    sharding_leaves = jax.tree.leaves(shardings.opt_state, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    assert len(sharding_leaves) == len(state_leaves)
    for leaf, sharding in zip(state_leaves, sharding_leaves):
        assert isinstance(sharding, jax.sharding.NamedSharding)
        if leaf.ndim >= 2:  # moments, projectors, 8-bit codes: every matrix of this model is split over the mesh
            assert any(axis is not None for axis in sharding.spec), (name, leaf.shape, sharding.spec)


def test_lora_starts_from_exactly_the_base_model():
    cfg = loop.LoopConfig(steps=STEPS, batch_size=8)
    full, low = make_method("adamw", cfg), make_method("lora", cfg)
    key = jax.random.key(3)
    base_params = nn.unbox(full.task.init_params(key))
    lora_params = nn.unbox(low.task.init_params(key))
    batch = full.task.train_batch(0)
    loss = lambda task, params: float(task.loss_fn(params, {}, batch, None)[0])  # noqa: E731
    assert loss(low.task, lora_params) == loss(full.task, base_params)
    jax.tree.map(np.testing.assert_array_equal, low.export(lora_params), base_params)


def hand_counts(d, f, v, layers, r):
    """(full, low-rank, LoRA total, LoRA trainable) parameters of the test model, by hand."""
    norms = 2 * d * layers + d
    full = 2 * v * d + layers * (4 * d * d + 3 * d * f) + norms
    factors = layers * (4 * r * (d + d) + 3 * r * (d + f))
    return full, 2 * v * d + factors + norms, full + factors, 2 * v * d + factors + norms


def test_parameter_counts_match_the_closed_form():
    cfg = loop.LoopConfig(steps=STEPS, batch_size=8)
    full, lowrank, lora_total, lora_trainable = hand_counts(32, 64, 64, 1, 4)
    reports = {name: methods.parameter_report(make_method(name, cfg)) for name in ("adamw", "lowrank", "lora")}
    assert (reports["adamw"]["total"], reports["adamw"]["trainable"]) == (full, full)
    assert (reports["lowrank"]["total"], reports["lowrank"]["trainable"]) == (lowrank, lowrank)
    assert (reports["lora"]["total"], reports["lora"]["trainable"]) == (lora_total, lora_trainable)
    # mu and nu in float32, and two int32 step counts (Adam's and the schedule's)
    assert reports["adamw"]["optimizer_state_bytes"] == 2 * 4 * full + 2 * 4


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown optim.name='adam'"):
        make_method("adam", loop.LoopConfig(steps=STEPS, batch_size=8))


@pytest.mark.parametrize("name", ["galore", "lowrank", "lora"])
def test_rank_larger_than_a_kernel_is_rejected_naming_it(name):
    config = smoke_config(name)
    config.optim.rank = 33
    task = lm.make_lm_task(llama.Llama(CFG), TOKENS[:18_000], TOKENS[18_000:], loop.LoopConfig(steps=6, batch_size=8),
                           seq_len=16, eval_batches=2)
    with pytest.raises(ValueError, match=r"optim.rank=33 exceeds min\(32, 32\)=32 of layers_0/attn/\w+_proj/kernel"):
        methods.build_method(config, task, llama.FAMILY)


def quadratic_task():
    """A task on a small LLaMA-shaped parameter tree (two projected kernels, an embedding, a norm)
    with a quadratic loss: cheap to compile, and every method's optimizer sees its usual leaves."""
    shapes = {"layers_0": {"attn": {"q_proj": {"kernel": (16, 12)}}, "mlp": {"down_proj": {"kernel": (12, 16)}},
                           "attn_norm": {"scale": (16,)}},
              "embed": {"embedding": (8, 16)}}

    def init_params(key):
        leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
        keys = jax.random.split(key, len(leaves))
        return treedef.unflatten([jax.random.normal(k, s) for k, s in zip(keys, leaves)])

    def loss(params, batch):
        return sum(jnp.sum((p - batch) ** 2) for p in jax.tree.leaves(params))

    return loop.Task(init_params=init_params, loss_fn=loop.plain_loss(loss), train_batch=lambda step, rows=None: step)


@pytest.mark.parametrize("name", methods.METHODS)
def test_eagerly_initialised_optimizer_state_can_be_donated(name):
    """Every method's optax chain (ReLoRA's merge wrapper, LoRA's frozen base, per-leaf and global
    clipping included) initialised eagerly, then two jitted steps with parameters and state donated."""
    config = smoke_config(name)
    config.optim.clip_scope = "per_leaf" if name in ("adamw", "galore8bit") else "global"
    config.optim.block_size = 32
    method = methods.build_method(config, quadratic_task(), llama.FAMILY)
    params = nn.unbox(method.task.init_params(jax.random.key(0)))
    state = method.tx.init(params)
    loss = lambda p, b: method.task.loss_fn(p, {}, b, None)[0]  # noqa: E731

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, batch):
        updates, state = method.tx.update(jax.grad(loss)(params, batch), state, params)
        return optax.apply_updates(params, updates), state

    for s in range(4):  # GaLore refreshes at step 3, ReLoRA merges after it
        params, state = step(params, state, jnp.float32(0.1 * s))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
