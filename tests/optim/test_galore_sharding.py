"""State shardings under a mesh of 8 fake CPU devices (GaLore, AdamW, any tree), and orbax save/restore."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lorank.optim import (MatrixAxes, galore_adamw, galore_adamw_8bit, optimizer_state_shardings,
                          tree_shardings)

SPECS = {"wq": P("fsdp", "tensor"), "down": P("tensor", "fsdp"), "b": P("tensor"),
         "x3": P("fsdp", "tensor", None)}
SHAPES = {"wq": (32, 24), "down": (48, 16), "b": (24,), "x3": (16, 2, 12)}
AXES = {"wq": None, "down": None, "b": None, "x3": MatrixAxes(0, (1, 2))}


def make_tx(eight_bit):
    kwargs = dict(learning_rate=1e-2, rank=4, update_proj_gap=2, weight_decay=0.1, matrix_axes=AXES)
    if eight_bit:
        return galore_adamw_8bit(**kwargs, block_size=32, min_size=16)
    return galore_adamw(**kwargs)


def grads_at(step, shapes=SHAPES):
    rng = np.random.default_rng(step)
    return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}


def mesh_and_params():
    assert len(jax.devices()) == 8
    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))  # auto axes, as lorank.train.mesh
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
    return mesh, params, {k: NamedSharding(mesh, s) for k, s in SPECS.items()}


def run(tx, params, steps, shard=None):
    """`steps` jitted updates; with shard=(param_shardings, state_shardings) under the mesh."""
    kwargs = {}
    if shard is not None:
        kwargs = dict(in_shardings=(shard[0], shard[0], shard[1]), out_shardings=(shard[0], shard[1]))

    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, **kwargs)
    init = jax.jit(tx.init, **({} if shard is None else dict(out_shardings=shard[1])))
    state = init(params)
    for i in range(steps):
        grads = grads_at(i)
        if shard is not None:
            grads = jax.device_put(grads, shard[0])
        params, state = step(params, grads, state)
    return params, state


@pytest.mark.parametrize("eight_bit", [False, True], ids=["fp32", "8bit"])
def test_state_shardings_follow_param_shardings(eight_bit):
    _, params, param_shardings = mesh_and_params()
    tx = make_tx(eight_bit)
    g = optimizer_state_shardings(tx, params, param_shardings, matrix_axes=AXES)[0]
    assert g.projectors["wq"].right.spec == P(None, "tensor")  # 32 x 24 std: Q [r, 24]
    assert g.projectors["down"].right.spec == P(None, "fsdp")  # 48 x 16: Q [r, 16]
    assert g.projectors["x3"].left.spec == P("fsdp", None)  # 16 x (2*12): P [16, r]
    assert g.projectors["wq"].next_refresh.spec == P() and g.count.spec == P()
    codes = (lambda x: x.codes) if eight_bit else (lambda x: x)
    for moments in (g.inner_state.mu, g.inner_state.nu):
        assert codes(moments["wq"]).spec == P("fsdp", None)  # [32, r]
        assert codes(moments["down"]).spec == P("tensor", None)  # [48, r]
        assert codes(moments["x3"]).spec == P(None, "tensor")  # [r, 2*12]: the heads axis carries "tensor"
        assert codes(moments["b"]).spec == P("tensor")  # full rank: the parameter's own
        if eight_bit:
            assert moments["wq"].scales.spec == P()


def test_eight_devices_equal_one_device():
    _, params, param_shardings = mesh_and_params()
    tx = make_tx(eight_bit=False)
    state_shardings = optimizer_state_shardings(tx, params, param_shardings, matrix_axes=AXES)
    sharded = jax.device_put(params, param_shardings)
    p8, s8 = run(tx, sharded, 5, shard=(param_shardings, state_shardings))
    p1, s1 = run(tx, params, 5)
    assert p8["wq"].sharding.spec == P("fsdp", "tensor")
    assert s8[0].projectors["wq"].right.sharding.spec == P(None, "tensor")
    assert s8[0].inner_state.mu["down"].sharding.spec == P("tensor", None)
    chex.assert_trees_all_close(p8, p1, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s8[0].projectors, s1[0].projectors, rtol=1e-4, atol=1e-5)


def test_orbax_save_restore_resumes_bit_exactly(tmp_path):
    tx = galore_adamw_8bit(1e-2, rank=4, update_proj_gap=2, block_size=32, min_size=16)
    rng = np.random.default_rng(0)
    shapes = {"wq": SHAPES["wq"], "b": SHAPES["b"]}
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}

    @jax.jit
    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for i in range(3):
        params, state = step(params, grads_at(i, shapes), state)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.StandardSave({"params": params, "opt_state": state}))
        manager.wait_until_finished()
    straight_p, straight_s = params, state
    for i in range(3, 6):
        straight_p, straight_s = step(straight_p, grads_at(i, shapes), straight_s)

    abstract = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(3, args=ocp.args.StandardRestore(abstract))
    chex.assert_trees_all_equal_structs(restored["opt_state"], state)
    chex.assert_trees_all_equal(restored["opt_state"], state)
    p, s = restored["params"], restored["opt_state"]
    for i in range(3, 6):
        p, s = step(p, grads_at(i, shapes), s)
    chex.assert_trees_all_equal(p, straight_p)
    chex.assert_trees_all_equal(s, straight_s)
    assert int(s[0].projectors["wq"].refreshes) == 3  # steps 0, 2, 4


def test_tree_shardings_of_non_gradient_state():
    mesh, params, param_shardings = mesh_and_params()
    sds = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    tree = {
        "ema": jax.eval_shape(lambda p: p, params),  # the params' structure: each leaf its parameter's sharding
        "col_stats": {"wq": sds((32,)), "down": sds((16,)), "b": sds((24,)), "x3": sds((16, 12))},  # one axis dropped
        "batch_stats": {"bn": {"mean": sds((24,)), "var": sds((24,))}},  # another structure: replicated
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    specs = {k: s.spec for k, s in param_shardings.items()}
    out = tree_shardings(tree, params, specs, mesh=mesh)
    assert jax.tree.map(lambda s: s.spec, out["ema"]) == specs
    assert jax.tree.map(lambda s: s.spec, out["col_stats"]) == {
        "wq": P("fsdp"), "down": P("fsdp"), "b": P("tensor"), "x3": P("fsdp", None)}
    assert out["batch_stats"]["bn"]["mean"].spec == P() and out["step"].spec == P()
    assert all(s.mesh == mesh for s in jax.tree.leaves(out))


@pytest.mark.parametrize("make", [lambda: make_tx(eight_bit=True), lambda: optax.adamw(1e-3)],
                         ids=["galore_adamw_8bit", "optax.adamw"])
def test_optimizer_state_shardings_is_tree_shardings_of_init(make):
    _, params, param_shardings = mesh_and_params()
    tx = make()
    expected = tree_shardings(jax.eval_shape(tx.init, params), params, param_shardings, matrix_axes=AXES)
    got = optimizer_state_shardings(tx, params, param_shardings, matrix_axes=AXES)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    assert jax.tree.leaves(got) == jax.tree.leaves(expected)


def test_adamw_moments_follow_their_parameters():
    _, params, param_shardings = mesh_and_params()
    adam = optimizer_state_shardings(optax.adamw(1e-3), params, param_shardings)[0]
    for moments in (adam.mu, adam.nu):
        assert jax.tree.map(lambda s: s.spec, moments) == {k: s.spec for k, s in param_shardings.items()}
    assert adam.count.spec == P()
