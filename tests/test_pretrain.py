"""The main job end to end on the smoke config: outputs, sampling, resume, bad input."""

import importlib.util
import json
import os
import pathlib

import pytest

from experiments import pretrain, sample
from lorank.train import loop

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "llama.py"


def smoke_config():
    spec = importlib.util.spec_from_file_location("llama_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("smoke")


def test_pretrain_writes_metrics_plot_checkpoint_and_samples(tmp_path):
    workdir = str(tmp_path)
    lines = []
    summary = pretrain.run(smoke_config(), workdir, log=lines.append)
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
