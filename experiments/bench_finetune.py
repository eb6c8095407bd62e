"""Benchmark: the seed's fine-tuning comparison at CPU scale (full fine-tuning, GaLore, LoRA at two ranks).

    python -m experiments.bench_finetune --config configs/bench_finetune.py:bench --workdir runs/bench_finetune

Pretrains the main job's model once (workdir/pretrained), then fine-tunes it with every entry
of `config.runs` (METHOD or METHOD:RANK) at every peak learning rate of `config.lr_multipliers`
(times `config.base_lr`) in workdir/ENTRY/lr_PEAK (`experiments.finetune`; a rerun reuses
finished runs), keeps each entry's best learning rate by the held-out loss, and reports per
entry: held-out loss on Python source (and perplexity), the loss retained on the Shakespeare
validation split (forgetting), trainable parameters, optimizer-state bytes and tokens/s.
Checks the seed's claims: GaLore within 2% of full fine-tuning, GaLore ahead of LoRA at the
same rank. Writes SECTION.json and SECTION.png (held-out and retained loss curves) to the
workdir and, with `write_docs`, that section of docs/benchmarks.md and its figure.
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
from lorank import checks as checks_lib  # noqa: E402
from lorank.analysis import curves  # noqa: E402
from lorank.train import finetune, loop as loop_lib, methods as methods_lib, optimizers  # noqa: E402

GALORE_TOLERANCE = 0.02  # the seed: GaLore's held-out loss within 2% of full fine-tuning's


def parse_runs(spec: str) -> list[tuple[str, int | None]]:
    """"adamw,galore:8,lora:8" -> [("adamw", None), ("galore", 8), ("lora", 8)], checked."""
    entries = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, rank = item.partition(":")
        if name not in methods_lib.METHODS or name in finetune.REFUSED_METHODS:
            raise ValueError(f"unknown or refused method {name!r} in config.runs={spec!r}")
        if rank:
            if name not in methods_lib.RANKED:
                raise ValueError(f"{item!r} in config.runs: {name} takes no rank")
            entries.append((name, checks_lib.integer(f"rank of {item!r}", int(rank), minimum=1)))
        else:
            entries.append((name, None))
    if not entries:
        raise ValueError("config.runs names no method")
    if len(set(entries)) != len(entries):
        raise ValueError(f"config.runs repeats an entry: {spec!r}")
    return entries


def entry_name(name: str, rank: int | None) -> str:
    return name if rank is None else f"{name}:{rank}"


def entry_config(config, name: str, rank: int | None, lr: float, pretrained: str):
    """The fine-tuning config of one entry at peak learning rate `lr`, starting from `pretrained`."""
    cfg = copy.deepcopy(config.finetune)
    cfg.optim.name = name
    cfg.optim["galore_lr" if name in optimizers.GALORE_OPTIMIZERS else "lr"] = lr
    if rank is not None:
        cfg.optim.rank = rank
        cfg.optim.lora_alpha = float(config.lora_alpha_per_rank * rank)
    cfg.init.source = "lorank"
    cfg.init.path = pretrained
    return cfg


def curve(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if key in r]


def train_entry(config, name: str, rank: int | None, lr: float, workdir: pathlib.Path) -> dict:
    """One entry at one learning rate: its summary numbers and curves."""
    label = entry_name(name, rank)
    run_dir = workdir / label.replace(":", "_r") / f"lr_{lr:g}"
    cfg = entry_config(config, name, rank, lr, str(workdir / finetune.START_DIR))
    summary = finetune.run(cfg, str(run_dir), log=lambda line: print(f"[{label} lr {lr:g}] {line}", flush=True))
    records = curves.read_metrics(os.path.join(run_dir, loop_lib.METRICS_FILE))
    result = benchlib.run_summary(records, summary)
    retain = curve(records, "eval_loss/retain")
    result.update(peak_lr=lr, retain_curve=retain, final_retain_loss=retain[-1][1],
                  final_perplexity=curve(records, "eval_perplexity")[-1][1])
    return result


def claim_checks(results: dict[str, dict], baseline: str) -> dict[str, bool]:
    """GaLore within 2% of the baseline (full fine-tuning); GaLore ahead of LoRA at the same rank."""
    loss = {k: r["final_eval_loss"] for k, r in results.items()}
    out = {}
    for key in loss:
        name, _, rank = key.partition(":")
        if name == "galore":
            out[f"galore:{rank} within 2% of {baseline}"] = loss[key] <= (1 + GALORE_TOLERANCE) * loss[baseline]
            if f"lora:{rank}" in loss:
                out[f"galore:{rank} ahead of lora:{rank}"] = loss[key] < loss[f"lora:{rank}"]
    return out


def plot(results: dict[str, dict], start: dict[str, float], path: pathlib.Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, r in results.items():
        for ax, points in zip(axes, (r["eval_curve"], r["retain_curve"])):
            steps, losses = zip(*points)
            ax.plot(steps, losses, marker=".", label=f"{key} ({losses[-1]:.3f})")
    low = min(r["final_eval_loss"] for r in results.values())
    axes[0].set_ylim(low - 0.05, low + 0.6)  # the start (far above) is in the legend
    for ax, label, what in zip(axes, ("held-out Python source", "Shakespeare validation (retained)"),
                               ("eval_loss", "retain_loss")):
        ax.axhline(start[what], color="gray", ls=":", label=f"pretrained ({start[what]:.3f})")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("loss (nats/byte)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config, workdir) -> dict:
    """Every entry at every learning rate; returns the per-entry best, the checks and the sweep."""
    entries = parse_runs(config.runs)
    multipliers = benchlib.multiplier_list(config.lr_multipliers)
    checks_lib.number("base_lr", config.base_lr, low=0.0, low_open=True)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sweep = {entry_name(n, r): {f"{m:g}": train_entry(config, n, r, config.base_lr * m, workdir)
                                for m in multipliers} for n, r in entries}
    wall_seconds = time.perf_counter() - start
    results = {key: benchlib.best_run(runs) for key, runs in sweep.items()}
    baseline = entry_name(*entries[0])
    first = results[baseline]
    start_losses = {"eval_loss": first["eval_curve"][0][1], "retain_loss": first["retain_curve"][0][1]}
    for r in results.values():
        r["loss_gap_pct"] = 100 * (r["final_eval_loss"] / first["final_eval_loss"] - 1)
    f = config.finetune
    tokens = f.train.steps * f.train.batch_size * f.data.seq_len
    out = {"runs": results, "start": start_losses, "checks": claim_checks(results, baseline),
           "sweep": {k: {m: r["final_eval_loss"] for m, r in runs.items()} for k, runs in sweep.items()},
           "tokens_per_run": tokens, "wall_seconds": wall_seconds}
    section = config.section
    plot(results, start_losses, workdir / f"{section}.png",
         f"fine-tuning the main job's model on Python source, {tokens / 1e6:.2f}M tokens per run")
    benchlib.publish_bench(config, "bench_finetune", workdir, out, lambda: docs_body(out, config, section))
    print(json.dumps({"checks": out["checks"], **{k: round(r["final_eval_loss"], 4) for k, r in results.items()}}))
    return out


def docs_body(out: dict, config, section: str) -> str:
    """The markdown of the docs section: setup, the table, the claims, the sweep, the figure."""
    f = config.finetune
    rows = [[key, f"{r['trainable_params']:,}", f"{r['optimizer_state_bytes'] / 2**10:.1f}", f"{r['peak_lr']:g}",
             f"{r['final_eval_loss']:.4f}", f"{r['loss_gap_pct']:+.2f}%", f"{r['final_retain_loss']:.4f}",
             f"{r['tokens_per_s']:,.0f}"] for key, r in out["runs"].items()]
    table = benchlib.markdown_table(["run", "trainable", "optimizer state (KiB)", "best peak lr",
                                     "held-out loss (Python)", "vs. first", "retained loss (Shakespeare)",
                                     "tokens/s"], rows)
    mults = list(next(iter(out["sweep"].values())))
    sweep = benchlib.markdown_table(["run"] + [f"lr {float(m) * config.base_lr:g}" for m in mults],
                                    [[k] + [f"{runs[m]:.4f}" for m in mults] for k, runs in out["sweep"].items()])
    verdicts = "\n".join(f"- {name}: **{'yes' if ok else 'NO'}**" for name, ok in out["checks"].items())
    setup = (f"The main job's model (configs/llama.py:tiny: D={f.model.hidden_size}, {f.model.num_layers} layers, "
             f"byte vocabulary), pretrained on Tiny Shakespeare, fine-tuned on the Python standard library's own "
             f"source files (every {round(1 / f.data.val_fraction)}th file held out), {f.train.steps} steps of "
             f"{f.train.batch_size} x {f.data.seq_len} bytes ({out['tokens_per_run']:,} tokens) per run, the same "
             f"batches for every run; warmup {f.optim.warmup_steps} steps, cosine to {f.optim.min_lr_ratio} of the "
             f"peak. GaLore: update_proj_gap {f.optim.update_proj_gap}, scale {f.optim.galore_scale}; LoRA: alpha "
             f"{config.lora_alpha_per_rank:g} x rank. Before fine-tuning: held-out Python loss "
             f"{out['start']['eval_loss']:.4f}, Shakespeare validation loss {out['start']['retain_loss']:.4f}. "
             f"Each run keeps its best peak learning rate of the grid below; tokens/s is the median of the logged "
             f"rates over that run. This invocation took {out['wall_seconds'] / 60:.1f} minutes of wall time, "
             f"pretraining included (finished runs in the workdir are reused).")
    return (f"{setup}\n\n{table}\n\nThe seed's claims:\n\n{verdicts}\n\nHeld-out loss for every peak learning rate:"
            f"\n\n{sweep}\n\n![held-out and retained loss per run](figures/{section}.png)")


if __name__ == "__main__":
    cli.launch(run, "configs/bench_finetune.py:bench")
