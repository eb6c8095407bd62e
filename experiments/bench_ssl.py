"""Benchmark: the alpha-CL and DirectCLR comparisons at CPU scale, with raw-pixel and random-network anchors.

    python -m experiments.bench_ssl --config configs/bench_ssl.py:bench --workdir runs/bench_ssl

Trains every variant of `config.variants` (`VARIANTS`: InfoNCE, L_quadratic, backprop alpha,
alpha-CL r_H, r_gamma, r_s and direct with the 2-layer projector; InfoNCE with a 1-layer and with
no projector; DirectCLR) with the same network, data, augmentations, steps and optimizer
(`config.ssl`, a configs/ssl.py config; `lorank.train.contrastive.run` in workdir/VARIANT, finished
runs reused) and reports per variant the final linear-probe and kNN accuracy of the frozen backbone
and the effective ranks of its embeddings, with two anchors measured in the same run: a linear
probe on the raw pixels and the randomly initialized network (the step-0 probe). Checks (reported,
not asserted): every method above the random network; alpha-CL-direct at least as good as InfoNCE;
both at least `config.margin` above L_quadratic; 2-layer projector > DirectCLR > 1-layer > none.
Throughput (`config.throughput`): images/s of the SimCLR train step against a PyTorch
implementation of the same network, loss and batch (experiments/torch_simclr_peer.py, run in its
own process), interleaved rounds, median and spread. Writes SECTION.json and the figures to the
workdir and, with `write_docs`, that section of docs/benchmarks.md and its figures.
"""

from __future__ import annotations

import copy
import json
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import benchlib, cli  # noqa: E402
from lorank.analysis import curves  # noqa: E402
from lorank.train import contrastive, loop as loop_lib, mesh as mesh_lib, noncontrastive, probe  # noqa: E402

VARIANTS = {  # name -> ({ssl fields}, {model fields})
    "infonce": ({"loss": "infonce"}, {}),
    "quadratic": ({"loss": "quadratic"}, {}),
    "backprop": ({"loss": "backprop"}, {}),
    "r_H": ({"loss": "r_H"}, {}),
    "r_gamma": ({"loss": "r_gamma"}, {}),
    "r_s": ({"loss": "r_s"}, {}),
    "direct": ({"loss": "direct"}, {}),
    "proj_linear": ({"loss": "infonce"}, {"projector": "linear"}),
    "proj_none": ({"loss": "infonce"}, {"projector": "none"}),
    "directclr": ({"loss": "infonce", "directclr_dim": -1}, {"projector": "none"}),  # -1: config.directclr_dim
}
PEER = pathlib.Path(__file__).resolve().with_name("torch_simclr_peer.py")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def variant_list(spec: str) -> list[str]:
    names = [v.strip() for v in spec.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if not names or unknown:
        raise ValueError(f"config.variants={spec!r}: expected names from {sorted(VARIANTS)}")
    return names


def variant_config(config, name: str):
    cfg = copy.deepcopy(config.ssl)
    ssl_fields, model_fields = VARIANTS[name]
    for k, v in ssl_fields.items():
        cfg.ssl[k] = config.directclr_dim if (k == "directclr_dim" and v == -1) else v
    for k, v in model_fields.items():
        cfg.model[k] = v
    return cfg


def train_variant(config, name: str, workdir: pathlib.Path) -> dict:
    run_dir = workdir / name
    summary = contrastive.run(variant_config(config, name), str(run_dir),
                              log=lambda line: print(f"[{name}] {line}", flush=True))
    records = curves.read_metrics(str(run_dir / loop_lib.METRICS_FILE))
    rates = [r["images_per_s"] for r in records if "images_per_s" in r]
    spectra = contrastive.load_spectra(str(run_dir))
    return {**summary, "records": records, "spectra": spectra.get(max(spectra)) if spectra else {},
            "images_per_s": sorted(rates)[len(rates) // 2] if rates else None}


def raw_pixel_probe(config) -> dict:
    """Linear probe on the flattened pixels of the probe and test images (the same l2 selection)."""
    data = noncontrastive.load_data(config.ssl.data)
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    num_classes = int(max(data["probe_y"].max(), data["test_y"].max())) + 1
    out = probe.linear_probe(flat(data["probe_x"]), data["probe_y"], flat(data["test_x"]), data["test_y"],
                             num_classes=num_classes)
    return {"probe/linear_acc": out["test_acc"],
            "probe/knn200_acc": probe.knn_accuracy(flat(data["probe_x"]), data["probe_y"], flat(data["test_x"]),
                                                   data["test_y"], k=min(200, len(data["probe_x"])),
                                                   num_classes=num_classes)}


def checks(results: dict[str, dict], random: dict, margin: float) -> dict[str, bool]:
    acc = {name: r["probe/linear_acc"] for name, r in results.items()}
    out = {f"{name} above the random network": a > random["probe/linear_acc"] for name, a in acc.items()}
    if "direct" in acc and "infonce" in acc:
        out["direct >= infonce"] = acc["direct"] >= acc["infonce"]
        if "quadratic" in acc:
            out[f"direct and infonce >= quadratic + {margin}"] = min(acc["direct"], acc["infonce"]) >= (
                acc["quadratic"] + margin)
    chain = [n for n in ("infonce", "directclr", "proj_linear", "proj_none") if n in acc]
    if len(chain) > 1:
        label = " > ".join({"infonce": "2-layer", "proj_linear": "1-layer", "proj_none": "none"}.get(n, n)
                           for n in chain)
        out[f"projectors: {label}"] = all(acc[a] > acc[b] for a, b in zip(chain, chain[1:]))
    return out


def torch_python() -> str | None:
    """A Python that imports torch: this one, or .venv-torch/bin/python beside the repo; None if neither."""
    for python in (sys.executable, str(REPO_ROOT / ".venv-torch" / "bin" / "python")):
        if pathlib.Path(python).exists() and subprocess.run([python, "-c", "import torch"],
                                                            capture_output=True).returncode == 0:
            return python
    return None


def lorank_step_rate(config, images: np.ndarray, steps: int) -> float:
    """images/s of the jitted SimCLR train step (augmentation of both views, forward/backward, update)."""
    cfg = variant_config(config, "infonce")
    cfg.optim.name = "sgdw"
    cfg.eval.knn_k = (1,)  # the step alone is timed: its evaluators never run
    loop_config = loop_lib.LoopConfig.from_config(cfg.train)
    data = {"train": images, "probe_x": images[:2], "probe_y": np.array([0, 1]), "test_x": images[:2],
            "test_y": np.array([0, 1])}
    task, tx, _ = contrastive.build(cfg, data)
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    plan = loop_lib.joint_step_plan(task, tx, mesh, jax.random.key(0))
    state = loop_lib.init_on_mesh(plan.init_state, plan.shardings, jax.random.key(0))
    step = jax.jit(plan.step, donate_argnums=0)
    batch = mesh_lib.global_batch(mesh, task.train_batch(0, None), (1, loop_config.batch_size))
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, _ = step(state, batch)
    jax.block_until_ready(state)
    return loop_config.batch_size * steps / (time.perf_counter() - start)


def throughput(config, workdir: pathlib.Path) -> dict | None:
    """Interleaved rounds of lorank's and PyTorch's images/s on the same network, loss and batch."""
    python = torch_python()
    if python is None:
        print("throughput skipped: no Python with torch (install the bench extra)")
        return None
    c = config.ssl
    data = noncontrastive.load_data(c.data)
    batch = int(c.train.batch_size)
    images = data["train"][:batch].astype(np.float32)
    np.save(workdir / "throughput_images.npy", images)
    opts = dict(c.model.backbone_options)
    args = [python, str(PEER), "--images", str(workdir / "throughput_images.npy"), "--steps",
            str(config.throughput_steps), "--width", str(opts.get("width", 32)), "--hidden",
            str(c.model.projector_hidden), "--out", str(c.model.projector_dim), "--tau", str(c.ssl.tau),
            "--threads", str(config.torch_threads)]
    rounds = []
    for _ in range(config.throughput_rounds):
        ours = lorank_step_rate(config, images, config.throughput_steps)
        theirs = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        rounds.append({"lorank": ours, "torch": theirs["images_per_s"], "ratio": ours / theirs["images_per_s"],
                       "torch_version": theirs["torch_version"]})
        print(f"throughput round: {rounds[-1]}", flush=True)
    ratios = [r["ratio"] for r in rounds]
    return {"rounds": rounds, "median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
            "max_ratio": max(ratios), "lorank_median": statistics.median(r["lorank"] for r in rounds),
            "torch_median": statistics.median(r["torch"] for r in rounds), "batch": batch,
            "image_shape": list(images.shape[1:]), "torch_version": rounds[0]["torch_version"]}


def plot(results: dict[str, dict], path: pathlib.Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for name, r in results.items():
        spectra = r["spectra"]
        if "feature" in spectra:
            axes[0].semilogy(spectra["feature"], label=name)
        if "projection" in spectra:
            axes[1].semilogy(spectra["projection"], label=name)
        erank = [(x["step"], x["spectrum/feature_erank"]) for x in r["records"] if "spectrum/feature_erank" in x]
        axes[2].plot(*zip(*erank), marker="o", label=name)
    for ax, title, xlabel, ylabel in zip(
            axes, ("final backbone-feature spectrum", "final projection spectrum", "feature effective rank"),
            ("index", "index", "step"), ("singular value", "singular value", "effective rank")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(config, workdir) -> dict:
    names = variant_list(config.variants)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {name: train_variant(config, name, workdir) for name in names}
    raw = raw_pixel_probe(config)
    random = next(iter(results.values()))["random_network"]
    speed = throughput(config, workdir) if config.throughput else None
    wall = time.perf_counter() - start
    out = {"variants": {n: {k: v for k, v in r.items() if k not in ("records", "spectra")} for n, r in results.items()},
           "raw_pixels": raw, "random_network": random, "checks": checks(results, random, config.margin),
           "throughput": speed, "wall_seconds": wall}
    section = config.section
    (workdir / f"{section}.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(results, workdir / f"{section}.png")
    if config.write_docs:
        command = (f"python -m experiments.bench_ssl --config configs/bench_ssl.py:{config.variant} "
                   f"--workdir runs/{section}")
        benchlib.write_section(section, command, docs_body(out, config, section), out)
        benchlib.FIGURES_DIR.mkdir(parents=True, exist_ok=True)
        (benchlib.FIGURES_DIR / f"{section}.png").write_bytes((workdir / f"{section}.png").read_bytes())
    print(json.dumps({"checks": out["checks"], "throughput_ratio": speed and speed["median_ratio"]}))
    return out


def docs_body(out: dict, config, section: str) -> str:
    c = config.ssl
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ""  # noqa: E731
    rows = [[name, fmt(r["probe/linear_acc"]), fmt(r.get("probe/knn200_acc")), fmt(r.get("probe/knn20_acc")),
             f"{r['spectrum/feature_erank']:.1f}", f"{r['spectrum/projection_erank']:.1f}"
             if "spectrum/projection_erank" in r else "", f"{r['images_per_s']:.0f}" if r.get("images_per_s") else ""]
            for name, r in out["variants"].items()]
    rnd, raw = out["random_network"], out["raw_pixels"]
    rows.append(["random network (step 0)", fmt(rnd["probe/linear_acc"]), fmt(rnd.get("probe/knn200_acc")),
                 fmt(rnd.get("probe/knn20_acc")), "", "", ""])
    rows.append(["raw pixels", fmt(raw["probe/linear_acc"]), fmt(raw["probe/knn200_acc"]), "", "", "", ""])
    table = benchlib.markdown_table(["variant", "linear probe", "kNN k=200", "kNN k=20", "feature eff. rank",
                                     "projection eff. rank", "images/s"], rows)
    verdicts = "\n".join(f"- {name}: **{'yes' if ok else 'NO'}**" for name, ok in out["checks"].items())
    d = c.data
    setup = (f"{c.model.backbone} ({dict(c.model.backbone_options)}) with a {c.model.projector} projector "
             f"{c.model.projector_hidden}-{c.model.projector_dim} unless the variant says otherwise, on "
             f"{d.train_per_class} CIFAR-10 training images per class at {32 // d.downsample} px, {c.train.steps} "
             f"steps of {c.train.batch_size} images (two SimCLR views each; crop area {tuple(c.augment.crop_area)}), "
             f"{c.optim.name} lr {c.optim.lr} (warmup {c.optim.warmup_steps}, cosine), weight decay "
             f"{c.optim.weight_decay}; tau {c.ssl.tau}, direct p {c.ssl.p}, r_gamma gamma {c.ssl.gamma}, DirectCLR "
             f"d0 {config.directclr_dim}. Probe: linear (l2 chosen on a validation split of the probe set) and kNN "
             f"on the frozen backbone's features of {d.probe_per_class} training images per class, scored on "
             f"{d.test_per_class} test images per class. This invocation took {out['wall_seconds'] / 60:.1f} "
             f"minutes (finished runs are reused).")
    speed = out["throughput"]
    if speed is None:
        perf = "Throughput: not measured (no Python with torch; install the bench extra)."
    else:
        perf_rows = [[k + 1, f"{r['lorank']:.0f}", f"{r['torch']:.0f}", f"{r['ratio']:.2f}"]
                     for k, r in enumerate(speed["rounds"])]
        perf = (f"Throughput of the SimCLR train step (two augmented views, forward and backward, InfoNCE, SGD "
                f"update), batch {speed['batch']} of {tuple(speed['image_shape'])} images, lorank (jitted) vs "
                f"PyTorch {speed['torch_version']} (experiments/torch_simclr_peer.py, the same network and loss, "
                f"its own process, {config.torch_threads} threads), {len(speed['rounds'])} interleaved rounds: "
                f"median ratio **{speed['median_ratio']:.2f}x** (range {speed['min_ratio']:.2f}-"
                f"{speed['max_ratio']:.2f}; aim >= 1.0).\n\n"
                + benchlib.markdown_table(["round", "lorank images/s", "torch images/s", "lorank / torch"], perf_rows))
    return (f"{setup}\n\n{table}\n\nChecks:\n\n{verdicts}\n\n![spectra and effective rank](figures/{section}.png)"
            f"\n\n{perf}")


if __name__ == "__main__":
    cli.launch(run, "configs/bench_ssl.py:bench")
