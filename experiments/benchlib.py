"""Shared plumbing for `experiments/bench_*` modules.

Each benchmark owns one section of docs/benchmarks.md, delimited by HTML comment
markers, so benchmarks can be rerun independently without clobbering each other.
Each also writes its raw numbers as JSON next to the table.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PEER_VENV_PYTHON = REPO_ROOT / ".venv-torch" / "bin" / "python"  # where the bench extra's peers may live
BENCHMARKS_MD = REPO_ROOT / "docs" / "benchmarks.md"
RESULTS_DIR = REPO_ROOT / "docs" / "bench_results"
FIGURES_DIR = REPO_ROOT / "docs" / "figures"

_HEADER = """# Benchmarks

Every figure here was measured by the command above its table, on the machine
it names. Timings are ratios against a baseline measured in the same run.
Each section is rewritten by its own `experiments/bench_*` module.
"""


def machine_description() -> str:
    """One line naming the CPU/accelerator, core count and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    devices = jax.devices()
    kind = devices[0].device_kind if devices else "none"
    return (
        f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__} on "
        f"{len(devices)} x {jax.default_backend()} ({kind}); Python {platform.python_version()}"
    )


def time_fn(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of `fn()`; results are blocked on so async dispatch is timed."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats are printed with 4 significant digits."""

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance(command: str | None = None) -> str:
    """The lines every generated block of the docs starts with: the command (if any), the machine, the date."""
    lines = ([f"Command: `{command}`"] if command else []) + [f"Machine: {machine_description()}",
                                                            f"Date: {time.strftime('%Y-%m-%d')}"]
    return "  \n".join(lines)


def write_block(path: pathlib.Path, name: str, text: str) -> None:
    """Replaces the text between `<!-- NAME:start -->` and `<!-- NAME:end -->` of the file at `path`
    (a page of docs/, README.md) by `text`, so numbers quoted there come from the module that measured them.

    Raises:
      ValueError: the file lacks the markers (both are named).
    """
    content = path.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in content or end not in content:
        raise ValueError(f"{path} lacks the markers {start} ... {end} that delimit the generated text")
    head, tail = content[:content.index(start) + len(start)], content[content.index(end):]
    path.write_text(f"{head}{text}{tail}")


def write_measured_block(path: pathlib.Path, name: str, body_markdown: str, command: str | None = None) -> None:
    """`write_block` of `body_markdown` under its `provenance` (what measured it, where and when)."""
    write_block(path, name, f"\n{provenance(command)}\n\n{body_markdown.strip()}\n")


def write_section(name: str, command: str, body_markdown: str, results: dict[str, Any],
                  path: pathlib.Path = BENCHMARKS_MD) -> None:
    """Replace (or append) section `name` of docs/benchmarks.md and write its JSON.

    Args:
      name: section id, e.g. "bench_galore"; also the JSON file's stem.
      command: the exact command that produced the numbers.
      body_markdown: tables and prose for the section.
      results: the raw numbers, written to docs/bench_results/<name>.json.
    """
    stamp = time.strftime("%Y-%m-%d")
    section = (
        f"<!-- {name}:start -->\n## {name}\n\n"
        f"{provenance(command)}\n\n"
        f"{body_markdown.strip()}\n<!-- {name}:end -->"
    )
    text = path.read_text() if path.exists() else _HEADER
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "machine": machine_description(), "date": stamp, **results}
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")


def publish_bench(config, experiment: str, workdir: str | pathlib.Path, out: dict[str, Any],
                  body: Callable[[], str], figure_suffixes: tuple[str, ...] = ("",)) -> None:
    """A benchmark's results: workdir/SECTION.json (SECTION = `config.section`) and, with `config.write_docs`,
    section SECTION of docs/benchmarks.md under the command `python -m experiments.EXPERIMENT --config
    configs/EXPERIMENT.py:VARIANT --workdir runs/SECTION` (VARIANT = `config.variant`) with the markdown of
    `body()`, and the figures workdir/SECTION{suffix}.png, drawn before, copied to docs/figures."""
    section, workdir = config.section, pathlib.Path(workdir)
    (workdir / f"{section}.json").write_text(json.dumps(out, indent=2) + "\n")
    if not config.write_docs:
        return
    command = (f"python -m experiments.{experiment} --config configs/{experiment}.py:{config.variant} "
               f"--workdir runs/{section}")
    write_section(section, command, body(), out)
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    for suffix in figure_suffixes:
        shutil.copyfile(workdir / f"{section}{suffix}.png", FIGURES_DIR / f"{section}{suffix}.png")


def publish_figure(path: pathlib.Path, name: str, body_markdown: str, command: str, figure: pathlib.Path) -> None:
    """`write_measured_block` of block `name` in the page at `path`, and `figure` copied to
    docs/figures/NAME.png, the file the page shows."""
    write_measured_block(path, name, body_markdown, command)
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(figure, FIGURES_DIR / f"{name}.png")


def run_figures(config, workdir, runners: dict[str, Callable], *, order: tuple[str, ...], prefix: str,
                doc: pathlib.Path, command: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The figure experiments' driver: `config.figure` (or every name of `order` for "all", each with its
    sub-config `config[name]`) drawn into `workdir` by `runners[name](sub, workdir) -> {"summary", "body"}`,
    which saves PREFIX_NAME.png there. Logs each body with its seconds; with `config.write_docs`, publishes
    block PREFIX_NAME of `doc` under `command` with the figure; writes metrics.json; returns the summaries.

    Raises:
      ValueError: `config.figure` neither "all" nor a key of `runners`.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = order if config.figure == "all" else (config.figure,)
    if not set(names) <= set(runners):
        raise ValueError(f"figure={config.figure!r} must be 'all' or one of {sorted(runners)}")
    out = {}
    for name in names:
        sub = config[name] if config.figure == "all" else config
        start = time.perf_counter()
        result = runners[name](sub, workdir)
        result["summary"]["seconds"] = time.perf_counter() - start
        log(f"{name}: {result['summary']['seconds']:.1f} s\n{result['body']}")
        out[name] = result["summary"]
        if config.write_docs:
            block = f"{prefix}_{name}"
            publish_figure(doc, block, result["body"], command, workdir / f"{block}.png")
    (workdir / "metrics.json").write_text(json.dumps(out, indent=2, default=float) + "\n")
    return out


def multiplier_list(spec: str) -> list[float]:
    """The comma-separated positive learning-rate multipliers of `config.lr_multipliers`."""
    values = [float(v) for v in spec.split(",") if v.strip()]
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"config.lr_multipliers={spec!r} must list positive numbers")
    return values


def run_summary(records: list[dict], summary: dict) -> dict:
    """Final validation loss, evaluation curve and median step rate of one method's metrics records."""
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    rates = [r["steps_per_s"] for r in records if "steps_per_s" in r]
    tokens = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    if not evals or not rates:
        raise ValueError("a run logged no evaluation or no throughput; raise train.steps")
    return {
        "params": summary["params"], "trainable_params": summary["trainable_params"],
        "optimizer_state_bytes": summary["optimizer_state_bytes"],
        "final_eval_loss": evals[-1][1], "eval_curve": evals,
        "step_seconds": 1.0 / statistics.median(rates), "tokens_per_s": statistics.median(tokens),
    }


def best_run(runs: dict[str, dict]) -> dict:
    """The run of lowest final validation loss among one method's learning rates, with the step
    time and throughput (which do not depend on the learning rate) the medians over all of them."""
    best = min(runs.values(), key=lambda r: r["final_eval_loss"])
    return dict(best, step_seconds=statistics.median(r["step_seconds"] for r in runs.values()),
                tokens_per_s=statistics.median(r["tokens_per_s"] for r in runs.values()))


def imports(python: str, modules: tuple[str, ...]) -> bool:
    """Whether the interpreter `python` imports every one of `modules` (False if it cannot run)."""
    code = "import " + ", ".join(modules)
    try:
        return subprocess.run([python, "-c", code], capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def peer_python(modules: tuple[str, ...], explicit: str = "") -> tuple[str | None, list[str]]:
    """(the first candidate Python that imports `modules`, or None; the candidates tried): `explicit` alone
    when given, else this Python, then PEER_VENV_PYTHON."""
    candidates = [explicit] if explicit else [sys.executable, str(PEER_VENV_PYTHON)]
    for python in candidates:
        if (shutil.which(python) or os.path.isfile(python)) and imports(python, modules):
            return python, candidates
    return None, candidates
