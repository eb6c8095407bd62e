"""The small-scale reproduction's bookkeeping: learning rates per method, the ordering checks."""

import pathlib

import pytest
from ml_collections import ConfigDict

from experiments import bench_pretrain, benchlib
from lorank import config_files

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "bench_pretrain.py"


def config(variant):
    return config_files.load(CONFIG, variant)


def test_base_lrs_take_tuned_rates_and_fall_back_to_the_pretraining_config():
    c = config("sweep")
    c.peak_lrs = ConfigDict({"lora": 4e-3})
    lrs = bench_pretrain.base_lrs(c, ["adamw", "galore", "lora"])
    assert lrs == {"adamw": 2.5e-3, "galore": 5e-3, "lora": 4e-3}  # optim.lr, optim.galore_lr, tuned


def test_bench_runs_every_method_once_at_the_sweeps_best():
    bench, sweep = config("bench"), config("sweep")
    assert bench.lr_multipliers == "1" and len(benchlib.multiplier_list(sweep.lr_multipliers)) > 1
    assert set(bench.peak_lrs) == set(bench_pretrain.method_list(bench.methods))
    assert bench.section != sweep.section


def test_best_run_has_the_lowest_loss_and_the_median_timings():
    runs = {"0.5": {"final_eval_loss": 2.0, "step_seconds": 1.0, "tokens_per_s": 30.0, "lr": 1e-3},
            "1": {"final_eval_loss": 1.5, "step_seconds": 4.0, "tokens_per_s": 10.0, "lr": 2e-3},
            "2": {"final_eval_loss": 1.7, "step_seconds": 2.0, "tokens_per_s": 20.0, "lr": 4e-3}}
    assert benchlib.best_run(runs) == {"final_eval_loss": 1.5, "step_seconds": 2.0, "tokens_per_s": 20.0,
                                             "lr": 2e-3}


@pytest.mark.parametrize("peak_lrs, message", [({"adam": 1e-3}, "unknown methods \\['adam'\\]"),
                                               ({"lora": 0.0}, "must be positive")])
def test_bad_peak_lrs_are_named(peak_lrs, message):
    c = config("sweep")
    c.peak_lrs = ConfigDict(peak_lrs)
    with pytest.raises(ValueError, match=message):
        bench_pretrain.base_lrs(c, ["adamw"])


def test_ordering_checks():
    losses = {"adamw": 2.00, "galore": 2.05, "lowrank": 2.40, "lora": 2.10, "relora": 2.01}
    checks = bench_pretrain.ordering_checks({m: {"final_eval_loss": v} for m, v in losses.items()}, "adamw")
    assert checks == {"galore_within_3pct_of_adamw": True, "lora_behind_galore": True,
                      "relora_behind_galore": False, "lowrank_last": True}
    losses["galore"] = 2.07  # 3.5% above full rank
    checks = bench_pretrain.ordering_checks({m: {"final_eval_loss": v} for m, v in losses.items()}, "adamw")
    assert not checks["galore_within_3pct_of_adamw"]


def test_bad_method_and_multiplier_lists_are_named():
    with pytest.raises(ValueError, match="unknown methods \\['adam'\\]"):
        bench_pretrain.method_list("adamw,adam")
    with pytest.raises(ValueError, match="repeats"):
        bench_pretrain.method_list("adamw,adamw")
    with pytest.raises(ValueError, match="'1,-2'"):
        benchlib.multiplier_list("1,-2")
