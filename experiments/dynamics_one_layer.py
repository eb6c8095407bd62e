"""One-layer nonlinear contrastive dynamics on a mixture of clusters: figures and metrics.

  python -m experiments.dynamics_one_layer --config configs/dynamics.py:one_layer --workdir runs/one_layer

Writes one_layer.png and metrics.json to the workdir.
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
from lorank.data import synthetic
from lorank.dynamics import one_layer

def node_counts(max_nodes: int) -> list[int]:
    """1, 2, 4, ..., max_nodes."""
    counts = [1]
    while counts[-1] * 2 <= max_nodes:
        counts.append(counts[-1] * 2)
    return counts if counts[-1] == max_nodes else counts + [max_nodes]


def top_eigvec_cos(ws: np.ndarray, data, act) -> np.ndarray:
    """|cos(w, top eigenvector of A(w))| for each row of ws [K, d] (float64 eigh)."""
    a = np.asarray(jax.vmap(lambda w: one_layer.a_matrix(w, data, act))(jnp.asarray(ws)),
                   np.float64)
    vecs = np.linalg.eigh(0.5 * (a + np.swapaxes(a, 1, 2)))[1][:, :, -1]
    return np.abs(np.sum(vecs * ws, axis=1)) / np.linalg.norm(ws, axis=1)


def run_activation(name: str, data, centers: np.ndarray, lam: float, config) -> dict:
    act = one_layer.get_activation(name, slope=config.leaky_slope, power=config.power)
    keys = jax.random.split(jax.random.key(config.seed + 2), config.num_seeds)
    w0 = jnp.concatenate([one_layer.sphere_init(k, config.max_nodes, config.dim) for k in keys])
    start = time.perf_counter()
    traj = one_layer.simulate(w0, data, act, config.horizon / lam, num_saves=config.num_saves,
                              rtol=config.rtol, atol=config.atol)
    ys = np.asarray(traj.ys, np.float64)  # [S * M, T, d]
    seconds = time.perf_counter() - start
    ys = ys / np.linalg.norm(ys, axis=-1, keepdims=True)
    final = ys[:, -1].reshape(config.num_seeds, config.max_nodes, config.dim)
    sizes = node_counts(config.max_nodes)
    counts = np.array([[one_layer.count_patterns(final[s, :m], config.pattern_threshold)
                        for m in sizes] for s in range(config.num_seeds)])
    center_cos = np.abs(ys @ centers.T)  # [S * M, T, K]
    fix_cos = top_eigvec_cos(ys[:, -1], data, act)
    moved = np.linalg.norm(ys[:, -1] - ys[:, -2], axis=1)
    summary = {
        "degree": act.degree,
        "patterns_mean": dict(zip(map(str, sizes), counts.mean(0).tolist())),
        "patterns_min": dict(zip(map(str, sizes), counts.min(0).tolist())),
        "fixed_point_cos_min": float(fix_cos.min()),
        "fixed_point_cos_median": float(np.median(fix_cos)),
        "nodes_at_a_cluster_center": float(np.mean(center_cos[:, -1].max(1) > 0.95)),
        "last_save_move_max": float(moved.max()),
        "solver_steps_max": int(np.max(traj.num_steps)),
        "simulate_seconds_incl_compile": seconds,
    }
    logging.info("%s: %s", name, summary)
    return dict(summary=summary, counts=counts, sizes=sizes, center_cos=center_cos,
                fix_cos=fix_cos, ts=np.asarray(traj.ts) * lam)


def draw(results: dict, k: int, path: pathlib.Path) -> None:
    fig, ax = plots.figure(1, 4, panel_size=(3.6, 2.9))
    for name, res in results.items():
        sizes = np.array(res["sizes"])
        mean = res["counts"].mean(0)
        (line,) = ax[0].plot(sizes, mean, "o-", ms=3, label=name)
        ax[0].fill_between(sizes, res["counts"].min(0), res["counts"].max(0),
                           color=line.get_color(), alpha=0.2, lw=0)
        ax[2].plot(np.sort(1.0 - res["fix_cos"] + 1e-16), label=name)
    ax[0].axhline(k, color="k", ls="--", lw=0.8, label=f"{k} clusters")
    ax[0].set_xscale("log", base=2)
    ax[0].set_xlabel("number of nodes")
    ax[0].set_ylabel("distinct patterns found")
    ax[0].set_title("patterns vs nodes")
    ax[0].legend(fontsize=7)
    width = 0.8 / max(1, len(results))
    for i, (name, res) in enumerate(results.items()):
        final = res["center_cos"][:, -1]
        at = np.where(final.max(1) > 0.95, final.argmax(1), k)
        hist = np.bincount(at, minlength=k + 1) / len(at)
        ax[1].bar(np.arange(k + 1) + i * width - 0.4 + width / 2, hist, width, label=name)
    ax[1].set_xticks(np.arange(k + 1), [str(i) for i in range(k)] + ["none"], fontsize=7)
    ax[1].set_xlabel("cluster center a node converges to (|cos| > 0.95)")
    ax[1].set_ylabel("fraction of nodes")
    ax[1].set_title("where nodes converge")
    ax[1].legend(fontsize=7)
    ax[2].set_yscale("log")
    ax[2].set_xlabel("node (sorted)")
    ax[2].set_ylabel("1 - |cos(w, top eigvec of A(w))|")
    ax[2].set_title("fixed points: w = top eigvec of A(w)")
    ax[2].legend(fontsize=7)
    for name, style in (("relu", "-"), ("linear", ":")):
        if name not in results:
            continue
        cc, ts = results[name]["center_cos"], results[name]["ts"]
        for node in range(6):
            ax[3].plot(ts, cc[node].max(1), style, lw=1.2,
                       label=f"{name} node {node}" if node < 2 else None)
    ax[3].set_xlim(0, ts[-1] / 5)
    ax[3].set_xlabel("t * lambda_max (first fifth of the run)")
    ax[3].set_ylabel("max_k |cos(w, mu_k)|")
    ax[3].set_ylim(0, 1.02)
    ax[3].set_title("alignment with the nearest center")
    ax[3].legend(fontsize=7, loc="lower right")
    plots.save(fig, path, dpi=90)


def run(config, workdir) -> dict:
    """Runs the experiment of `config`, writing figures and metrics.json to `workdir`; returns the metrics."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    x, x_prime, centers = synthetic.cluster_mixture(config)
    data, centers = one_layer.Views(x, x_prime, None), np.asarray(centers, np.float64)
    x_alpha = np.asarray(one_layer.a_matrix(jnp.ones(config.dim), data,
                                            one_layer.get_activation("linear")), np.float64)
    lam = float(np.linalg.eigvalsh(x_alpha)[-1])
    results = {name: run_activation(name, data, centers, lam, config)
               for name in config.activations}
    draw(results, config.num_clusters, workdir / "one_layer.png")
    out = {"config": config.to_dict(), "lambda_max": lam,
           **{k: v["summary"] for k, v in results.items()}}
    (workdir / "metrics.json").write_text(json.dumps(out, indent=2, default=list) + "\n")
    logging.info("wrote %s", workdir)
    return out


if __name__ == "__main__":
    cli.launch(run, "configs/dynamics.py:one_layer")
