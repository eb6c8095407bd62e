"""Benchmark: the alpha-CL and DirectCLR comparisons at CPU scale, with raw-pixel and random-network anchors.

    python -m experiments.bench_ssl --config configs/bench_ssl.py:bench --workdir runs/bench_ssl

Trains every variant of `config.variants` (`VARIANTS`: InfoNCE, L_quadratic, backprop alpha,
alpha-CL r_H, r_gamma, r_s and direct with the 2-layer projector; InfoNCE with a 1-layer and with
no projector; DirectCLR; InfoNCE trained by GaLore-Adam on the conv kernels at Adam's peak learning
rate) with the same network, data, augmentations, steps and, but for "galore", optimizer
(`config.ssl`, a configs/ssl.py config; `lorank.train.contrastive.run` in workdir/VARIANT, finished
runs reused) and reports per variant the final linear-probe and kNN accuracy of the frozen backbone,
the effective ranks of its features and projections, the optimizer state's bytes and the training
images/s, with two anchors measured in the same run: the same linear probe and kNN on the raw pixels
(flattened, at the training resolution) and the randomly initialized network (the first run's step-0
probe). Checks (reported, not asserted): every method above the random network; alpha-CL-direct at
least as good as InfoNCE; both at least `config.margin` above L_quadratic; 2-layer projector >
DirectCLR > 1-layer > none; GaLore's optimizer state smaller than Adam's (InfoNCE's). Figures: the
singular-value spectra of every variant's final features and projections, and their effective ranks
over training.

Throughput (`config.throughput`): images/s of the SimCLR train step (two augmented views, the encoder
forward and backward on both, InfoNCE, an SGD update) of lorank's jitted loop step against the same
step in PyTorch (experiments/torch_simclr_peer.py: the same SmallConvNet and projector, augmentation,
NT-Xent loss and batch), each in its own process, in interleaved rounds; the median and range of the
ratio. Skipped, and said so, without a Python that imports torch.

Writes SECTION.json and SECTION.png to the workdir and, with `write_docs`, that section of
docs/benchmarks.md and its figure.
"""

from __future__ import annotations

import copy
import json
import pathlib
import statistics
import subprocess
import time

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import benchlib, cli  # noqa: E402
from lorank import checks as checks_lib  # noqa: E402
from lorank.analysis import curves  # noqa: E402
from lorank.models import resnet  # noqa: E402
from lorank.train import contrastive, loop as loop_lib, mesh as mesh_lib, noncontrastive  # noqa: E402
from lorank.train import optimizers, probe, simclr, ssl  # noqa: E402

VARIANTS = {  # name -> ({ssl fields}, {model fields}, {optim fields}) changed from config.ssl
    "infonce": ({"loss": "infonce"}, {}, {}),
    "quadratic": ({"loss": "quadratic"}, {}, {}),
    "backprop": ({"loss": "backprop"}, {}, {}),
    "r_H": ({"loss": "r_H"}, {}, {}),
    "r_gamma": ({"loss": "r_gamma"}, {}, {}),
    "r_s": ({"loss": "r_s"}, {}, {}),
    "direct": ({"loss": "direct"}, {}, {}),
    "proj_linear": ({"loss": "infonce"}, {"projector": "linear"}, {}),
    "proj_none": ({"loss": "infonce"}, {"projector": "none"}, {}),
    "directclr": ({"loss": "infonce"}, {"projector": "none"}, {}),  # and ssl.directclr_dim = directclr_dim(config)
    "galore": ({"loss": "infonce"}, {}, {"name": "galore"}),  # and optim.galore_lr = optim.lr
}
PROJECTOR_ORDER = (("infonce", "2-layer"), ("directclr", "DirectCLR"), ("proj_linear", "1-layer"),
                   ("proj_none", "none"))  # the expected order of linear-probe accuracy, best first
PEER = pathlib.Path(__file__).resolve().with_name("torch_simclr_peer.py")


def variant_list(spec: str) -> list[str]:
    names = [v.strip() for v in spec.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"config.variants={spec!r}: expected distinct names from {sorted(VARIANTS)}")
    return names


def directclr_dim(config) -> int:
    """DirectCLR's d0: `config.directclr_dim`, or (0) a quarter of the backbone's feature dimension."""
    if config.directclr_dim:
        return checks_lib.integer("directclr_dim", config.directclr_dim, minimum=1)
    return max(1, ssl.build_encoder(config.ssl.model).backbone.feature_dim // 4)


def variant_config(config, name: str):
    """config.ssl with the ssl, model and optim fields of variant `name` changed."""
    cfg = copy.deepcopy(config.ssl)
    for section, fields in zip(("ssl", "model", "optim"), VARIANTS[name]):
        for k, v in fields.items():
            cfg[section][k] = v
    if name == "directclr":
        cfg.ssl.directclr_dim = directclr_dim(config)
    if name == "galore":  # the same peak learning rate as Adam's: only the projection of the conv kernels differs
        cfg.optim.galore_lr = cfg.optim.lr
    return cfg


def check_config(config) -> list[str]:
    """The variant names; ValueError naming a bad field of the benchmark or of a variant, before any compute."""
    names = variant_list(config.variants)
    checks_lib.number("margin", config.margin, low=0.0)
    for name in names:
        contrastive.check(variant_config(config, name))
    if config.throughput:
        checks_lib.integer("throughput_steps", config.throughput_steps, minimum=1)
        checks_lib.integer("throughput_rounds", config.throughput_rounds, minimum=1)
        checks_lib.integer("torch_threads", config.torch_threads, minimum=1)
        m, a = config.ssl.model, config.ssl.augment
        if m.backbone != "small_convnet" or m.projector != "mlp2" or a.blur_prob > 0:
            raise ValueError(f"the PyTorch peer implements small_convnet + mlp2 without blur; got backbone "
                             f"{m.backbone!r}, projector {m.projector!r}, blur_prob {a.blur_prob} "
                             "(set throughput=False)")
    return names


def train_variant(config, name: str, workdir: pathlib.Path) -> dict:
    run_dir = workdir / name
    summary = contrastive.run(variant_config(config, name), str(run_dir),
                              log=lambda line: print(f"[{name}] {line}", flush=True))
    records = curves.read_metrics(str(run_dir / loop_lib.METRICS_FILE))
    rates = [r["images_per_s"] for r in records if "images_per_s" in r]
    spectra = contrastive.load_spectra(str(run_dir))
    return {**summary, "records": records, "spectra": spectra[max(spectra)] if spectra else {},
            "images_per_s": statistics.median(rates) if rates else None}


def raw_pixel_anchor(probe_x: np.ndarray, probe_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                     knn_k: tuple[int, ...]) -> dict[str, float]:
    """The linear probe (l2 chosen on a validation split, as the runs' probe) and kNN of each k on the
    flattened pixels: images [N, H, W, C], [M, H, W, C], int labels [N], [M] -> {"probe/linear_acc",
    "probe/knn{k}_acc"}."""
    flat = lambda x: np.asarray(x, np.float32).reshape(len(x), -1)  # noqa: E731
    train, test = flat(probe_x), flat(test_x)
    num_classes = int(max(probe_y.max(), test_y.max())) + 1
    out = {"probe/linear_acc": probe.linear_probe(train, probe_y, test, test_y, num_classes=num_classes)["test_acc"]}
    for k in knn_k:
        out[f"probe/knn{k}_acc"] = probe.knn_accuracy(train, probe_y, test, test_y, k=k, num_classes=num_classes)
    return out


def ordering_checks(acc: dict[str, float], random_acc: float, margin: float,
                    state_bytes: dict[str, int] | None = None) -> dict[str, bool]:
    """The expected orderings of linear-probe accuracies `acc` (variant -> accuracy) that the variants
    present allow: each above `random_acc`; direct >= infonce; both >= quadratic + margin; the projector
    order (PROJECTOR_ORDER, strictly decreasing); and of `state_bytes` (variant -> optimizer state bytes):
    galore < infonce (Adam)."""
    state_bytes = state_bytes or {}
    out = {f"{name} above the random network": a > random_acc for name, a in acc.items()}
    if "direct" in acc and "infonce" in acc:
        out["direct >= infonce"] = acc["direct"] >= acc["infonce"]
    both = [n for n in ("direct", "infonce") if n in acc]
    if both and "quadratic" in acc:
        out[f"{' and '.join(both)} >= quadratic + {margin:g}"] = min(acc[n] for n in both) >= acc["quadratic"] + margin
    if "galore" in state_bytes and "infonce" in state_bytes:
        out["galore's optimizer state < adamw's (infonce)"] = state_bytes["galore"] < state_bytes["infonce"]
    chain = [(n, label) for n, label in PROJECTOR_ORDER if n in acc]
    if len(chain) > 1:
        out["projectors: " + " > ".join(label for _, label in chain)] = all(
            acc[a] > acc[b] for (a, _), (b, _) in zip(chain, chain[1:]))
    return out


def ratio_summary(lorank: list[float], torch: list[float]) -> dict[str, float]:
    """Median, min and max of the per-round ratios lorank / torch (images/s of the same round)."""
    if not lorank or len(lorank) != len(torch):
        raise ValueError(f"need as many lorank as torch rounds (at least one), got {len(lorank)} and {len(torch)}")
    ratios = [a / b for a, b in zip(lorank, torch)]
    return {"median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios)}


def torch_python() -> str | None:
    """A Python that imports torch: this one, else .venv-torch/bin/python beside the repo; None if neither."""
    return benchlib.peer_python(("torch", "numpy"))[0]


class LorankStep:
    """lorank's jitted SimCLR train step (InfoNCE, sgdw) on one fixed batch, as the loop builds it
    (`simclr.make_task` + `loop.joint_step_plan`), compiled once; `rate(steps)` times `steps` steps."""

    def __init__(self, config, images: np.ndarray):
        cfg = variant_config(config, "infonce")
        cfg.optim.name = "sgdw"
        encoder = ssl.build_encoder(cfg.model)
        batch = {"images": images}
        task = simclr.make_task(encoder, simclr.SimCLRConfig.from_config(cfg.ssl),
                                noncontrastive.augmentation(cfg.augment), lambda step, rows: batch,
                                image_shape=tuple(images.shape[1:]))
        tx, _ = optimizers.build_optimizer(cfg.optim, cfg.train.steps, resnet.family(cfg.model.backbone))
        mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
        key = jax.random.key(0)
        plan = loop_lib.joint_step_plan(task, tx, mesh, key)
        self.state = loop_lib.init_on_mesh(plan.init_state, plan.shardings, key)
        self.param_count = resnet.param_count(self.state.params)
        self.batch = mesh_lib.global_batch(mesh, batch, (1, len(images)))
        self.step = jax.jit(plan.step, donate_argnums=0)
        self.images = len(images)
        self.rate(2)  # compile and warm up

    def rate(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch)
        loss = float(jax.device_get(metrics["loss"]))
        elapsed = time.perf_counter() - start
        if not np.isfinite(loss):
            raise FloatingPointError(f"lorank's SimCLR step produced a non-finite loss {loss}")
        return self.images * steps / elapsed


def peer_spec(config) -> dict:
    """The PyTorch peer's network, augmentation, loss and optimizer (torch_simclr_peer.DEFAULTS' keys)."""
    c = config.ssl
    opts, a = dict(c.model.backbone_options), c.augment
    return {"width": int(opts.get("width", 32)), "widths": list(opts.get("widths", (1, 2, 4))),
            "hidden": int(c.model.projector_hidden), "out": int(c.model.projector_dim),
            "crop_area": list(a.crop_area), "crop_aspect": list(a.crop_aspect), "flip_prob": a.flip_prob,
            "jitter_prob": a.jitter_prob, "brightness": a.brightness, "contrast": a.contrast,
            "saturation": a.saturation, "hue": a.hue, "gray_prob": a.gray_prob,
            "tau": float(c.ssl.tau), "lr": float(c.optim.lr), "momentum": float(c.optim.b1),
            "weight_decay": float(c.optim.weight_decay)}


def throughput(config, images: np.ndarray, workdir: pathlib.Path) -> dict:
    """Interleaved rounds of lorank's and PyTorch's images/s of the SimCLR train step on `images` [B, H, W, 3]."""
    python = torch_python()
    if python is None:
        return {"skipped": "no Python with torch (this one or .venv-torch/bin/python); install the bench extra"}
    np.save(workdir / "throughput_images.npy", images)
    (workdir / "throughput_spec.json").write_text(json.dumps(peer_spec(config), indent=2) + "\n")
    args = [python, str(PEER), "--images", str(workdir / "throughput_images.npy"), "--spec",
            str(workdir / "throughput_spec.json"), "--steps", str(config.throughput_steps), "--threads",
            str(config.torch_threads)]
    ours = LorankStep(config, images)
    rounds = []
    for k in range(config.throughput_rounds):
        lorank_rate = ours.rate(config.throughput_steps)
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{PEER.name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        theirs = json.loads(done.stdout.strip().splitlines()[-1])
        rounds.append({"lorank": lorank_rate, "torch": theirs["images_per_s"]})
        print(f"throughput round {k + 1}: lorank {lorank_rate:.0f} images/s, torch {theirs['images_per_s']:.0f} "
              f"images/s", flush=True)
    return {"rounds": rounds, **ratio_summary([r["lorank"] for r in rounds], [r["torch"] for r in rounds]),
            "lorank_median": statistics.median(r["lorank"] for r in rounds),
            "torch_median": statistics.median(r["torch"] for r in rounds), "batch": len(images),
            "image_shape": list(images.shape[1:]), "torch_version": theirs["torch_version"],
            "torch_threads": theirs["threads"], "param_count": {"lorank": ours.param_count,
                                                                "torch": theirs["param_count"]}}


def plot(results: dict[str, dict], path: pathlib.Path) -> None:
    """Final feature and projection spectra (log scale) and effective ranks over training of every variant."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    for k, (name, r) in enumerate(results.items()):
        colour = plt.get_cmap("tab20")((2 * k) % 20 + (2 * k) // 20 % 2)  # ten distinct hues, then their light twins
        for ax, which in zip(axes[:2], ("feature", "projection")):
            if which in r["spectra"]:
                ax.semilogy(r["spectra"][which], color=colour, label=name)
        for which, style in (("feature", "-"), ("projection", "--")):
            pts = [(x["step"], x[f"spectrum/{which}_erank"]) for x in r["records"] if f"spectrum/{which}_erank" in x]
            if pts:
                axes[2].plot(*zip(*pts), style, marker="o", ms=3, color=colour,
                             label=name if which == "feature" else None)
    titles = ("final backbone-feature spectrum", "final projection spectrum",
              "effective rank (features solid, projections dashed)")
    for ax, title, xlabel, ylabel in zip(axes, titles, ("index", "index", "step"),
                                         ("singular value (normalized, centred rows)",) * 2 + ("effective rank",)):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(config, workdir) -> dict:
    names = check_config(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {name: train_variant(config, name, workdir) for name in names}
    data = noncontrastive.load_data(config.ssl.data)
    knn_k = tuple(int(k) for k in config.ssl.eval.knn_k)
    raw = raw_pixel_anchor(data["probe_x"], data["probe_y"], data["test_x"], data["test_y"], knn_k=knn_k)
    first = next(iter(results.values()))
    step0 = next(r for r in first["records"] if r.get("step") == 0 and "probe/linear_acc" in r)
    random = {**first["random_network"], **{k: v for k, v in step0.items() if k.startswith("spectrum/")}}
    if config.throughput:
        speed = throughput(config, data["train"][:int(config.ssl.train.batch_size)].astype(np.float32), workdir)
    else:
        speed = {"skipped": "throughput=False"}
    acc = {name: r["probe/linear_acc"] for name, r in results.items()}
    out = {"variants": {n: {k: v for k, v in r.items() if k not in ("records", "spectra")} for n, r in results.items()},
           "raw_pixels": raw, "random_network": random,
           "checks": ordering_checks(acc, random["probe/linear_acc"], config.margin,
                                     {name: r["optimizer_state_bytes"] for name, r in results.items()}),
           "throughput": speed,
           "directclr_dim": directclr_dim(config), "knn_k": list(knn_k), "wall_seconds": time.perf_counter() - start}
    section = config.section
    plot(results, workdir / f"{section}.png")
    benchlib.publish_bench(config, "bench_ssl", workdir, out, lambda: docs_body(out, config, section))
    print(json.dumps({"checks": out["checks"], "throughput_ratio": speed.get("median_ratio"),
                      "throughput_skipped": speed.get("skipped")}))
    return out


def docs_body(out: dict, config, section: str) -> str:
    c = config.ssl
    knn_k = out["knn_k"]
    acc = lambda r, key: f"{r[key]:.3f}" if key in r else ""  # noqa: E731
    rank = lambda r, key: f"{r[key]:.1f}" if key in r else ""  # noqa: E731

    def row(name, r, rate=""):
        state = f"{r['optimizer_state_bytes'] / 1024:.0f}" if "optimizer_state_bytes" in r else ""
        return ([name, acc(r, "probe/linear_acc")] + [acc(r, f"probe/knn{k}_acc") for k in knn_k]
                + [rank(r, "spectrum/feature_erank"), rank(r, "spectrum/projection_erank"), state, rate])

    rows = [row(name, r, f"{r['images_per_s']:.0f}" if r.get("images_per_s") else "")
            for name, r in out["variants"].items()]
    rows.append(row("random network (step 0)", out["random_network"]))
    rows.append(row("raw pixels", out["raw_pixels"]))
    table = benchlib.markdown_table(["variant", "linear probe"] + [f"kNN k={k}" for k in knn_k]
                                    + ["feature eff. rank", "projection eff. rank", "optimizer state KiB",
                                       "train images/s"], rows)
    verdicts = "\n".join(f"- {name}: **{'yes' if ok else 'NO'}**" for name, ok in out["checks"].items())
    d, m, o = c.data, c.model, c.optim
    params = next(iter(out["variants"].values()))["param_count"]
    setup = (f"{m.backbone} ({dict(m.backbone_options)}; {params:,} parameters with the first variant's projector) "
             f"with the {m.projector} projector "
             f"{m.projector_hidden}-{m.projector_dim} unless the variant says otherwise (proj_linear: one Linear, "
             f"proj_none and directclr: none; DirectCLR d0 = {out['directclr_dim']}), on {d.train_per_class} CIFAR-10 "
             f"training images per class at {32 // d.downsample} px; every variant {c.train.steps} steps of "
             f"{c.train.batch_size} images (two SimCLR views each, crop area {tuple(c.augment.crop_area)}), "
             f"{o.name} lr {o.lr} (warmup {o.warmup_steps} steps, then cosine), weight decay {o.weight_decay}; "
             f"tau {c.ssl.tau}, direct p {c.ssl.p}, r_gamma gamma {c.ssl.gamma}.{galore_text(out, c)} "
             f"Probes of the frozen backbone "
             f"(features before the projector): a linear probe (l2 chosen on a validation split of the probe set, "
             f"never on test) and weighted kNN (T = 0.1, cosine) fitted on {d.probe_per_class} training images per "
             f"class and scored on {d.test_per_class} test images per class; the raw-pixel row applies the same "
             f"probes to the flattened {32 // d.downsample} px pixels. Effective ranks: exp(entropy) of the "
             f"normalized singular values of the test images' row-normalized, centred embeddings. \"Well above "
             f"L_quadratic\" means at least {config.margin:g} linear-probe accuracy above it. This invocation took "
             f"{out['wall_seconds'] / 60:.1f} minutes (finished runs are reused).")
    figure = f"![final spectra and effective rank over training](figures/{section}.png)"
    return f"{setup}\n\n{table}\n\nChecks:\n\n{verdicts}\n\n{figure}\n\n{throughput_text(out['throughput'])}"


def galore_text(out: dict, c) -> str:
    """The sentence on the galore variant's optimizer, "" where it did not run."""
    if "galore" not in out["variants"]:
        return ""
    o = c.optim
    return (f" The galore variant trains InfoNCE with GaLore-Adam instead: the conv kernels' gradients, as "
            f"[kh * kw * cin, cout] matrices, projected to rank {o.rank} (refreshed every {o.update_proj_gap} steps "
            f"by an {o.svd} SVD, {o.proj_type} side, scale {o.galore_scale}), every other parameter by plain Adam, "
            f"at Adam's peak learning rate {o.lr}.")


def throughput_text(speed: dict) -> str:
    if "skipped" in speed:
        return f"Throughput: not measured ({speed['skipped']})."
    rows = [[k + 1, f"{r['lorank']:.0f}", f"{r['torch']:.0f}", f"{r['lorank'] / r['torch']:.2f}"]
            for k, r in enumerate(speed["rounds"])]
    counts = speed["param_count"]
    same = ("the same parameter count" if counts["lorank"] == counts["torch"]
            else f"parameter counts DIFFER: lorank {counts['lorank']:,}, torch {counts['torch']:,}")
    return (f"Throughput of the SimCLR train step (two views augmented on the batch, the encoder forward and "
            f"backward on both, InfoNCE / NT-Xent, an SGD-with-momentum update), batch {speed['batch']} of "
            f"{tuple(speed['image_shape'])} images: lorank's jitted loop step vs PyTorch {speed['torch_version']} "
            f"(experiments/torch_simclr_peer.py, the same network with {same}, the same augmentation as tensor ops, "
            f"its own process, {speed['torch_threads']} threads), {len(speed['rounds'])} interleaved rounds: median "
            f"lorank / torch ratio **{speed['median_ratio']:.2f}x** (range {speed['min_ratio']:.2f}-"
            f"{speed['max_ratio']:.2f}; aim >= 1.0).\n\n"
            + benchlib.markdown_table(["round", "lorank images/s", "torch images/s", "lorank / torch"], rows))


if __name__ == "__main__":
    cli.launch(run, "configs/bench_ssl.py:bench")
