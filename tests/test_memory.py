"""The memory experiment: closed forms against hand counts and eval_shape, the per-leaf clipping
switch against NumPy, and the smoke run (the per-layer step: tests/train/test_per_layer.py)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from experiments import memory
from lorank import config_files
from lorank.models import llama
from lorank.train import lm, methods, optimizers

REPO = pathlib.Path(__file__).resolve().parents[1]
PAPER_METHODS = ("adamw", "adamw8bit", "galore", "galore8bit", "galore_adafactor", "lowrank", "lora", "relora")


def memory_config(variant="smoke"):
    return config_files.load(REPO / "configs" / "memory.py", variant)


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
    report = methods.parameter_report(methods.build_method(config, lm.shapes_task(model), llama.FAMILY))
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
    with pytest.raises(ValueError, match=r"optim.clip_scope must be one of \('global', 'per_leaf'\), got 'layer'"):
        optimizers.with_clipping(clip_config("layer"), optax.identity())


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


SMALL_TIED = '''
from lorank import config_files


def get_config(arg):
    """configs/finetune.py:gemma_2b shrunk: V 512, D 256, F 512, 8 heads of 32, one kv head, 2 layers, tied."""
    c = config_files.load("configs/finetune.py", "gemma_2b")
    c.model.vocab_size, c.model.hidden_size, c.model.intermediate_size = 512, 256, 512
    c.model.num_heads, c.model.num_kv_heads, c.model.num_layers = 8, 1, 2
    c.optim.rank = 32
    return c
'''

# V 512, D 256, F 512, K = 1 x 32, L 2, tied, r 32, bfloat16. Per block: norms 2 x 256, q/o 2 x 256^2,
# k/v 2 x 256 x 32, gate/up 2 x 256 x 512, down 512 x 256 = 541,184; embedding 512 x 256 = 131,072;
# final norm 256; no LM head.
SMALL_PARAMS = 2 * 541_184 + 131_072 + 256
# LoRA factors r (m + n): q/o 2 x 32 x 512, k/v 2 x 32 x 288, gate/up/down 3 x 32 x 768 per block.
SMALL_FACTORS = 2 * (2 * 16_384 + 2 * 9_216 + 3 * 24_576)
# GaLore r 32 projects kernels with min(m, n) > 32: q/o 32 x 256 + 2 x 32 x 256, gate/up/down
# 32 x 256 + 2 x 32 x 512; k/v [256, 32] keep two full moments 2 x 8,192; norms 2 x 2 x 256 per block;
# embedding 2 x 131,072; final norm 2 x 256.
SMALL_GALORE_VALUES = 2 * (2 * 24_576 + 3 * 40_960 + 2 * 16_384 + 1_024) + 262_144 + 512


def test_finetune_variant_closed_forms_for_gqa_and_tied_embeddings(tmp_path):
    (tmp_path / "small.py").write_text(SMALL_TIED)
    config = memory_config("finetune")
    assert config.model_config == "configs/finetune.py" and config.sizes == ("llama_7b", "gemma_2b")
    assert (config.seq_len, config.batch_size, config.dtype, config.remat) == (512, 1, "bfloat16", "full")
    assert config.docs_block == "memory_finetune" and config.fit_bytes == 24 * 10**9 and not config.write_benchmarks
    gemma = memory.Shapes.from_model_config(memory.size_config(config, "gemma_2b", "lora", "global_clip").model)
    assert (gemma.kv_size, gemma.tied) == (256, True)
    # 18 (2 x 2048^2 + 2 x 2048 x 256 + 3 x 2048 x 16384 + 2 x 2048) + 256000 x 2048 + 2048, no LM head.
    assert memory.closed_form(gemma, "adamw", 128)["params"] == 2_506_172_416

    config.model_config = str(tmp_path / "small.py")
    config.sizes, config.compile, config.write_docs = ("small",), False, False
    before = (REPO / "docs" / "memory.md").read_text()
    rows = memory.run(config, str(tmp_path / "work"))["rows"]
    assert (REPO / "docs" / "memory.md").read_text() == before
    assert len(rows) == 2 * len(config.methods)
    by = {(r["method"], r["update"]): r for r in rows}
    for method in config.methods:  # eval_shape of init and tx.init agree; the state adds scalar counters only
        row = by[(method, "global_clip")]
        assert (row["params"], row["trainable"]) == (row["closed"]["params"], row["closed"]["trainable"])
        assert 0 <= row["optimizer_state_bytes"] - row["closed"]["optimizer_state_bytes"] <= 16 * 20 + 64
        assert row["compiled"] is None and row["compile_skipped"]
        assert not by[(method, "per_layer")]["compile_skipped"]  # tied embeddings: no per-layer step

    adamw, galore, lora = (by[(m, "global_clip")]["closed"] for m in ("adamw", "galore", "lora"))
    assert adamw["params"] == adamw["trainable"] == SMALL_PARAMS == 1_213_696
    assert adamw["param_bytes"] == adamw["grad_bytes"] == 2 * SMALL_PARAMS
    assert adamw["optimizer_state_bytes"] == 4 * SMALL_PARAMS
    assert galore["optimizer_state_bytes"] == 2 * SMALL_GALORE_VALUES == 1_348_608
    assert lora["params"] == SMALL_PARAMS + SMALL_FACTORS == 1_463_552
    assert lora["trainable"] == SMALL_FACTORS + 131_072 + 2 * 512 + 256 == 382_208
    assert lora["grad_bytes"] == 2 * 382_208 and lora["optimizer_state_bytes"] == 4 * 382_208
    s = memory.Shapes.from_model_config(memory.size_config(config, "small", "adamw", "global_clip").model)
    assert [shape for shape, _ in memory.leaf_shapes(s)][1:9] == [(256,), (256,), (256, 256), (256, 32), (256, 32),
                                                                    (256, 256), (256, 512), (256, 512)]
    tables = memory.tables_markdown(rows, config.fit_bytes)
    assert "| small | galore | | not compiled | n/a | not compiled | n/a |" in tables.replace("|  |", "| |")
    assert "global_clip peak <= 24 GB" in tables


def test_fit_column_compares_the_peak_with_fit_bytes():
    def row(method, peak):
        compiled = {"argument": peak, "output": 0, "alias": 0, "temp": 0, "peak": peak}
        return {"size": "x", "method": method, "update": "global_clip", "compiled": compiled}

    table = memory.peaks_table([row("adamw", 24 * 10**9), row("lora", 24 * 10**9 + 1)], ("global_clip",), 24 * 10**9)
    assert "| x | adamw | 24.000 | 24.000 (0.000) | yes |" in table
    assert "| x | lora | 24.000 | 24.000 (0.000) | no |" in table
    assert "<=" not in memory.peaks_table([row("adamw", 1)], ("global_clip",))
