"""Fine-tuning: the start is the pretrained model for every method, runs resume, Hugging Face checkpoints
and instruction data go in and out, the response-only loss, and bad input fails before compute."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lorank import config_files
from lorank.data import lm_sources, text
from lorank.models import hf, llama
from lorank.optim import scale_by_galore
from lorank.train import finetune, lm, pretrain

REPO = pathlib.Path(__file__).resolve().parents[2]


def smoke_config(**optim):
    c = config_files.load(REPO / "configs" / "finetune.py", "smoke")
    c.train.steps, c.train.eval_every, c.train.log_every, c.train.checkpoint_every = 6, 3, 3, 3
    c.sample.length = 4
    for k, v in optim.items():
        c.optim[k] = v
    return c


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretraining smoke run's workdir (configs/llama.py:smoke, 12 steps)."""
    path = tmp_path_factory.mktemp("pretrained")
    c = config_files.load(REPO / "configs" / "llama.py", "smoke")
    c.analysis.grad_rank = False
    c.sample.length = 4
    pretrain.run(c, str(path), log=lambda _: None)
    return str(path)


def finetune_in(path, config, start, **kwargs):
    config.init.path = start
    return finetune.run(config, str(path), log=lambda _: None, **kwargs)


def metrics(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def held_out_loss(model, params, config):
    """The start model's mean loss over the held-out rows the run evaluates, computed outside the run."""
    data = lm_sources.load_lm_data(config.data, text.ByteTokenizer(), batch_size=config.train.batch_size,
                                   num_val=config.train.eval_batches * config.train.batch_size)
    rows = data.val[: config.train.eval_batches * config.train.batch_size]
    loss = lm.next_token_loss(model)
    return float(np.mean([loss(params, rows[i:i + config.train.batch_size])
                          for i in range(0, len(rows), config.train.batch_size)]))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adamw", "galore", "lora", "galore8bit:per_layer"])
def test_every_method_starts_from_the_pretrained_model_and_lowers_the_held_out_loss(method, pretrained, tmp_path):
    name, _, schedule = method.partition(":")
    config = smoke_config(name=name, rank=4)
    if schedule:
        config.optim.update_schedule, config.optim.clip_scope = schedule, "per_leaf"
    summary = finetune_in(tmp_path, config, pretrained)
    _, model, params = pretrain.load_run(pretrained)
    first = next(r for r in metrics(tmp_path) if "eval_loss" in r)
    assert first["step"] == 0
    np.testing.assert_allclose(first["eval_loss"], held_out_loss(model, params, config), rtol=1e-5)
    np.testing.assert_allclose(first["eval_perplexity"], np.exp(first["eval_loss"]), rtol=1e-6)
    assert "eval_loss/retain" in first
    assert summary["final_eval_loss"] < first["eval_loss"] - 0.05
    assert summary["steps"] == 6


@pytest.mark.slow
def test_a_resumed_fine_tune_retraces_the_uninterrupted_one(pretrained, tmp_path):
    whole = finetune_in(tmp_path / "whole", smoke_config(), pretrained)
    finetune_in(tmp_path / "split", smoke_config(), pretrained, stop_at=3)
    resumed = finetune_in(tmp_path / "split", smoke_config(), pretrained)
    assert resumed["final_eval_loss"] == whole["final_eval_loss"]
    saved = json.loads((tmp_path / "split" / "config.json").read_text())
    assert saved["model"]["hidden_size"] == 32 and saved["init"]["path"] == pretrained


def test_the_instruction_loss_counts_only_masked_targets():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, size=(2, 6)).astype(np.int32)
    mask = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], np.float32)
    logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    expected = (nll * mask).sum() / mask.sum()
    got = lm.batch_loss(jnp.asarray(logits), {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)})
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    changed = tokens.copy()
    changed[0, 1:3] = (changed[0, 1:3] + 1) % 7  # targets at masked-out positions 0 and 1 of row 0
    same = lm.batch_loss(jnp.asarray(logits), {"tokens": jnp.asarray(changed), "loss_mask": jnp.asarray(mask)})
    assert float(same) == float(got)


def test_galore_at_full_rank_with_an_identity_inner_transformation_passes_the_gradient(pretrained):
    _, model, params = pretrain.load_run(pretrained)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, size=(4, 33)), jnp.int32)
    grads = jax.grad(lm.next_token_loss(model))(params, tokens)
    full = min(min(g.shape) for g in jax.tree.leaves(grads) if g.ndim == 2)
    tx = scale_by_galore(full, 5, 1.0, inner=optax.identity(), galore_mask=llama.galore_mask)
    updates, _ = tx.update(grads, tx.init(params), params)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(g), atol=1e-6 * float(jnp.abs(g).max()) + 1e-9)


def write_records(path, count=40):
    lines = [json.dumps({"prompt": f"add {i} and {i + 1}", "response": f"{2 * i + 1}"}) for i in range(count // 2)]
    lines += [json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                       {"role": "assistant", "content": f"{i} " * 3}]}) for i in range(count // 2)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.slow
def test_a_hugging_face_checkpoint_fine_tuned_on_instructions_with_lora_exports_merged(tmp_path):
    cfg = llama.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2,
                            num_layers=2, max_len=64, tie_embeddings=True)
    model = llama.Llama(cfg)
    params = jax.tree.map(np.asarray, lm.init_params_fn(model)(jax.random.key(3)))
    hf.save_llama(tmp_path / "start", model, jax.tree.map(lambda x: getattr(x, "value", x), params,
                                                          is_leaf=lambda x: hasattr(x, "value")))
    config = smoke_config(name="lora", rank=4)
    config.init.source, config.init.pretrain = "hf", ""
    config.data.source, config.data.tokenizer, config.data.seq_len = "jsonl", "byte", 48
    config.data.train_file, config.data.val_fraction = write_records(tmp_path / "sft.jsonl", 80), 0.2
    config.eval.retain_corpus = ""
    config.export.hf_path = str(tmp_path / "out")
    summary = finetune_in(tmp_path / "run", config, str(tmp_path / "start"))
    assert summary["final_eval_loss"] < next(r for r in metrics(tmp_path / "run") if "eval_loss" in r)["eval_loss"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert saved["num_kv_heads"] == 2 and saved["tie_embeddings"] is True
    exported_model, exported = hf.load_llama(tmp_path / "out")
    _, run_model, run_params = pretrain.load_run(str(tmp_path / "run"))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, size=(2, 16)), jnp.int32)
    np.testing.assert_allclose(np.asarray(exported_model.apply({"params": exported}, tokens)),
                               np.asarray(run_model.apply({"params": run_params}, tokens)), atol=1e-5)


@pytest.mark.parametrize("change, match", [
    (lambda c: c.init.update(source="torch"), "init.source"),
    (lambda c: c.optim.update(name="lowrank"), "replaces every pretrained"),
    (lambda c: c.init.update(path="", pretrain=""), "init.path is empty"),
    (lambda c: c.init.update(path="/nonexistent/run", pretrain=""), "/nonexistent/run"),
    (lambda c: c.init.update(source="hf"), "init.pretrain"),
])
def test_bad_starts_fail_before_anything_is_written(change, match, tmp_path):
    config = smoke_config()
    config.init.path = str(tmp_path / "start") if "path" not in match else config.init.path
    change(config)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        finetune.run(config, str(tmp_path / "run"), log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_a_hugging_face_start_without_a_tokenizer_file_is_named(pretrained, tmp_path):
    _, model, params = pretrain.load_run(pretrained)
    hf.save_llama(tmp_path / "start", model, params)
    config = smoke_config()
    config.init.source, config.init.pretrain, config.init.path = "hf", "", str(tmp_path / "start")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        finetune.run(config, str(tmp_path / "run"), log=lambda _: None)
    config.data.seq_len = 64  # longer than the start's max_len 32
    config.data.tokenizer = "byte"
    with pytest.raises(ValueError, match="max_len"):
        finetune.run(config, str(tmp_path / "run"), log=lambda _: None)
    assert not (tmp_path / "run").exists()
