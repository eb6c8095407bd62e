"""experiments.bench_ssl's pieces that need no training: the variants' configs and the reported checks."""

import pytest

from experiments import bench_ssl
from lorank import config_files


def test_each_variant_changes_only_its_fields():
    config = config_files.load("configs/bench_ssl.py", "bench")
    base = config.ssl
    galore = bench_ssl.variant_config(config, "galore")
    assert (galore.optim.name, galore.optim.galore_lr) == ("galore", base.optim.lr)
    assert galore.ssl.loss == "infonce" and galore.model == base.model
    directclr = bench_ssl.variant_config(config, "directclr")
    assert (directclr.model.projector, directclr.optim.name) == ("none", base.optim.name)
    assert directclr.ssl.directclr_dim == 64 // 4  # a quarter of the width-16 ConvNet's 64 features
    assert config.ssl.optim.name == "adamw" and config.ssl.model.projector == "mlp2"  # the base is untouched


def test_checks_follow_the_accuracies_and_state_bytes():
    acc = {"infonce": 0.45, "quadratic": 0.40, "direct": 0.46, "proj_linear": 0.44, "proj_none": 0.41,
           "directclr": 0.445, "galore": 0.35}
    got = bench_ssl.ordering_checks(acc, 0.36, 0.02, {"infonce": 400, "galore": 300})
    assert got["direct >= infonce"] and got["direct and infonce >= quadratic + 0.02"]
    assert got["projectors: 2-layer > DirectCLR > 1-layer > none"]
    assert got["galore's optimizer state < adamw's (infonce)"]
    assert not got["galore above the random network"] and got["proj_none above the random network"]
    worse = bench_ssl.ordering_checks({**acc, "directclr": 0.43}, 0.36, 0.06, {"infonce": 400, "galore": 400})
    assert not worse["projectors: 2-layer > DirectCLR > 1-layer > none"]
    assert not worse["direct and infonce >= quadratic + 0.06"]  # 0.45 < 0.40 + 0.06
    assert not worse["galore's optimizer state < adamw's (infonce)"]


def test_unknown_or_repeated_variants_are_refused():
    config = config_files.load("configs/bench_ssl.py", "smoke")
    for spec in ("infonce,simclr", "direct,direct", ""):
        config.variants = spec
        with pytest.raises(ValueError, match="config.variants"):
            bench_ssl.check_config(config)


def test_docs_body_reports_each_runs_state_bytes_and_the_galore_setting():
    config = config_files.load("configs/bench_ssl.py", "bench")
    run = {"probe/linear_acc": 0.45, "probe/knn200_acc": 0.40, "probe/knn20_acc": 0.41, "spectrum/feature_erank": 40.0,
           "spectrum/projection_erank": 21.0, "optimizer_state_bytes": 456_328, "images_per_s": 2000.0,
           "param_count": 57_040}
    out = {"variants": {"infonce": run, "galore": {**run, "optimizer_state_bytes": 300 * 1024}},
           "random_network": {"probe/linear_acc": 0.36}, "raw_pixels": {"probe/linear_acc": 0.36},
           "checks": {"galore's optimizer state < adamw's (infonce)": True}, "throughput": {"skipped": "no torch"},
           "directclr_dim": 16, "knn_k": [200, 20], "wall_seconds": 60.0}
    body = bench_ssl.docs_body(out, config, "bench_ssl")
    assert "| infonce | 0.450 | 0.400 | 0.410 | 40.0 | 21.0 | 446 | 2000 |" in body  # 456,328 bytes = 446 KiB
    assert "| galore | 0.450 | 0.400 | 0.410 | 40.0 | 21.0 | 300 | 2000 |" in body
    o = config.ssl.optim
    assert f"projected to rank {o.rank} (refreshed every {o.update_proj_gap} steps" in body
    assert "Throughput: not measured (no torch)." in body
    del out["variants"]["galore"]
    assert "GaLore" not in bench_ssl.docs_body(out, config, "bench_ssl")

