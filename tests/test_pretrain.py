"""The main job end to end on the smoke config: outputs, sampling, resume, bad input."""

import json
import os
import pathlib

import shutil

import jax
import numpy as np
import pytest

from experiments import sample
from lorank import config_files
from lorank.train import loop, pretrain

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "llama.py"


def smoke_config():
    return config_files.load(CONFIG, "smoke")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """(workdir, summary, log lines) of one smoke run, shared by the tests that only read it."""
    workdir = tmp_path_factory.mktemp("smoke")
    lines = []
    summary = pretrain.run(smoke_config(), str(workdir), log=lines.append)
    return workdir, summary, lines


def test_pretrain_writes_metrics_plot_checkpoint_and_samples(smoke_run):
    workdir, summary, lines = smoke_run
    workdir = str(workdir)
    assert summary["steps"] == 12
    assert summary["final_eval_loss"] < 5.3  # below ln 256 = 5.55 after a few steps
    assert any(ln.startswith("model: 37,024 parameters") for ln in lines)
    assert any("tokens/s" in ln and "ETA" in ln for ln in lines)
    for name in ("metrics.jsonl", "loss.png", "grad_stable_rank.png", "config.json", "checkpoints"):
        assert os.path.exists(os.path.join(workdir, name)), name
    records = [json.loads(x) for x in open(os.path.join(workdir, loop.METRICS_FILE))]
    assert records[0]["step"] == 0 and records[0]["eval_loss"] == pytest.approx(5.55, abs=0.1)
    for kind in ("attention", "mlp", "embedding", "lm_head"):  # smoke tracks gradient ranks
        rank = records[0][f"grad_stable_rank/{kind}"]
        assert 1.0 <= rank <= 32  # a stable rank lies in [1, min(m, n)]
    assert summary["sample"].startswith("ROMEO:") and len(summary["sample"].encode()) >= 6 + 16 - 3
    # experiments.sample reproduces the end-of-training sample from the checkpoint
    c = smoke_config().sample
    assert sample.sample(workdir, c.prompt, c.length, temperature=c.temperature, seed=c.seed) == summary["sample"]


def test_a_corrupt_checkpoint_is_detected_by_sampling_and_resuming(smoke_run, tmp_path, damage):
    """256 bytes flipped in the largest data file of the newest checkpoint (step 12): sampling
    names it and falls back to step 6; a resumed run names it, moves it aside, retrains steps
    7-12 and ends where the intact run ended."""
    source, summary, _ = smoke_run
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    damaged = damage(workdir / loop.CHECKPOINT_DIR / "12")
    warnings = []
    config, _, params = sample.load_params(str(workdir), warn=warnings.append)
    assert any(str(damaged) in w and "corrupt" in w for w in warnings)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    lines = []
    resumed = pretrain.run(smoke_config(), str(workdir), log=lines.append)
    assert any(str(damaged) in ln for ln in lines) and any("resumed" in ln and "step 6" in ln for ln in lines)
    assert resumed["final_eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-6)
    assert resumed["sample"] == summary["sample"]


def test_missing_corpus_is_named_before_anything_is_written(tmp_path):
    config = smoke_config()
    config.data.corpus = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        pretrain.run(config, str(tmp_path / "run"), log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_batch_not_divisible_by_mesh_is_rejected(tmp_path):
    config = smoke_config()
    config.mesh.data, config.train.batch_size = 8, 12
    with pytest.raises(ValueError, match="data-parallel size 8"):
        pretrain.run(config, str(tmp_path / "run"), log=lambda _: None)


def test_mesh_not_dividing_devices_is_rejected(tmp_path):
    config = smoke_config()
    config.mesh.data, config.mesh.fsdp = 3, 1
    with pytest.raises(ValueError, match="needs 3 devices but 8 are available"):
        pretrain.run(config, str(tmp_path / "run"), log=lambda _: None)


def test_sampling_an_empty_workdir_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        sample.sample(str(tmp_path), "A", 3)


def test_lora_run_samples_from_the_merged_model_and_sample_reloads_it(tmp_path):
    config = smoke_config()
    config.optim.name = "lora"
    config.analysis.grad_rank = False
    config.model.num_layers = 1
    config.train.steps = config.train.eval_every = config.train.checkpoint_every = 4
    lines = []
    summary = pretrain.run(config, str(tmp_path), log=lines.append)
    assert summary["trainable_params"] < summary["params"]
    assert any(ln.startswith(f"method lora: {summary['params']:,} parameters "
                             f"({summary['trainable_params']:,} trainable)") for ln in lines)
    c = config.sample
    assert sample.sample(str(tmp_path), c.prompt, c.length, temperature=c.temperature, seed=c.seed) == summary["sample"]


def test_missing_tokenizer_file_is_named_before_anything_is_written(tmp_path):
    config = smoke_config()
    config.data.tokenizer = str(tmp_path / "spiece.model")
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        pretrain.run(config, str(tmp_path / "run"), log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_unprepared_tfds_dataset_names_dataset_and_data_dir(tmp_path):
    config = smoke_config()
    config.data.source = "tfds"
    config.data.tfds_name = "wikitext/wikitext-2-raw-v1"
    config.data.tfds_data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match=r"wikitext/wikitext-2-raw-v1.*data_dir=.*tfds"):
        pretrain.run(config, str(tmp_path / "run"), log=lambda _: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value, message", [
    ("name", "adam", "unknown optim.name='adam'"),
    ("rank", 64, r"optim.rank=64 exceeds min\(32, 32\)=32"),
])
def test_bad_method_settings_are_rejected_before_anything_is_written(tmp_path, field, value, message):
    config = smoke_config()
    config.optim.name = "galore"
    config.optim[field] = value
    with pytest.raises(ValueError, match=message):
        pretrain.run(config, str(tmp_path / "run"), log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_paper_configs_have_the_reference_shapes_and_recipe():
    reference = {"60m": (512, 1376, 8, 8, 10_000, 128), "130m": (768, 2048, 12, 12, 20_000, 256),
                 "350m": (1024, 2736, 16, 24, 60_000, 256), "1b": (2048, 5461, 32, 24, 100_000, 512),
                 "7b": (4096, 11008, 32, 32, 150_000, 1024)}
    for size, (d, f, heads, layers, steps, rank) in reference.items():
        c = config_files.load(CONFIG, size)
        m, o = c.model, c.optim
        assert (m.hidden_size, m.intermediate_size, m.num_heads, m.num_layers) == (d, f, heads, layers)
        assert (m.vocab_size, c.data.seq_len, c.train.batch_size, c.train.steps) == (32000, 256, 512, steps)
        assert (o.rank, o.galore_lr, o.galore_scale, o.update_proj_gap) == (rank, 0.01, 0.25, 200)
        assert (o.warmup_steps, o.min_lr_ratio) == (steps // 10, 0.1)
