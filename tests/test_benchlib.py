"""experiments.benchlib: how a benchmark publishes its results."""

from ml_collections import ConfigDict

from experiments import benchlib


def test_publish_bench_writes_the_json_and_with_write_docs_the_section_and_figures(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    monkeypatch.setattr(benchlib, "FIGURES_DIR", docs / "figures")
    monkeypatch.setattr(benchlib, "RESULTS_DIR", docs / "bench_results")
    written = {}
    monkeypatch.setattr(benchlib, "write_section", lambda *args: written.setdefault("args", args))
    work = tmp_path / "work"
    work.mkdir()
    for suffix in ("", "_eigen"):
        (work / f"bench_x{suffix}.png").write_bytes(b"png" + suffix.encode())
    config = ConfigDict({"section": "bench_x", "variant": "bench", "write_docs": False})
    benchlib.publish_bench(config, "bench_x", work, {"a": 1}, lambda: 1 / 0, figure_suffixes=("", "_eigen"))
    assert (work / "bench_x.json").read_text() == '{\n  "a": 1\n}\n' and not written and not docs.exists()
    config.write_docs = True
    benchlib.publish_bench(config, "bench_x", work, {"a": 1}, lambda: "body", figure_suffixes=("", "_eigen"))
    assert written["args"] == ("bench_x", "python -m experiments.bench_x --config configs/bench_x.py:bench "
                               "--workdir runs/bench_x", "body", {"a": 1})
    assert (docs / "figures" / "bench_x_eigen.png").read_bytes() == b"png_eigen"
