"""Benchmark: the GaLore paper's pretraining comparison at small scale on the embedded corpus.

    python -m experiments.bench_pretrain --config configs/bench_pretrain.py:bench --workdir runs/bench_pretrain
    python -m experiments.bench_pretrain --config configs/bench_pretrain.py:sweep --workdir runs/bench_pretrain_sweep

Trains the same LLaMA-style model on the same batches (the same token budget)
for every method of `config.methods` and every peak learning rate of
`config.lr_multipliers` (times the method's base rate: `config.peak_lrs`, else
`optim.lr`, or `optim.galore_lr` for GaLore's methods; `experiments.pretrain` in
workdir/METHOD/lr_PEAK), keeps each method's best learning rate, as the paper
tunes each method's, and reports per method: parameters (total and trainable),
optimizer-state bytes, final validation loss and its gap to the first method
(full-rank AdamW), tokens/s and the train-step time relative to the first
method, measured in this run. `sweep` searches a grid of learning rates;
`bench` runs each method once at the sweep's best (the timed table). Checks the
paper's ordering (GaLore within 3% of full-rank, LoRA and ReLoRA behind GaLore,
low-rank last) and draws the validation curves. Writes SECTION.json and
SECTION.png to the workdir (`config.section`) and, with `write_docs`, that
section of docs/benchmarks.md and docs/figures/SECTION.png.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import benchlib, cli  # noqa: E402
from lorank.analysis import curves  # noqa: E402
from lorank.train import loop as loop_lib, methods as methods_lib, optimizers, pretrain  # noqa: E402

GALORE_TOLERANCE = 0.03  # GaLore's final validation loss may exceed full-rank's by this fraction


def method_list(spec: str) -> list[str]:
    """The comma-separated methods of `config.methods`, checked."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise ValueError("config.methods names no method")
    unknown = [m for m in names if m not in methods_lib.METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown} in config.methods; expected names from {methods_lib.METHODS}")
    if len(set(names)) != len(names):
        raise ValueError(f"config.methods repeats a method: {names}")
    return names


def base_lrs(config, names: list[str]) -> dict[str, float]:
    """Each method's peak learning rate at multiplier 1: `config.peak_lrs[name]`, else the
    pretraining config's (`optim.galore_lr` for GaLore's methods, `optim.lr` for the others)."""
    tuned = dict(config.peak_lrs)
    unknown = sorted(set(tuned) - set(methods_lib.METHODS))
    if unknown:
        raise ValueError(f"config.peak_lrs names unknown methods {unknown}; expected names from {methods_lib.METHODS}")
    bad = {name: lr for name, lr in tuned.items() if not float(lr) > 0}
    if bad:
        raise ValueError(f"config.peak_lrs must be positive, got {bad}")
    return {name: float(tuned.get(name, optimizers.peak_lr(config.pretrain.optim, name))) for name in names}


def ordering_checks(results: dict[str, dict], baseline: str) -> dict[str, bool]:
    """The paper's ordering, for the methods present: GaLore near full-rank, LoRA/ReLoRA behind, low-rank last."""
    loss = {m: r["final_eval_loss"] for m, r in results.items()}
    checks = {}
    for g in ("galore", "galore8bit", "galore_adafactor"):
        if g in loss:
            checks[f"{g}_within_3pct_of_{baseline}"] = loss[g] <= (1 + GALORE_TOLERANCE) * loss[baseline]
    if "galore" in loss:
        for m in ("lora", "relora"):
            if m in loss:
                checks[f"{m}_behind_galore"] = loss[m] > loss["galore"]
    if "lowrank" in loss:
        others = [m for m in loss if m != "lowrank"]
        checks["lowrank_last"] = all(loss["lowrank"] > loss[m] for m in others)
    return checks


def plot_curves(results: dict[str, dict], path: str, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, r in results.items():
        steps, losses = zip(*r["eval_curve"])
        ax.plot(steps, losses, marker=".", label=f"{name} ({r['final_eval_loss']:.3f})")
    low = min(r["final_eval_loss"] for r in results.values())
    ax.set_ylim(low - 0.1, low + 1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_method(config, name: str, base_lr: float, multiplier: float, workdir: pathlib.Path) -> dict:
    """One method at `multiplier` times its peak learning rate `base_lr`; its `run_summary`."""
    cfg = copy.deepcopy(config.pretrain)
    cfg.optim.name = name
    lr = base_lr * multiplier
    cfg.optim["galore_lr" if name in optimizers.GALORE_OPTIMIZERS else "lr"] = lr
    run_dir = str(workdir / name / f"lr_{lr:g}")
    summary = pretrain.run(cfg, run_dir, log=lambda line: print(f"[{name} lr {lr:g}] {line}", flush=True))
    result = benchlib.run_summary(curves.read_metrics(os.path.join(run_dir, loop_lib.METRICS_FILE)), summary)
    result["peak_lr"] = optimizers.peak_lr(cfg.optim)
    return result


def run(config, workdir) -> dict:
    """Trains every method at every learning rate in workdir/METHOD/lr_PEAK; returns the results and checks."""
    names = method_list(config.methods)
    multipliers = benchlib.multiplier_list(config.lr_multipliers)
    lrs = base_lrs(config, names)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sweep = {name: {f"{m:g}": train_method(config, name, lrs[name], m, workdir) for m in multipliers}
             for name in names}
    wall_seconds = time.perf_counter() - start
    results = {name: benchlib.best_run(runs) for name, runs in sweep.items()}
    baseline = names[0]
    for r in results.values():
        r["step_time_ratio"] = r["step_seconds"] / results[baseline]["step_seconds"]
        r["loss_gap_pct"] = 100 * (r["final_eval_loss"] / results[baseline]["final_eval_loss"] - 1)
    checks = ordering_checks(results, baseline)
    p = config.pretrain
    tokens = p.train.steps * p.train.batch_size * p.data.seq_len
    out = {"methods": results, "base_lrs": lrs, "sweep": {n: {m: r["final_eval_loss"] for m, r in runs.items()}
                                         for n, runs in sweep.items()},
           "checks": checks, "tokens_per_method": tokens, "wall_seconds": wall_seconds}
    section = config.section
    title = (f"{p.model.num_layers}-layer LLaMA, D={p.model.hidden_size}, {tokens / 1e6:.2f}M tokens per method")
    plot_curves(results, str(workdir / f"{section}.png"), title)
    benchlib.publish_bench(config, "bench_pretrain", workdir, out,
                           lambda: docs_body(results, out["sweep"], lrs, checks, p, tokens, wall_seconds, section))
    print(json.dumps({"checks": checks, **{m: round(r["final_eval_loss"], 4) for m, r in results.items()}}))
    return out


def docs_body(results: dict[str, dict], sweep: dict[str, dict], base_lrs: dict[str, float], checks: dict[str, bool],
              p, tokens: int, wall_seconds: float, section: str) -> str:
    """The markdown of the docs section: setup, tables, checks, figure."""
    mults = list(next(iter(sweep.values())))
    timed = len(mults) == 1  # a grid's runs may span different machine loads: its timings are not compared
    rows = [[name, f"{r['params']:,}", f"{r['trainable_params']:,}", f"{r['optimizer_state_bytes'] / 2**20:.2f}",
             f"{r['peak_lr']:g}", f"{r['final_eval_loss']:.4f}", f"{r['loss_gap_pct']:+.2f}%"]
            + ([f"{r['tokens_per_s']:,.0f}", f"{r['step_time_ratio']:.2f}"] if timed else [])
            for name, r in results.items()]
    table = benchlib.markdown_table(
        ["method", "parameters", "trainable", "optimizer state (MiB)", "peak lr", "final val. loss", "vs. first"]
        + (["tokens/s", "step time / first"] if timed else []), rows)
    verdicts = "\n".join(f"- {name.replace('_', ' ')}: **{'yes' if ok else 'NO'}**" for name, ok in checks.items())
    setup = (
        f"LLaMA-style model (D={p.model.hidden_size}, F={p.model.intermediate_size}, {p.model.num_heads} heads, "
        f"{p.model.num_layers} layers, byte vocabulary) on the embedded corpus, {p.train.steps} steps of "
        f"{p.train.batch_size} x {p.data.seq_len} bytes ({tokens:,} tokens) per method, the same batches for "
        f"every method. Rank {p.optim.rank} for GaLore (T={p.optim.update_proj_gap}, scale {p.optim.galore_scale}), "
        f"low-rank, LoRA and ReLoRA (alpha {p.optim.lora_alpha}, reset every {p.optim.relora_reset_every} steps); "
        f"warmup {p.optim.warmup_steps} steps, cosine to {p.optim.min_lr_ratio} of the peak. "
        f"{len(results) * len(mults)} runs; this invocation took {wall_seconds / 60:.1f} minutes of wall time "
        f"(runs already finished in the workdir are reused, not retrained).")
    if len(mults) > 1:
        sweep_table = benchlib.markdown_table(
            ["method", "base lr"] + [f"x{m}" for m in mults],
            [[name, f"{base_lrs[name]:g}"] + [f"{runs[m]:.4f}" for m in mults] for name, runs in sweep.items()])
        lrs = (f"Each method's peak learning rate is the best of the grid below (multiples of the method's base "
               f"rate); timings are in the bench_pretrain section (one run per method, back to back).\n\n{table}\n\n"
               f"Final validation loss for every peak learning rate:\n\n{sweep_table}")
    else:
        lrs = (f"Each method runs once at its peak learning rate from the sweep "
               f"([bench_pretrain_sweep](#bench_pretrain_sweep), `configs/bench_pretrain.py` TUNED_PEAK_LRS); "
               f"tokens/s and step times are the medians of each run's logged rates (training steps only).\n\n"
               f"{table}")
    return (f"{setup} {lrs}\n\nThe paper's ordering:\n\n{verdicts}\n\n"
            f"![validation loss per method](figures/{section}.png)")


if __name__ == "__main__":
    cli.launch(run, "configs/bench_pretrain.py:bench")
