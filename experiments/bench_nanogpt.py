"""Benchmark: nanoGPT's documented CPU recipe against the README's main job, on one machine, in one run.

    python -m experiments.bench_nanogpt --config configs/bench_nanogpt.py:bench --workdir runs/bench_nanogpt

Runs nanoGPT's Shakespeare-character recipe (`config.nanogpt_args`) from a
temporary copy of its checkout (it writes its data and checkpoint next to its
code; nothing of it is imported here) with the Python of `config.nanogpt_python`,
and our main job (`python -m experiments.pretrain --config configs/llama.py:tiny`
in a temporary workdir) with this Python, `config.repeats` times each,
interleaved and alternating which goes first, so both see the same machine load.
Each is timed as a whole process: imports, data, compilation, evaluations,
checkpoints and sampling included. nanoGPT's validation loss is its last
`step N: ... val loss X` line (20 random batches of its validation split); ours is
the main job's final `eval_loss` (the validation windows its config evaluates;
the number of tokens is reported). Also measures this machine's float32 matmul
rate with JAX (1024 x 1024 and the shapes of our model's matmuls), before and
after the runs, and reports tokens/s and achieved GFLOP/s of both next to it.
Prints the table, writes bench_nanogpt.json to the workdir and, with
`write_docs`, the `bench_nanogpt` section of docs/benchmarks.md, the same block
in docs/pretraining.md and the README's line about the main job.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from experiments import benchlib, cli
from lorank.data import text
from lorank.models import llama
from lorank.train import lm

REPO_ROOT = benchlib.REPO_ROOT
PRETRAINING_MD = REPO_ROOT / "docs" / "pretraining.md"
README = REPO_ROOT / "README.md"
NANOGPT_DATA = pathlib.Path("data") / "shakespeare_char"
NANOGPT_EVAL_BATCHES_FLAG = "eval_iters"
NANOGPT_VOCAB = 65  # distinct characters of Tiny Shakespeare: the vocabulary nanoGPT's prepare.py builds


# ---------------------------------------------------------------- where things are

def nanogpt_dir(config) -> pathlib.Path:
    """`config.nanogpt_dir`, else `$LORANK_PEERS/nanoGPT`, else ../shared/peers/nanoGPT beside the repo."""
    if config.nanogpt_dir:
        return pathlib.Path(config.nanogpt_dir).expanduser()
    if os.environ.get("LORANK_PEERS"):
        return pathlib.Path(os.environ["LORANK_PEERS"]) / "nanoGPT"
    return REPO_ROOT.parent / "shared" / "peers" / "nanoGPT"


def nanogpt_python(config) -> tuple[str | None, str]:
    """(the Python that runs nanoGPT, or None, and why not): `config.nanogpt_python`, else this Python if
    it imports torch, else `.venv-torch/bin/python` beside the repo."""
    needs = ("torch", "numpy", "requests")
    python, candidates = benchlib.peer_python(needs, config.nanogpt_python)
    if python:
        return python, ""
    return None, (f"no Python among {candidates} imports {', '.join(needs)} (nanoGPT's requirements); install "
                  "them (`pip install numpy requests 'torch==2.13.0+cpu'`) or pass --config.nanogpt_python")


def nanogpt_unavailable(config) -> tuple[pathlib.Path, str | None, str]:
    """(checkout, python, reason): reason is empty when nanoGPT can run."""
    checkout = nanogpt_dir(config)
    if not (checkout / "train.py").is_file() or not (checkout / NANOGPT_DATA / "prepare.py").is_file():
        return checkout, None, (f"no nanoGPT checkout at {checkout} (train.py and {NANOGPT_DATA}/prepare.py); "
                                "pass --config.nanogpt_dir or set LORANK_PEERS")
    python, why = nanogpt_python(config)
    return checkout, python, why


# ---------------------------------------------------------------- parsing the two logs

def parse_flags(args: str) -> dict[str, str]:
    """nanoGPT-style `--key=value` overrides -> {key: value}; the last one of a key wins."""
    flags = {}
    for arg in shlex.split(args):
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"nanoGPT override {arg!r} is not of the form --key=value")
        key, value = arg[2:].split("=", 1)
        flags[key] = value
    return flags


def parse_nanogpt_log(log: str) -> dict[str, Any]:
    """nanoGPT's stdout -> final step and losses, per-iteration times (s) and parameter count (millions).

    Raises:
      ValueError: the log has no `step N: train loss X, val loss Y` line (the run failed).
    """
    evals = re.findall(r"^step (\d+): train loss ([0-9.]+), val loss ([0-9.]+)", log, re.M)
    if not evals:
        raise ValueError("nanoGPT's output has no 'step N: train loss X, val loss Y' line:\n" + log[-2000:])
    iter_lines = re.findall(r"^iter (\d+): loss [0-9.]+, time ([0-9.]+)ms", log, re.M)
    iters = [(int(i), float(ms) / 1e3) for i, ms in iter_lines]
    params = re.search(r"number of parameters: ([0-9.]+)M", log)
    step, train, val = evals[-1]
    return {"step": int(step), "train_loss": float(train), "val_loss": float(val),
            "evals": [(int(s), float(v)) for s, _, v in evals], "iter_seconds": iters,
            "params_millions": float(params.group(1)) if params else None}


def parse_ours_log(log: str) -> dict[str, Any]:
    """Our main job's stdout -> its summary (the `done in ...: {json}` line) and the sample it printed.

    Raises:
      ValueError: no summary line (the run failed).
    """
    done = re.search(r"^done in [0-9.]+s: (\{.*\})$", log, re.M)
    if not done:
        raise ValueError("the main job's output has no 'done in ...: {...}' summary line:\n" + log[-2000:])
    summary = json.loads(done.group(1))
    sample = re.search(r"^sample:\n(.*?)\ndone in ", log, re.S | re.M)
    summary["sample"] = sample.group(1) if sample else ""
    return summary


def nanogpt_train_flops_per_token(flags: dict[str, str], vocab: int = NANOGPT_VOCAB) -> int:
    """nanoGPT's GPT-2 block counted as `llama.train_flops_per_token` counts ours: 6 x matmul parameters
    (per layer attention 4 D^2 and MLP 8 D^2, the tied LM head V D) + 12 L T D for attention."""
    n_layer, d, t = int(flags["n_layer"]), int(flags["n_embd"]), int(flags["block_size"])
    return 6 * (12 * n_layer * d * d + vocab * d) + 12 * n_layer * t * d


def median_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


# ---------------------------------------------------------------- running one process

def timed_process(cmd: list[str], cwd: str, timeout: float, log: Callable[[str], None], env=None
                  ) -> dict[str, Any]:
    """Runs `cmd`, timing the whole process; returns its output, each line's arrival time and the load."""
    load = os.getloadavg()[0]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    lines = []
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**(env or os.environ), "PYTHONUNBUFFERED": "1"})
    deadline = start + timeout
    try:
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            if time.perf_counter() > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout)
        proc.wait(timeout=max(deadline - time.perf_counter(), 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{shlex.join(cmd)} ran past {timeout}s") from None
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    output = "\n".join(line for _, line in lines) + "\n"
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited with {proc.returncode}:\n{output[-3000:]}")
    log(f"  {wall:.1f}s, {cpu:.1f} CPU-s (load {load:.2f} -> {os.getloadavg()[0]:.2f})")
    return {"wall_s": wall, "cpu_s": cpu, "output": output, "lines": lines, "load_start": load,
            "load_end": os.getloadavg()[0]}


def first_time(lines: list[tuple[float, str]], pattern: str) -> float | None:
    regex = re.compile(pattern)
    return next((t for t, line in lines if regex.search(line)), None)


def last_time(lines: list[tuple[float, str]], pattern: str) -> float | None:
    regex = re.compile(pattern)
    return next((t for t, line in reversed(lines) if regex.search(line)), None)


def prepare_nanogpt(checkout: pathlib.Path, python: str, corpus: bytes, root: str,
                    log: Callable[[str], None]) -> pathlib.Path:
    """A writable copy of the checkout with the corpus prepared by its own prepare.py."""
    copy = pathlib.Path(root) / "nanoGPT"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns("out*", "*.bin", "*.pkl", "__pycache__", ".git"))
    for path in copy.rglob("*"):
        path.chmod(path.stat().st_mode | 0o200)
    (copy / NANOGPT_DATA / "input.txt").write_bytes(corpus)
    log(f"nanoGPT: prepare.py in {copy}")
    subprocess.run([python, str(NANOGPT_DATA / "prepare.py")], cwd=copy, check=True, capture_output=True, text=True)
    return copy


def run_nanogpt(copy: pathlib.Path, python: str, config, log) -> dict[str, Any]:
    shutil.rmtree(copy / "out-shakespeare-char", ignore_errors=True)
    cmd = [python, "train.py", config.nanogpt_config, *shlex.split(config.nanogpt_args)]
    log("nanoGPT: " + shlex.join(cmd[1:]))
    proc = timed_process(cmd, str(copy), config.timeout_s, log)
    parsed = parse_nanogpt_log(proc["output"])
    flags = parse_flags(config.nanogpt_args)
    if parsed["step"] != int(flags["max_iters"]):
        raise RuntimeError(f"nanoGPT's last evaluation is at step {parsed['step']}, not max_iters={flags['max_iters']}")
    tokens_per_iter = int(flags["batch_size"]) * int(flags["block_size"])
    # Steady rate: the median iteration (the ones that ran an evaluation first are in the tail).
    steady_s = statistics.median([dt for i, dt in parsed["iter_seconds"] if i > 0])
    fpt = nanogpt_train_flops_per_token(flags)
    tokens = parsed["step"] * tokens_per_iter
    return {"wall_s": proc["wall_s"], "cpu_s": proc["cpu_s"], "load": [proc["load_start"], proc["load_end"]],
            "val_loss": parsed["val_loss"],
            "train_loss": parsed["train_loss"], "steps": parsed["step"], "tokens": tokens,
            "tokens_per_s": tokens_per_iter / steady_s, "flops_per_token": fpt,
            "gflops_steady": fpt * tokens_per_iter / steady_s / 1e9,
            "gflops_whole": fpt * tokens / proc["wall_s"] / 1e9, "params_millions": parsed["params_millions"],
            "val_tokens": int(flags.get(NANOGPT_EVAL_BATCHES_FLAG, 200)) * tokens_per_iter,
            "first_step_s": first_time(proc["lines"], r"^iter 0:"), "evals": parsed["evals"]}


def run_ours(config, corpus_path: str | None, root: str, index: int, log, keep_dir: str) -> dict[str, Any]:
    """One run of our main job in a temporary workdir; its loss plot is kept as keep_dir/ours_INDEX_loss.png."""
    workdir = pathlib.Path(root) / f"ours_{index}"
    cmd = [sys.executable, "-m", "experiments.pretrain", "--config", config.ours_config, "--workdir", str(workdir),
           *shlex.split(config.ours_args)]
    if corpus_path:
        cmd.append(f"--config.data.corpus={corpus_path}")
    log("ours: " + shlex.join(cmd[1:]))
    proc = timed_process(cmd, str(REPO_ROOT), config.timeout_s, log)
    summary = parse_ours_log(proc["output"])
    saved = json.loads((workdir / "config.json").read_text())
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    model_cfg = lm.llama_config(saved["model"])
    seq_len, batch = int(saved["data"]["seq_len"]), int(saved["train"]["batch_size"])
    fpt = llama.train_flops_per_token(model_cfg, seq_len)
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    tokens_per_s = statistics.median(rates) if rates else float("nan")
    tokens = summary["steps"] * batch * seq_len
    lines = proc["lines"]
    started = first_time(lines, r"^model: ")
    first_step = first_time(lines, r"^step 1/")
    last_step = last_time(lines, r"^step \d+/\d+ \| loss")
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    plot = pathlib.Path(keep_dir) / f"ours_{index}_loss.png"
    shutil.copyfile(workdir / "loss.png", plot)
    return {"loss_plot": str(plot), "wall_s": proc["wall_s"], "cpu_s": proc["cpu_s"],
            "load": [proc["load_start"], proc["load_end"]],
            "val_loss": summary["final_eval_loss"], "train_loss": summary["final_train_loss"],
            "steps": summary["steps"], "tokens": tokens, "tokens_per_s": tokens_per_s, "flops_per_token": fpt,
            "gflops_steady": fpt * tokens_per_s / 1e9, "gflops_whole": fpt * tokens / proc["wall_s"] / 1e9,
            "params_millions": summary["params"] / 1e6, "sample": summary["sample"],
            "val_tokens": val_tokens(saved, corpus_path),
            "phases": {"startup_s": started, "to_first_step_s": first_step,
                       "training_s": (last_step - first_step) if last_step and first_step else None,
                       "after_last_step_s": proc["wall_s"] - last_step if last_step else None},
            "run_seconds": summary["seconds"], "model": saved["model"], "data": saved["data"], "train": saved["train"],
            "optim": {k: saved["optim"][k] for k in ("lr", "warmup_steps", "min_lr_ratio", "b2", "weight_decay")}}


def val_tokens(saved: dict, corpus_path: str | None) -> int:
    """Tokens our final evaluation predicts: eval_batches micro-batches of the validation windows (or all)."""
    tokens = text.ByteTokenizer().encode(text.read_corpus(corpus_path or saved["data"]["corpus"] or None))
    val = text.train_val_split(tokens, saved["data"]["val_fraction"])[1]
    seq_len = int(saved["data"]["seq_len"])
    micro = int(saved["train"]["batch_size"]) // int(saved["train"]["grad_accum"])
    windows = (len(val) - 1) // (seq_len + 1)
    used = min((windows // micro) * micro, int(saved["train"]["eval_batches"]) * micro)
    return used * seq_len


# ---------------------------------------------------------------- the matmul peak

def matmul_rates(shapes: list[tuple[int, int, int]], repeats: int) -> dict[str, float]:
    """Best float32 GFLOP/s of jitted `a @ b` for each (m, k, n), each timed `repeats` times."""
    import jax
    import jax.numpy as jnp

    rates = {}
    for m, k, n in shapes:
        a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
        f = jax.jit(jnp.matmul)
        jax.block_until_ready(f(a, b))
        inner = max(1, int(2e9 // (2 * m * k * n)))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(inner):
                out = f(a, b)
            jax.block_until_ready(out)
            best = min(best, (time.perf_counter() - start) / inner)
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n / best / 1e9
    return rates


def model_matmul_shapes(model: dict, data: dict, train: dict) -> list[tuple[int, int, int]]:
    """The (rows, in, out) of our model's projections for one micro-batch: q/k/v/o, gate/up, down, head."""
    rows = int(train["batch_size"]) // int(train["grad_accum"]) * int(data["seq_len"])
    d, f, v = int(model["hidden_size"]), int(model["intermediate_size"]), int(model["vocab_size"])
    return [(rows, d, d), (rows, d, f), (rows, f, d), (rows, d, v)]


# ---------------------------------------------------------------- the benchmark

def run(config, workdir: str, log=print) -> dict[str, Any]:
    """Runs the benchmark per `config` (configs/bench_nanogpt.py); returns the results written to the JSON."""
    if config.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {config.repeats}")
    parse_flags(config.nanogpt_args)  # malformed overrides fail before anything runs
    checkout, python, skipped = nanogpt_unavailable(config)
    if skipped and config.require_nanogpt:
        raise RuntimeError(f"cannot run nanoGPT: {skipped}")
    if skipped:
        log(f"nanoGPT half skipped: {skipped}")
    os.makedirs(workdir, exist_ok=True)
    corpus_path = os.path.expanduser(config.corpus) if config.corpus else None
    corpus = text.read_corpus(corpus_path)
    start = time.perf_counter()
    results: dict[str, Any] = {"nanogpt": [], "ours": [], "nanogpt_skipped": skipped or None,
                               "nanogpt_dir": str(checkout), "nanogpt_python": python,
                               "nanogpt_command": f"python train.py {config.nanogpt_config} {config.nanogpt_args}",
                               "ours_command": f"python -m experiments.pretrain --config {config.ours_config} "
                                               f"--workdir <temporary> {config.ours_args}".rstrip()}
    peak_shapes = [(1024, 1024, 1024)]
    results["peak_before"] = matmul_rates(peak_shapes, config.peak_repeats)
    log(f"float32 matmul 1024^3: {results['peak_before']['1024x1024x1024']:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory(prefix="bench_nanogpt_") as root:
        copy = None if skipped else prepare_nanogpt(checkout, python, corpus, root, log)
        for i in range(config.repeats):
            order = ["nanogpt", "ours"] if i % 2 == 0 else ["ours", "nanogpt"]
            for who in order:
                if who == "nanogpt" and copy is not None:
                    results["nanogpt"].append(run_nanogpt(copy, python, config, log))
                elif who == "ours":
                    results["ours"].append(run_ours(config, corpus_path, root, i, log, workdir))
    ours = results["ours"]
    shapes = model_matmul_shapes(ours[0]["model"], ours[0]["data"], ours[0]["train"])
    results["peak_after"] = matmul_rates(peak_shapes + shapes, config.peak_repeats)
    results["seconds"] = time.perf_counter() - start
    results.update(summarize(results, config))
    (pathlib.Path(workdir) / f"{config.section}.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    body = markdown(results, config)
    log(body)
    if config.write_docs:
        command = (f"python -m experiments.bench_nanogpt --config configs/bench_nanogpt.py:{config.variant} "
                   f"--workdir runs/{config.section}")
        benchlib.write_section(config.section, command, body, results)
        benchlib.write_measured_block(PRETRAINING_MD, config.section, body, command)
        benchlib.write_block(README, "main-job", "\n" + readme_line(results) + "\n")
        figure = benchlib.REPO_ROOT / "docs" / "figures" / f"{config.section}_loss.png"
        shutil.copyfile(results["ours"][-1]["loss_plot"], figure)
    return results


def readme_line(results: dict) -> str:
    """The README's one line about the main job: its size, wall time and loss against nanoGPT's."""
    ours = results["ours"][-1]
    line = (f"Measured by `experiments.bench_nanogpt`: {ours['params_millions']:.2f}M parameters, "
            f"{results['ours_wall_s'][0]:.0f} s from start to exit (compilation included), validation loss "
            f"{results['ours_val_loss'][0]:.3f} nats/byte")
    if results["nanogpt"]:
        line += (f", against {results['nanogpt_wall_s'][0]:.0f} s and {results['nanogpt_val_loss'][0]:.3f} for "
                 "nanoGPT's CPU recipe in the same run")
    return line + "."


def summarize(results: dict, config) -> dict[str, Any]:
    """Medians and spreads of both contenders, the wall-time ratio and whether the goal is met."""
    out: dict[str, Any] = {}
    for who in ("nanogpt", "ours"):
        runs = results[who]
        if runs:
            out[f"{who}_wall_s"] = median_spread([r["wall_s"] for r in runs])
            out[f"{who}_cpu_s"] = median_spread([r["cpu_s"] for r in runs])
            out[f"{who}_val_loss"] = median_spread([r["val_loss"] for r in runs])
            out[f"{who}_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in runs)
            out[f"{who}_gflops_steady"] = statistics.median(r["gflops_steady"] for r in runs)
            out[f"{who}_gflops_whole"] = statistics.median(r["gflops_whole"] for r in runs)
    if results["nanogpt"]:
        pairs = [o["wall_s"] / n["wall_s"] for o, n in zip(results["ours"], results["nanogpt"])]
        out["pair_time_ratios"] = pairs
        out["time_ratio"] = out["ours_wall_s"][0] / out["nanogpt_wall_s"][0]
        out["cpu_ratio"] = out["ours_cpu_s"][0] / out["nanogpt_cpu_s"][0]
        out["goal_met"] = bool(out["ours_val_loss"][0] <= config.target_val_loss
                               and out["time_ratio"] <= config.target_time_ratio
                               and out["ours_val_loss"][0] < out["nanogpt_val_loss"][0])
    return out


def _spread(triple, fmt="{:.1f}") -> str:
    med, lo, hi = triple
    return f"{fmt.format(med)} ({fmt.format(lo)}–{fmt.format(hi)})"


def markdown(results: dict, config) -> str:
    ours, ng = results["ours"], results["nanogpt"]
    peak = results["peak_after"]
    peak_1024 = statistics.median([results["peak_before"]["1024x1024x1024"], peak["1024x1024x1024"]])
    loads = [x for r in ours + ng for x in r["load"]]
    o = ours[-1]
    m, d, t, op = o["model"], o["data"], o["train"], o["optim"]
    lines = [
        f"nanoGPT (`{results['nanogpt_dir']}`, run from a temporary copy): `{results['nanogpt_command']}`, after "
        "`python data/shakespeare_char/prepare.py` on the same Tiny Shakespeare text. Ours: "
        f"`{results['ours_command']}`. Each is one whole process, timed from start to exit (imports, data, "
        f"compilation, evaluations, checkpoints, our sample included), {config.repeats} runs each, interleaved "
        "(nanoGPT first in odd rounds, ours first in even ones). The machine was shared: 1-minute load average "
        f"{min(loads):.1f}–{max(loads):.1f} during the runs (2 means both cores busy with one job).",
        "",
        f"Ours: {m['num_layers']} layers, D={m['hidden_size']}, {m['num_heads']} heads, "
        f"SwiGLU {m['intermediate_size']}, "
        f"byte vocabulary; {o['steps']} steps of {t['batch_size']} x {d['seq_len']} bytes, AdamW peak lr {op['lr']:g}, "
        f"warmup {op['warmup_steps']}, cosine to {op['min_lr_ratio']:g} x peak, b2 {op['b2']:g}, weight decay "
        f"{op['weight_decay']:g}. Validation: our final evaluation predicts {o['val_tokens']:,} tokens of our "
        "validation split (the last 10% of the bytes, consecutive windows); nanoGPT's estimate is "
        f"{ng[0]['val_tokens']:,} tokens in random windows of its validation split (the same bytes)." if ng else
        f"Ours: {o['steps']} steps; validation on {o['val_tokens']:,} tokens.",
        "",
    ]
    if results["nanogpt_skipped"]:
        lines += [f"nanoGPT was not run: {results['nanogpt_skipped']}", ""]
    header = ["", "final val loss (nats/char)", "wall time (s)", "CPU time (s)", "params (M)", "tokens trained",
              "tokens/s (steady)",
              "GFLOP/s steady", "GFLOP/s whole process"]
    rows = []
    for name, runs in (("nanoGPT", ng), ("ours (lorank)", ours)):
        if not runs:
            continue
        key = "nanogpt" if runs is ng else "ours"
        rows.append([name, _spread(results[f"{key}_val_loss"], "{:.4f}"), _spread(results[f"{key}_wall_s"]),
                     _spread(results[f"{key}_cpu_s"]),
                     f"{runs[0]['params_millions']:.2f}", f"{runs[0]['tokens']:,}",
                     f"{results[f'{key}_tokens_per_s'] / 1e3:.1f}k", f"{results[f'{key}_gflops_steady']:.1f}",
                     f"{results[f'{key}_gflops_whole']:.1f}"])
    lines += [benchlib.markdown_table(header, rows), ""]
    lines.append("Medians, with the range over runs in parentheses. FLOPs per token: 6 x matmul parameters + "
                 f"12 x layers x context x width (`lorank.models.llama.train_flops_per_token`): ours "
                 f"{o['flops_per_token'] / 1e6:.2f}M" + (f", nanoGPT's {ng[0]['flops_per_token'] / 1e6:.2f}M." if ng
                                                         else "."))
    if ng:
        pairs = ", ".join(f"{x:.2f}" for x in results["pair_time_ratios"])
        met = "met" if results["goal_met"] else "NOT met"
        lines += ["", f"**Wall-time ratio ours / nanoGPT: {results['time_ratio']:.2f}** (medians; per round: {pairs}; "
                  f"CPU time, user + system: {results['cpu_ratio']:.2f}). "
                  f"Goal (ours below nanoGPT's loss, at most {config.target_val_loss} nats/byte, in at most "
                  f"{config.target_time_ratio:g} x nanoGPT's wall time): {met}."]
    ph = {k: statistics.median([r["phases"][k] for r in ours if r["phases"][k] is not None] or [float("nan")])
          for k in ours[0]["phases"]}
    lines += ["", f"Where our wall time goes (medians): {ph['startup_s']:.1f} s to the first line (imports, corpus, "
              f"model), {ph['to_first_step_s'] - ph['startup_s']:.1f} s more to step 1 (state init, compiling the "
              f"train and eval steps, the evaluation at step 0), {ph['training_s']:.1f} s of training (steps 1 to "
              f"{o['steps']}, periodic evaluations and checkpoints), {ph['after_last_step_s']:.1f} s after the last "
              "step (final evaluation and checkpoint, loss plot, sample)."]
    rates = ", ".join(f"{k}: {v:.0f}" for k, v in peak.items())
    lines += ["", f"float32 matmul rate of this machine (JAX, best of {config.peak_repeats}, GFLOP/s): 1024^3 "
              f"{results['peak_before']['1024x1024x1024']:.0f} before the runs, {peak['1024x1024x1024']:.0f} after; "
              f"our model's matmuls after the runs ({rates}). Ours trained at "
              f"{results['ours_gflops_steady'] / peak_1024:.0%} of the 1024^3 rate"
              + (f", nanoGPT at {results['nanogpt_gflops_steady'] / peak_1024:.0%}." if ng else ".")]
    lines += ["", "One sample of ours (prompt \"ROMEO:\", temperature 0.8, the last run):", "", "```",
              o["sample"].strip("\n"), "```", "",
              f"![our last run's loss curve](figures/{config.section}_loss.png)"]
    return "\n".join(lines)


if __name__ == "__main__":
    cli.launch(run, "configs/bench_nanogpt.py:bench")
