"""The memory experiment: closed forms against hand counts and eval_shape, the per-leaf clipping
switch against NumPy, the per-layer step against the standard step, and the smoke run."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from experiments import memory
from lorank.train import lm, loop, methods, optimizers

REPO = pathlib.Path(__file__).resolve().parents[1]
PAPER_METHODS = ("adamw", "adamw8bit", "galore", "galore8bit", "galore_adafactor", "lowrank", "lora", "relora")


def memory_config(variant="smoke"):
    spec = importlib.util.spec_from_file_location("memory_config", REPO / "configs" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def shapes(size):
    config = memory.size_config(memory_config(), size, "adamw", "global_clip")
    return memory.Shapes.from_model_config(config.model), config


def test_closed_form_matches_hand_counts_for_60m():
    s, _ = shapes("60m")
    assert (s.vocab, s.hidden, s.intermediate, s.layers, s.param_bytes) == (32000, 512, 1376, 8, 2)
    # V d (embedding) + L (4 d^2 + 3 d f + 2 d) + d + d V (LM head) = 58,073,600 weights.
    adamw = memory.closed_form(s, "adamw", rank=128)
    assert adamw["params"] == adamw["trainable"] == 58_073_600
    assert adamw["param_bytes"] == adamw["grad_bytes"] == 2 * 58_073_600
    assert adamw["optimizer_state_bytes"] == 4 * 58_073_600  # two bf16 moments
    # GaLore r = 128: per block 4 x (128*512 + 2*128*512) + 3 x (128*512 + 2*128*1376) + 2 x 2*512 values,
    # embedding and head 2 x 2 x 16,384,000, final norm 2 x 512; all bf16.
    per_block = 4 * 3 * 65_536 + 3 * (65_536 + 352_256) + 2_048
    galore = memory.closed_form(s, "galore", rank=128)
    assert galore["optimizer_state_bytes"] == 2 * (8 * per_block + 65_536_000 + 1_024) == 163_743_744
    # LoRA adds r (m + n) per kernel and trains only those and the full-rank rest.
    lora = memory.closed_form(s, "lora", rank=128)
    factors = 8 * 128 * (4 * 1024 + 3 * 1888)
    assert lora["params"] == 58_073_600 + factors
    assert lora["trainable"] == 58_073_600 - 8 * (4 * 512 * 512 + 3 * 512 * 1376) + factors


@pytest.mark.parametrize("size", ["smoke", "60m"])
@pytest.mark.parametrize("method", PAPER_METHODS)
def test_closed_form_agrees_with_eval_shape(size, method):
    """parameter_report (eval_shape of init and tx.init) equals the closed form; the state also
    holds scalar counters, at most 16 bytes per leaf."""
    s, config = shapes(size)
    config.optim.name = method
    model = lm.build_llama(config)
    report = methods.parameter_report(methods.build_method(config, lm.shapes_task(model)))
    closed = memory.closed_form(s, method, int(config.optim.rank), int(config.optim.block_size))
    assert report["total"] == closed["params"]
    assert report["trainable"] == closed["trainable"]
    assert report["param_bytes"] == closed["param_bytes"]
    extra = report["optimizer_state_bytes"] - closed["optimizer_state_bytes"]
    assert 0 <= extra <= 16 * len(memory.leaf_shapes(s)) + 64, (extra, report, closed)


def test_closed_form_rejects_unknown_method():
    s, _ = shapes("smoke")
    with pytest.raises(ValueError, match="unknown method 'adam'"):
        memory.closed_form(s, "adam", rank=8)


def test_q8_bytes_small_leaves_stay_in_parameter_dtype():
    assert memory.q8_bytes(4095, 256, 2) == 8190
    assert memory.q8_bytes(4096, 256, 2) == 4096 + 4 * 16
    assert memory.q8_bytes(5000, 256, 2) == 5000 + 4 * 20


def clip_config(scope, clip=1.0):
    return ConfigDict({"clip_norm": clip, "clip_scope": scope})


def test_per_leaf_clipping_matches_numpy():
    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(3, 4)) * 2.0, "b": rng.normal(size=(5,)) * 0.01, "c": rng.normal(size=(2, 2))}
    tx = optimizers.with_clipping(clip_config("per_leaf", 0.5), optax.identity())
    out, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(grads))
    for k, g in grads.items():
        norm = np.sqrt(np.sum(g.astype(np.float64) ** 2))
        expected = g if norm < 0.5 else g * (0.5 / norm)
        np.testing.assert_allclose(np.asarray(out[k]), expected, rtol=1e-6, atol=1e-7)
    assert np.sqrt(np.sum(np.asarray(out["a"]) ** 2)) == pytest.approx(0.5, rel=1e-6)
    np.testing.assert_array_equal(np.asarray(out["b"]), grads["b"].astype(np.float32))  # under the threshold


def test_per_leaf_clipping_keeps_dtype_and_global_is_the_default():
    g = {"w": jnp.full((4, 4), 3.0, jnp.bfloat16)}
    tx = optimizers.with_clipping(clip_config("per_leaf"), optax.identity())
    out, _ = tx.update(g, tx.init(g))
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out["w"], np.float32), 0.25, rtol=1e-2)  # ||w|| = 12
    grads = {"a": jnp.full((2,), 3.0), "b": jnp.full((2,), 4.0)}
    legacy = optimizers.with_clipping(ConfigDict({"clip_norm": 1.0}), optax.identity())  # no clip_scope field
    out, _ = legacy.update(grads, legacy.init(grads))
    total = np.sqrt(sum(float(jnp.sum(v**2)) for v in out.values()))
    assert total == pytest.approx(1.0, rel=1e-6)


def test_unknown_clip_scope_is_an_error():
    with pytest.raises(ValueError, match="clip_scope='layer'"):
        optimizers.with_clipping(clip_config("layer"), optax.identity())


def smoke_setup(method, clip_norm=0.3):
    config = memory_config()
    config.dtype = "float32"
    c = memory.size_config(config, "smoke", method, "per_leaf_clip")
    c.optim.warmup_steps = 0
    c.optim.clip_norm = clip_norm  # below the smoke model's leaf norms: clipping acts
    model = lm.build_llama(c)
    return c, model, methods.build_method(c, lm.shapes_task(model))


@pytest.mark.parametrize("method, chunk", [("adamw", 4096), ("galore8bit", 4096), ("galore_adafactor", 4096)])
def test_per_layer_step_equals_the_standard_step(method, chunk):
    """Same loss, gradient norm and parameters after 3 steps as loop.make_train_step with per-leaf
    clipping (float32); the embedding and LM head in row chunks (none for Adafactor's factored moments)."""
    c, model, m = smoke_setup(method)
    key = jax.random.key(1)
    init, _, _ = loop.state_layout(m.task.init_params, m.tx, memory.one_device_mesh(), key)
    standard = init(key)
    step_b, init_b = memory.per_layer_setup(c, model, chunk)
    layered = init_b(key)
    chunked = [name for name in layered.opt_state if "[" in name]
    assert bool(chunked) == (chunk > 0 and method in memory.ELEMENTWISE), chunked
    batch = jax.random.randint(jax.random.key(2), (1, 2, 33), 0, c.model.vocab_size)
    step_a, step_b = jax.jit(loop.make_train_step(m.task.loss_fn, m.tx)), jax.jit(step_b)
    for _ in range(3):
        standard, metrics_a = step_a(standard, batch)
        layered, metrics_b = step_b(layered, batch)
        np.testing.assert_allclose(metrics_b["loss"], metrics_a["loss"], rtol=1e-6)
        np.testing.assert_allclose(metrics_b["grad_norm"], metrics_a["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6), standard.params, layered.params)
    assert not np.allclose(standard.params["lm_head"]["kernel"], init(key).params["lm_head"]["kernel"])


def test_per_layer_step_skips_the_update_on_a_nonfinite_loss():
    c, model, _ = smoke_setup("adamw")
    step, init = memory.per_layer_setup(c, model, 4096)
    state = init(jax.random.key(0))
    state = state.replace(params={**state.params, "lm_head": {"kernel": state.params["lm_head"]["kernel"] * jnp.nan}})
    new, metrics = jax.jit(step)(state, jnp.zeros((1, 2, 33), jnp.int32))
    assert not np.isfinite(metrics["loss"])
    for name in ("embed", "layers_0"):
        jax.tree.map(np.testing.assert_array_equal, new.params[name], state.params[name])


def test_per_layer_setup_rejects_factored_methods_and_tiny_chunks():
    c, model, _ = smoke_setup("adamw")
    with pytest.raises(ValueError, match="update_chunk=1000"):
        memory.per_layer_setup(c, model, 1000)
    c.optim.name = "lora"
    with pytest.raises(ValueError, match="'lora' factors them"):
        memory.per_layer_setup(c, model, 0)


def test_row_chunks_cover_the_rows_in_whole_quantization_blocks():
    chunks = memory.row_chunks(32000, 4096, 2**24, 256)
    assert chunks[0] == (0, 4096) and chunks[-1][1] == 32000
    assert all(b == a2 for (_, b), (a2, _) in zip(chunks, chunks[1:]))
    assert all((b - a) * 4096 <= 2**24 for a, b in chunks)
    # 100 columns: a block of 256 values ends on a row boundary every 64 rows.
    assert all(a * 100 % 256 == 0 for a, _ in memory.row_chunks(1000, 100, 10_000, 256))


def test_update_plan_and_piece_trees():
    params = {"embed": {"embedding": jnp.zeros((64, 32))}, "final_norm": {"scale": jnp.zeros(32)},
              "lm_head": {"kernel": jnp.zeros((32, 64))}, "layers_0": {"w": {"kernel": jnp.zeros((32, 32))}}}
    plan = memory.update_plan(params, 1, chunk_values=1024, block_size=256,
                              chunkable=lambda path, shape: path[0] != "layers_0")
    names = [[p.name for p in pieces] for pieces in plan]
    assert names == [["final_norm+lm_head", "lm_head/kernel[0:16]", "lm_head/kernel[16:32]"], ["layers_0"],
                     ["embed/embedding[0:32]", "embed/embedding[32:64]"]]
    head = {k: params[k] for k in ("final_norm", "lm_head")}
    assert jax.tree.structure(memory.piece_tree(head, plan[0][0])) == jax.tree.structure(
        {"final_norm": {"scale": 0}})
    assert memory.piece_tree(head, plan[0][2])["lm_head"]["kernel"].shape == (16, 64)


def test_layer_groups_follow_the_backward_pass():
    assert memory.layer_groups(2) == [("final_norm", "lm_head"), ("layers_1",), ("layers_0",), ("embed",)]


def test_smoke_run_measures_without_touching_docs(tmp_path):
    before = (REPO / "docs" / "memory.md").read_text()
    config = memory_config()
    config.methods = ("adamw", "lora")
    config.updates = ("per_layer",)
    rows = memory.run(config, str(tmp_path))["rows"]
    assert (REPO / "docs" / "memory.md").read_text() == before
    assert (tmp_path / "memory.json").exists()
    by_method = {r["method"]: r for r in rows}
    assert by_method["lora"]["compiled"] is None  # factored methods have no per-layer step
    stats = by_method["adamw"]["compiled"]
    assert stats["peak"] == stats["argument"] + stats["output"] - stats["alias"] + stats["temp"]
    assert stats["argument"] >= by_method["adamw"]["param_bytes"] + by_method["adamw"]["optimizer_state_bytes"]
    config.methods, config.updates, config.compile = ("adamw", "galore"), ("per_layer", "no_clip"), False
    merged = memory.run(config, str(tmp_path))["rows"]
    assert len(merged) == 5  # adamw/per_layer was replaced, four rows are new
    assert all(r["compiled"] is None for r in merged)


def test_bad_configs_fail_before_compiling(tmp_path):
    config = memory_config()
    config.sizes = ("5b",)
    with pytest.raises(ValueError, match="unknown size '5b'"):
        memory.run(config, str(tmp_path))
    config = memory_config()
    config.methods = ("adamw", "adam")
    with pytest.raises(ValueError, match="adam"):
        memory.run(config, str(tmp_path))
    config = memory_config()
    config.updates = ("fused",)
    with pytest.raises(ValueError, match="fused"):
        memory.run(config, str(tmp_path))
    with pytest.raises(ValueError, match="unknown update option 'fused'"):
        memory.size_config(memory_config(), "smoke", "adamw", "fused")
