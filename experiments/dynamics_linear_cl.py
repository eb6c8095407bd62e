"""Deep linear contrastive learning is PCA of X_alpha: simulation and figures.

  python -m experiments.dynamics_linear_cl --config configs/dynamics.py:linear_cl --workdir runs/linear_cl

Writes linear_cl.png and metrics.json to the workdir.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import cli
from lorank.analysis import plots
from lorank.contrastive import contrastive_cov, uniform_alpha
from lorank.data import images as image_data
from lorank.data.augment import augment_views
from lorank.dynamics import linear_cl


def cifar_x_alpha(config) -> tuple[np.ndarray, np.ndarray] | None:
    """X_alpha (uniform alpha) of two augmented views of pooled CIFAR images, and the
    covariance of the views; None when the archive is missing."""
    path = image_data.cifar10_archive(config.cifar.path)
    if not path.is_file():
        logging.warning("CIFAR-10 archive %s not found: skipping the CIFAR run", path)
        return None
    images, _ = image_data.load_cifar10(path, config.cifar.split, config.cifar.max_per_class)
    rng = np.random.default_rng(config.seed)
    views = [image_data.pool_flatten(augment_views(rng, images, config.shift, config.brightness),
                                     config.cifar.pool, config.cifar.grayscale) for _ in range(2)]
    mean = 0.5 * (views[0].mean(0) + views[1].mean(0))
    std = np.concatenate(views).std()
    x, xp = ((v - mean) / std for v in views)
    x_alpha = np.asarray(contrastive_cov(jnp.asarray(x), jnp.asarray(xp), uniform_alpha(len(x))),
                         np.float64)
    return 0.5 * (x_alpha + x_alpha.T), np.cov(np.concatenate([x, xp]), rowvar=False)


def gaussian_x_alpha(config) -> tuple[np.ndarray, np.ndarray]:
    """X_alpha of Gaussian data whose strongest view variance is augmentation noise."""
    d = config.dims[0]
    rng = np.random.default_rng(config.seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    cov_data = (q * np.geomspace(2.0, 0.05, d)) @ q.T
    cov_aug = config.aug_strength * np.outer(q[:, 3], q[:, 3]) + config.aug_floor * np.eye(d)
    x, xp = linear_cl.gaussian_views(jax.random.key(config.seed), config.num_samples,
                                     jnp.asarray(cov_data), jnp.asarray(cov_aug))
    x_alpha = np.asarray(contrastive_cov(x, xp, uniform_alpha(config.num_samples)), np.float64)
    views = np.concatenate([np.asarray(x), np.asarray(xp)])
    return 0.5 * (x_alpha + x_alpha.T), np.cov(views, rowvar=False)


def run_one(name: str, x_alpha: np.ndarray, raw_cov: np.ndarray, dims, config) -> dict:
    """Simulates the flow from `num_seeds` initializations and measures the theorem."""
    evals, evecs = np.linalg.eigh(x_alpha)
    lam = float(evals[-1])
    start = time.perf_counter()
    traj = linear_cl.simulate_seeds(jax.random.key(config.seed + 1), dims,
                                    jnp.asarray(x_alpha, jnp.float32), config.num_seeds,
                                    config.horizon / lam, num_saves=config.num_saves,
                                    rtol=config.rtol, atol=config.atol)
    jax.block_until_ready(traj.ys)
    seconds = time.perf_counter() - start
    metrics = linear_cl.layer_metrics(traj.ys, jnp.asarray(x_alpha, jnp.float32))
    metrics = {k: np.asarray(v, np.float64) for k, v in metrics.items()}  # [S, T, ...]
    raw_top = np.linalg.eigh(raw_cov)[1][:, -1]
    v0 = np.asarray(jnp.linalg.svd(traj.ys[0][:, -1])[2][:, 0], np.float64)
    summary = {
        "dims": list(dims),
        "lambda_max": lam,
        "lambda_2": float(evals[-2]),
        "final_objective_over_lambda_max_min": float(metrics["objective"][:, -1].min() / lam),
        "final_sv_ratio_max": float(metrics["sv_ratio"][:, -1].max()),
        "final_alignment_min": float(metrics["alignment"][:, -1].min()),
        "final_input_alignment_min": float(metrics["input_alignment"][:, -1].min()),
        "v0_vs_raw_view_pca_max": float(np.abs(v0 @ raw_top).max()),
        "solver_steps_max": int(np.max(traj.num_steps)),
        "simulate_seconds_incl_compile": seconds,
    }
    logging.info("%s: %s", name, summary)
    return dict(summary=summary, metrics=metrics, ts=np.asarray(traj.ts) * lam, evals=evals,
                raw_evals=np.linalg.eigvalsh(raw_cov), top=evecs[:, -1])


def draw(results: dict, path: pathlib.Path) -> None:
    """One row per data set: spectrum, objective, sigma_2/sigma_1, alignment."""
    fig, axes = plots.figure(len(results), 4, panel_size=(3.5, 2.7))
    for row, (name, res) in enumerate(results.items()):
        ax = axes[4 * row: 4 * row + 4]
        m, ts, lam = res["metrics"], res["ts"], res["summary"]["lambda_max"]
        plots.plot_spectrum(ax[0], res["evals"] / lam, label="X_alpha", top=20)
        plots.plot_spectrum(ax[0], res["raw_evals"] / res["raw_evals"].max(),
                            label="covariance of the views", top=20)
        ax[0].set_ylabel("eigenvalue / largest")
        ax[0].set_title(f"{name}: spectra (top 20)")
        ax[0].legend(fontsize=7)
        plots.plot_band(ax[1], ts, m["objective"] / lam, label="J / lambda_max")
        ax[1].axhline(1.0, color="k", ls="--", lw=0.8, label="lambda_max(X_alpha)")
        ax[1].set_title("objective tr(W X W^T)")
        ax[1].set_xlabel("t * lambda_max")
        ax[1].legend(fontsize=7, loc="lower right")
        for layer in range(m["sv_ratio"].shape[-1]):
            plots.plot_band(ax[2], ts, np.maximum(m["sv_ratio"][..., layer], 1e-12),
                            label=f"W_{layer + 1}", logy=True)
        ax[2].set_title("sigma_2 / sigma_1 per layer")
        ax[2].set_xlabel("t * lambda_max")
        ax[2].legend(fontsize=7)
        for i in range(m["alignment"].shape[-1]):
            plots.plot_band(ax[3], ts, m["alignment"][..., i], label=f"|u_{i + 1} . v_{i + 2}|")
        plots.plot_band(ax[3], ts, m["input_alignment"], label="|v_1 . e_max(X_alpha)|")
        ax[3].set_ylim(-0.02, 1.02)
        ax[3].set_title("singular-vector alignment")
        ax[3].set_xlabel("t * lambda_max")
        ax[3].legend(fontsize=7, loc="lower right")
    plots.save(fig, path, dpi=90)


def run(config, workdir) -> dict:
    """Runs the experiment of `config`, writing figures and metrics.json to `workdir`; returns the metrics."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    x_alpha, raw = gaussian_x_alpha(config)
    results["Gaussian"] = run_one("Gaussian", x_alpha, raw, tuple(config.dims), config)
    if config.use_cifar:
        cifar = cifar_x_alpha(config)
        if cifar is not None:
            dims = (cifar[0].shape[0],) + tuple(config.hidden)
            results["CIFAR-10"] = run_one("CIFAR-10", cifar[0], cifar[1], dims, config)
    draw(results, workdir / "linear_cl.png")
    out = {"config": config.to_dict(), **{k: v["summary"] for k, v in results.items()}}
    (workdir / "metrics.json").write_text(json.dumps(out, indent=2, default=list) + "\n")
    logging.info("wrote %s", workdir)
    return out


if __name__ == "__main__":
    cli.launch(run, "configs/dynamics.py:linear_cl")
