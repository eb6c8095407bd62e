"""Benchmark: the DirectPred paper's comparison at CPU scale, with the collapsing variants.

    python -m experiments.bench_noncontrastive --config configs/bench_noncontrastive.py:bench \
        --workdir runs/bench_noncontrastive

Trains every variant of `config.variants` (`VARIANTS`: DirectPred, DirectPred freq 5, DirectCopy,
the SGD-trained linear predictor, the 2-layer MLP predictor, no predictor, SimSiam without
stop-gradient) with the same network, data, augmentations, steps and optimizer
(`config.noncontrastive`, a configs/noncontrastive.py config; `experiments.noncontrastive` in
workdir/VARIANT, finished runs reused) and reports per variant the final linear-probe and kNN
accuracy of the frozen backbone, the collapse metrics (per-dimension std and effective rank
of the normalized projections) and, for linear predictors, the eigenspace alignment of W_p
with F; the random network (the step-0 probe) is the anchor. Checks: the collapsing variants
collapse; DirectPred is at least as good as the SGD linear predictor; every non-collapsing
variant beats the random network. Writes SECTION.json and the figures to the workdir and, with
`write_docs`, that section of docs/benchmarks.md and its figures.
"""

from __future__ import annotations

import copy
import json
import math
import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import benchlib, cli  # noqa: E402
from lorank.analysis import curves  # noqa: E402
from lorank.train import loop as loop_lib, noncontrastive  # noqa: E402

VARIANTS = {
    "directpred": {"predictor": "directpred"},
    "directpred_freq5": {"predictor": "directpred", "freq": 5},
    "directcopy": {"predictor": "directcopy"},
    "sgd_linear": {"predictor": "linear"},
    "mlp_predictor": {"predictor": "mlp"},
    "no_predictor": {"predictor": "none"},
    "no_stop_gradient": {"method": "simsiam", "predictor": "mlp", "stop_gradient": False},
}
COLLAPSING = ("no_predictor", "no_stop_gradient")
COLLAPSE_FRACTION = 0.25  # collapsed: per-dimension std below this fraction of 1/sqrt(d)


def variant_list(spec: str) -> list[str]:
    names = [v.strip() for v in spec.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if not names or unknown:
        raise ValueError(f"config.variants={spec!r}: expected names from {sorted(VARIANTS)}")
    return names


def train_variant(config, name: str, workdir: pathlib.Path) -> dict:
    cfg = copy.deepcopy(config.noncontrastive)
    for k, v in VARIANTS[name].items():
        cfg.ssl[k] = v
    run_dir = workdir / name
    summary = noncontrastive.run(cfg, str(run_dir), log=lambda line: print(f"[{name}] {line}", flush=True))
    records = curves.read_metrics(str(run_dir / loop_lib.METRICS_FILE))
    rates = [r["images_per_s"] for r in records if "images_per_s" in r]
    return {**summary, "records": records, "images_per_s": sorted(rates)[len(rates) // 2] if rates else None}


def checks(results: dict[str, dict], dim: int) -> dict[str, bool]:
    spread = 1.0 / math.sqrt(dim)
    out = {}
    for name in COLLAPSING:
        if name in results:
            out[f"{name} collapses (std < {COLLAPSE_FRACTION} / sqrt(d))"] = (
                results[name]["collapse_std"] < COLLAPSE_FRACTION * spread)
    if "directpred" in results and "sgd_linear" in results:
        out["directpred >= sgd_linear (linear probe)"] = (
            results["directpred"]["probe/linear_acc"] >= results["sgd_linear"]["probe/linear_acc"])
    random = next(iter(results.values()))["random_network"]["probe/linear_acc"]
    for name, r in results.items():
        if name not in COLLAPSING:
            out[f"{name} above the random network"] = r["probe/linear_acc"] > random
    return out


def plot(results: dict[str, dict], path: pathlib.Path, dim: int) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, r in results.items():
        pts = [(x["step"], x["collapse_std"]) for x in r["records"] if "collapse_std" in x]
        axes[0].plot(*zip(*pts), label=name)
        acc = [(x["step"], x["probe/linear_acc"]) for x in r["records"] if "probe/linear_acc" in x]
        axes[1].plot(*zip(*acc), marker="o", label=name)
        align = [(x["step"], x["align/commutator"]) for x in r["records"] if "align/commutator" in x]
        if align:
            axes[2].plot(*zip(*align), marker="o", label=name)
    axes[0].axhline(1 / math.sqrt(dim), color="gray", ls=":", label="1/sqrt(d)")
    axes[0].set_yscale("log")
    for ax, title, ylabel in zip(axes, ("collapse: per-dimension std of normalized projections",
                                        "linear probe accuracy", "eigenspace alignment of W_p with F"),
                                 ("std", "test accuracy", "||F W_p - W_p F|| / (||F|| ||W_p||)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_eigenvalues(results: dict[str, dict], path: pathlib.Path) -> None:
    names = [n for n in ("directpred", "sgd_linear", "directcopy") if n in results]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(5 * max(len(names), 1), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        records = [x for x in results[name]["records"] if "align/f_eig_0" in x and x["step"] > 0]  # F = 0 at 0
        steps = [x["step"] for x in records]
        top = sorted(k for k in records[-1] if k.startswith("align/f_eig_"))
        f_max = [max(x["align/f_eig_0"], 1e-12) for x in records]
        for i, key in enumerate(top):
            ax.plot(steps, [x[key] / m for x, m in zip(records, f_max)], color=f"C{i}", label=f"F eig {i} / max")
            ax.plot(steps, [x[key.replace("f_eig", "wp_eig")] for x in records], color=f"C{i}", ls="--")
        ax.set_title(f"{name}: eigenvalues of F (solid, / max) and W_p (dashed)", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(config, workdir) -> dict:
    names = variant_list(config.variants)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {name: train_variant(config, name, workdir) for name in names}
    wall = time.perf_counter() - start
    dim = int(config.noncontrastive.model.projector_dim)
    out = {"variants": {n: {k: v for k, v in r.items() if k != "records"} for n, r in results.items()},
           "random_network": next(iter(results.values()))["random_network"], "checks": checks(results, dim),
           "wall_seconds": wall, "projection_dim": dim}
    section = config.section
    plot(results, workdir / f"{section}.png", dim)
    plot_eigenvalues(results, workdir / f"{section}_eigen.png")
    benchlib.publish_bench(config, "bench_noncontrastive", workdir, out, lambda: docs_body(out, config, section),
                           figure_suffixes=("", "_eigen"))
    print(json.dumps({"checks": out["checks"]}))
    return out


def docs_body(out: dict, config, section: str) -> str:
    c = config.noncontrastive
    rows = [[name, f"{r['probe/linear_acc']:.3f}", f"{r['probe/knn200_acc']:.3f}", f"{r['probe/knn20_acc']:.3f}",
             f"{r['collapse_std']:.4f}", f"{r['effective_rank']:.1f}",
             f"{r['align/commutator']:.3g}" if "align/commutator" in r else "",
             f"{r['images_per_s']:.0f}" if r.get("images_per_s") else ""] for name, r in out["variants"].items()]
    rnd = out["random_network"]
    rows.append(["random network (step 0)", f"{rnd['probe/linear_acc']:.3f}", f"{rnd['probe/knn200_acc']:.3f}",
                 f"{rnd['probe/knn20_acc']:.3f}", "", "", "", ""])
    table = benchlib.markdown_table(["variant", "linear probe", "kNN k=200", "kNN k=20", "collapse std",
                                     "effective rank", "alignment", "images/s"], rows)
    verdicts = "\n".join(f"- {name}: **{'yes' if ok else 'NO'}**" for name, ok in out["checks"].items())
    d = c.data
    setup = (f"{c.model.backbone} (width {dict(c.model.backbone_options).get('width', '')}) with a "
             f"{c.model.projector} projector to d={c.model.projector_dim}, {c.ssl.method} (EMA {c.ssl.ema_rate}), on "
             f"{d.train_per_class} CIFAR-10 training images per class, {c.train.steps} steps of {c.train.batch_size} "
             f"images (two SimCLR views each; crop area {tuple(c.augment.crop_area)}), SGD lr {c.optim.lr}, momentum "
             f"{c.optim.momentum}, weight decay {c.optim.weight_decay}; DirectPred rho {c.ssl.rho}, eps {c.ssl.eps}. "
             f"Probe: a linear probe (l2 chosen on a validation split of the probe set) and kNN on the frozen "
             f"backbone's features of {d.probe_per_class} training images per class, scored on {d.test_per_class} "
             f"test images per class. Collapse std: the per-dimension standard deviation of the L2-normalized "
             f"projections (1/sqrt(d) = {1 / math.sqrt(c.model.projector_dim):.3f} when spread, 0 when collapsed). "
             f"This invocation took {out['wall_seconds'] / 60:.1f} minutes (finished runs are reused).")
    return (f"{setup}\n\n{table}\n\nChecks:\n\n{verdicts}\n\n![collapse, probe and alignment](figures/{section}.png)"
            f"\n\n![eigenvalues of F and W_p](figures/{section}_eigen.png)")


if __name__ == "__main__":
    cli.launch(run, "configs/bench_noncontrastive.py:bench")
