"""The nanoGPT comparison: log parsing, FLOP counts, where nanoGPT is found, and the smoke run's numbers."""

import pathlib

import pytest

from experiments import bench_nanogpt, benchlib
from lorank import config_files

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "bench_nanogpt.py"

NANOGPT_LOG = """\
number of parameters: 0.80M
num decayed parameter tensors: 18, with 802,944 parameters
step 0: train loss 4.1676, val loss 4.1649
iter 0: loss 4.1806, time 812.51ms, mfu -100.00%
iter 1: loss 3.9000, time 40.00ms, mfu -100.00%
iter 2: loss 3.5000, time 44.00ms, mfu -100.00%
step 3: train loss 3.1000, val loss 3.2000
saving checkpoint to out-shakespeare-char
iter 3: loss 3.0000, time 300.00ms, mfu 0.01%
"""

OURS_LOG = """\
model: 918,656 parameters | data: 1,003,855 train / 111,539 validation tokens
step 900/900 | eval_loss 1.8098
sample:
ROMEO:
What say you?
done in 234.6s: {"method": "adamw", "steps": 900, "seconds": 234.5, "params": 918656, "final_eval_loss": 1.8097}
"""


def config(variant):
    return config_files.load(CONFIG, variant)


def test_nanogpt_log_gives_the_last_evaluation_and_iteration_times():
    parsed = bench_nanogpt.parse_nanogpt_log(NANOGPT_LOG)
    assert (parsed["step"], parsed["train_loss"], parsed["val_loss"]) == (3, 3.1, 3.2)
    assert parsed["evals"] == [(0, 4.1649), (3, 3.2)]
    assert parsed["iter_seconds"] == [(0, 0.81251), (1, 0.04), (2, 0.044), (3, 0.3)]
    assert parsed["params_millions"] == 0.8


def test_failed_runs_are_reported_with_their_output():
    with pytest.raises(ValueError, match="(?s)no .step N: train loss X, val loss Y. line.*Traceback"):
        bench_nanogpt.parse_nanogpt_log("Traceback (most recent call last):\n")
    with pytest.raises(ValueError, match="no 'done in"):
        bench_nanogpt.parse_ours_log("step 1/900 | loss 5.5\n")


def test_our_log_gives_the_summary_and_the_sample():
    summary = bench_nanogpt.parse_ours_log(OURS_LOG)
    assert summary["final_eval_loss"] == 1.8097 and summary["steps"] == 900
    assert summary["sample"] == "ROMEO:\nWhat say you?"


def test_nanogpt_flops_per_token_by_hand():
    flags = bench_nanogpt.parse_flags(config("bench").nanogpt_args)
    assert (flags["n_layer"], flags["n_embd"], flags["block_size"], flags["max_iters"]) == ("4", "128", "64", "2000")
    # 12 * 4 * 128^2 = 786,432 block matmul parameters + 65 * 128 = 8,320 for the tied head: 794,752;
    # 6 * 794,752 = 4,768,512, plus attention 12 * 4 * 64 * 128 = 393,216.
    assert bench_nanogpt.nanogpt_train_flops_per_token(flags) == 5_161_728


def test_malformed_overrides_are_named():
    with pytest.raises(ValueError, match="'--n_layer'"):
        bench_nanogpt.parse_flags("--device=cpu --n_layer")


def test_nanogpt_is_found_beside_the_repo_in_lorank_peers_or_where_configured(monkeypatch, tmp_path):
    c = config("bench")
    monkeypatch.delenv("LORANK_PEERS", raising=False)
    assert bench_nanogpt.nanogpt_dir(c) == bench_nanogpt.REPO_ROOT.parent / "shared" / "peers" / "nanoGPT"
    monkeypatch.setenv("LORANK_PEERS", str(tmp_path))
    assert bench_nanogpt.nanogpt_dir(c) == tmp_path / "nanoGPT"
    c.nanogpt_dir = str(tmp_path / "mine")
    assert bench_nanogpt.nanogpt_dir(c) == tmp_path / "mine"


def test_bench_without_nanogpt_stops_before_running_anything(tmp_path):
    c = config("bench")
    c.nanogpt_dir = str(tmp_path / "missing")
    with pytest.raises(RuntimeError, match="no nanoGPT checkout at .*missing"):
        bench_nanogpt.run(c, str(tmp_path / "work"), log=lambda _: None)
    assert not (tmp_path / "work").exists()


def test_a_python_without_torch_is_named():
    c = config("bench")
    c.nanogpt_python = "/nonexistent/python"
    python, why = bench_nanogpt.nanogpt_python(c)
    assert python is None and "/nonexistent/python" in why and "torch" in why


def test_generated_blocks_replace_only_the_text_between_their_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- x:start -->\nold 1.23\n<!-- x:end -->\noutro\n")
    benchlib.write_block(page, "x", "\nnew 4.56\n")
    assert page.read_text() == "intro\n<!-- x:start -->\nnew 4.56\n<!-- x:end -->\noutro\n"
    with pytest.raises(ValueError, match="lacks the markers <!-- y:start -->"):
        benchlib.write_block(page, "y", "text")


def test_the_readme_and_pretraining_page_hold_the_blocks_the_benchmark_writes():
    assert "<!-- main-job:start -->" in bench_nanogpt.README.read_text()
    assert "<!-- bench_nanogpt:start -->" in bench_nanogpt.PRETRAINING_MD.read_text()
    line = bench_nanogpt.readme_line({"ours": [{"params_millions": 0.19}], "ours_wall_s": (72.1, 64.8, 80.5),
                                      "ours_val_loss": (1.7646, 1.7646, 1.7646), "nanogpt": [{}],
                                      "nanogpt_wall_s": (102.9, 102.5, 103.3),
                                      "nanogpt_val_loss": (1.8857, 1.8857, 1.8857)})
    assert line == ("Measured by `experiments.bench_nanogpt`: 0.19M parameters, 72 s from start to exit (compilation "
                    "included), validation loss 1.765 nats/byte, against 103 s and 1.886 for nanoGPT's CPU recipe "
                    "in the same run.")
