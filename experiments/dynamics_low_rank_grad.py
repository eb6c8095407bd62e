"""Gradients of reversible networks become low rank: stable rank per layer on CIFAR-10.

  python -m experiments.dynamics_low_rank_grad --config configs/dynamics.py:low_rank_grad --workdir runs/low_rank_grad

Trains bias-free MLPs (linear, ReLU, leaky ReLU; l2 and softmax losses) by full-batch
gradient descent on pooled CIFAR-10 images, logs the stable rank of every layer's
gradient at every step, and draws GaLore's bound where its quantities can be
computed: exactly for a single linear layer with the l2 loss (B = I and C = X^T X / N
are constant), and for the last layer of each l2 network with B_i, C_i frozen at t0.
Writes low_rank_grad.png and metrics.json to the workdir.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from lorank.data import images as image_data
from experiments import cli
from lorank.analysis import plots
from lorank.dynamics import low_rank_grad as lrg

def cifar_xy(config) -> tuple[np.ndarray, np.ndarray]:
    """Pooled, centered CIFAR-10 images [N, d] scaled to lambda_max(X^T X / N) = 1, and
    one-hot labels [N, 10]."""
    archive = image_data.cifar10_archive(config.cifar.path)
    if not archive.is_file():
        raise FileNotFoundError(f"CIFAR-10 archive {archive} not found; set --config.cifar.path or LORANK_DATA")
    images, labels = image_data.load_cifar10(archive, config.cifar.split, config.cifar.max_per_class)
    x = image_data.pool_flatten(images, config.cifar.pool, config.cifar.grayscale).astype(np.float64)
    x = x - x.mean(0)
    x = x / np.sqrt(np.linalg.eigvalsh(x.T @ x / len(x))[-1])  # lambda_max(X^T X / N) = 1
    return x.astype(np.float32), np.eye(10, dtype=np.float32)[labels]


def run_mlp(x, y, act: str, loss: str, config) -> dict:
    dims = (x.shape[1],) + tuple(config.hidden) + (y.shape[1],)
    params = lrg.mlp_init(jax.random.key(config.seed), dims)
    kw = dict(lr=config.lr, act=act, loss=loss, slope=config.leaky_slope)
    t0 = config.bound_t0
    params_t0, log1 = lrg.train(params, x, y, steps=t0, **kw)
    _, log2 = lrg.train(params_t0, x, y, steps=config.steps - t0, **kw)
    sr = np.concatenate([np.asarray(log1.stable_rank), np.asarray(log2.stable_rank)])
    losses = np.concatenate([np.asarray(log1.loss), np.asarray(log2.loss)])
    out = dict(sr=sr, loss=losses, bound=None)
    if loss == "l2":  # last layer: B_i = I; C_i = f_i f_i^T frozen at t0
        last = len(dims) - 2
        g = np.asarray(lrg.layer_gradients(params_t0, x, y, act, loss, config.leaky_slope)[last])
        _, b, f = lrg.reversible_form(params_t0, x, y, last, act, config.leaky_slope)
        bd = lrg.stable_rank_bound(g, lrg.kron_s(np.asarray(b), np.asarray(f)), config.lr,
                                   config.steps - t0 - 1)
        out["bound"] = bd.bound
        out["bound_terms"] = dict(lam1=bd.lam1, lam2=bd.lam2, sr_parallel=bd.sr_parallel,
                                  ratio=bd.ratio, excess=bd.excess)
    return out


def run_single_layer(config) -> dict:
    """One linear layer, l2 loss: the lemma's assumptions hold exactly (float64)."""
    cifar = config.cifar.copy_and_resolve_references()
    cifar.pool = config.single_layer_pool
    x, y = cifar_xy(ml_collections.ConfigDict({"cifar": cifar}))
    x, y = x.astype(np.float64), y.astype(np.float64)
    c = x.T @ x / x.shape[0]
    lr = config.single_layer_lr_frac / np.linalg.eigvalsh(c)[-1]
    with jax.enable_x64(True):
        w0 = tuple(jnp.asarray(w, jnp.float64)
                   for w in lrg.mlp_init(jax.random.key(config.seed), (x.shape[1], y.shape[1])))
        xj, yj = jnp.asarray(x), jnp.asarray(y)
        _, log = lrg.train(w0, xj, yj, lr=lr, steps=config.single_layer_steps, act="linear",
                           loss="l2")
        g0 = np.asarray(lrg.layer_gradients(w0, xj, yj, "linear", "l2")[0])
    bd = lrg.stable_rank_bound(g0, np.kron(c, np.eye(y.shape[1])), lr,
                               config.single_layer_steps - 1)
    sr = np.asarray(log.stable_rank, np.float64)[:, 0]
    norm = np.asarray(log.grad_norm, np.float64)[:, 0]
    # G_t = (Y - X W^T)^T X / N is computed from a residual that does not vanish, so once
    # ||G_t|| falls below ~1e-10 ||G_0|| it is float64 round-off, not the dynamics.
    valid = norm > config.single_layer_norm_floor * norm[0]
    return dict(sr=sr, valid=valid, bound=bd.bound,
                holds=bool(np.all(sr[valid] <= bd.bound[valid] * (1 + 1e-9))),
                dim=x.shape[1], terms=dict(lam1=bd.lam1, lam2=bd.lam2, sr_parallel=bd.sr_parallel,
                                           ratio=bd.ratio, excess=bd.excess))


def draw(runs: dict, single: dict, config, path: pathlib.Path) -> None:
    acts, losses = config.activations, config.losses
    fig, axes = plots.figure(len(losses), len(acts) + 1, panel_size=(3.3, 2.6))
    ncol = len(acts) + 1
    t = np.arange(config.steps)
    for i, loss in enumerate(losses):
        for j, act in enumerate(acts):
            ax = axes[i * ncol + j]
            run = runs[(act, loss)]
            for layer in range(run["sr"].shape[1]):
                ax.plot(t, run["sr"][:, layer], lw=1.2, label=f"layer {layer + 1}")
            if run["bound"] is not None:
                ax.plot(config.bound_t0 + np.arange(len(run["bound"])), run["bound"], "k--",
                        lw=1, label="bound, layer 3")
            ax.set_yscale("log")
            top = 100.0 if run["bound"] is None else max(100.0, 1.5 * float(run["bound"][0]))
            ax.set_ylim(0.9, top)
            bound = "" if run["bound"] is None else f" (bound from t0={config.bound_t0})"
            ax.set_title(f"{act}, {loss}{bound}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("stable rank of gradient")
            ax.legend(fontsize=6, loc="upper left" if run["bound"] is not None else "best")
    ax = axes[len(acts)]
    ts = np.arange(1, len(single["sr"]) + 1)
    valid = single["valid"]
    ax.plot(ts[valid], single["sr"][valid], label="measured sr(G_t)")
    ax.plot(ts, single["bound"], "k--", lw=1, label=f"bound (from {single['bound'][0]:.2g})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(0.9, 100.0)
    ax.set_title(f"one linear layer, l2, d={single['dim']} (exact)", fontsize=9)
    ax.set_xlabel("step + 1")
    ax.legend(fontsize=7)
    if len(losses) > 1:
        ax = axes[2 * ncol - 1]
        for (act, loss), run in runs.items():
            ax.plot(t, run["loss"] / run["loss"][0], lw=1, label=f"{act}, {loss}")
        ax.set_yscale("log")
        ax.set_title("training loss / initial", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    plots.save(fig, path, dpi=90)


def run(config, workdir) -> dict:
    """Runs the experiment of `config`, writing figures and metrics.json to `workdir`; returns the metrics."""
    if not 0 < config.bound_t0 < config.steps - 1:
        raise ValueError(f"bound_t0={config.bound_t0} must be in (0, steps - 1)")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    x, y = cifar_xy(config)
    logging.info("CIFAR-10 features %s", x.shape)
    runs, summary = {}, {}
    for loss in config.losses:
        for act in config.activations:
            run = run_mlp(jnp.asarray(x), jnp.asarray(y), act, loss, config)
            runs[(act, loss)] = run
            quarter = len(run["sr"]) // 4
            summary[f"{act}/{loss}"] = {
                "sr_initial": run["sr"][0].tolist(),
                "sr_final": run["sr"][-1].tolist(),
                "sr_max": run["sr"].max(axis=0).tolist(),
                "sr_median_last_quarter": np.median(run["sr"][-quarter:], axis=0).tolist(),
                "loss_initial": float(run["loss"][0]),
                "loss_final": float(run["loss"][-1]),
                **({"last_layer_bound_terms": run["bound_terms"],
                    "last_layer_bound_final": float(run["bound"][-1])}
                   if run["bound"] is not None else {}),
            }
            logging.info("%s/%s: %s", act, loss, summary[f"{act}/{loss}"])
    single = run_single_layer(config)
    last = int(np.flatnonzero(single["valid"])[-1])
    summary["single_linear_layer"] = {"sr_initial": float(single["sr"][0]),
                                      "last_step_above_round_off": last,
                                      "sr_at_last_step_above_round_off": float(single["sr"][last]),
                                      "bound_at_that_step": float(single["bound"][last]),
                                      "bound_holds_every_step": single["holds"],
                                      "input_dim": single["dim"], **single["terms"]}
    logging.info("single linear layer: %s", summary["single_linear_layer"])
    draw(runs, single, config, workdir / "low_rank_grad.png")
    out = {"config": config.to_dict(), "input_dim": x.shape[1], "num_samples": x.shape[0],
           **summary}
    (workdir / "metrics.json").write_text(json.dumps(out, indent=2, default=list) + "\n")
    logging.info("wrote %s", workdir)
    return out


if __name__ == "__main__":
    cli.launch(run, "configs/dynamics.py:low_rank_grad")
