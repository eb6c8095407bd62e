"""Why GaLore converges inside a subspace, and why it must switch subspaces.

  python -m experiments.dynamics_galore_convergence \\
      --config configs/dynamics.py:galore_convergence --workdir runs/galore_convergence

On phi(W) = (1/N) sum_i [1/2 tr(W^T B_i W C_i) - tr(A_i^T W)], whose negative gradient
is G = (1/N) sum_i (A_i - B_i W C_i), runs lorank's GaLore (`scale_by_galore` with an
identity inner step and left projection, i.e. projected SGD) with a fixed projection
and with refreshes every T steps, next to full gradient descent. Measures
||R_t|| = ||P^T G_t||_F against (1 - eta kappa)^t ||R_0|| and the loss gap to the
optimum. Writes galore_convergence.png and metrics.json to the workdir.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from experiments import cli
from lorank.analysis import plots
from lorank.dynamics import low_rank_grad as lrg
from lorank.optim.galore import scale_by_galore

FIXED = 2**30  # a refresh interval longer than any run: the projection never changes


def reference(prob: lrg.LsqProblem) -> dict:
    """S, lambda_max(S), the optimum W* and phi(W*) in float64."""
    a, b, c = (np.asarray(t, np.float64) for t in prob)
    m, n = a.shape[1:]
    s = np.mean([np.kron(ci, bi) for bi, ci in zip(b, c)], axis=0)
    w_star = lrg.unvec(np.linalg.solve(s, lrg.vec(a.mean(0))), m, n)
    loss = np.mean([0.5 * np.trace(w_star.T @ bi @ w_star @ ci) - np.trace(ai.T @ w_star)
                    for ai, bi, ci in zip(a, b, c)])
    return dict(lam_max=float(np.linalg.eigvalsh(s)[-1]), w_star=w_star, loss_star=float(loss))


def run_galore(prob: lrg.LsqProblem, rank: int, gap: int, lr: float, steps: int) -> dict:
    """GaLore (identity inner, left projection) from W = 0; logs loss, ||P^T G|| and kappa."""
    tx = optax.chain(scale_by_galore(rank, update_proj_gap=gap, scale=1.0, proj_type="left",
                                     inner=optax.identity()), optax.scale(-lr))
    w0 = jnp.zeros(prob.a.shape[1:])

    @jax.jit
    def run(w):
        def step(carry, _):
            w, state = carry
            g = lrg.lsq_grad(w, prob)
            updates, state = tx.update(-g, state, w)  # optax minimizes phi: its gradient is -G
            p = state[0].projectors.left  # the projection used for this step
            rec = (lrg.lsq_loss(w, prob), jnp.linalg.norm(p.T @ g), lrg.galore_kappa(p, prob))
            return (optax.apply_updates(w, updates), state), rec

        (w, _), recs = jax.lax.scan(step, (w, tx.init(w)), None, length=steps)
        return w, recs

    w, (loss, r_norm, kappa) = run(w0)
    return dict(loss=np.asarray(loss, np.float64), r_norm=np.asarray(r_norm, np.float64),
                kappa=np.asarray(kappa, np.float64), final_loss=float(lrg.lsq_loss(w, prob)))


def run_gd(prob: lrg.LsqProblem, lr: float, steps: int) -> np.ndarray:
    """Full gradient descent W <- W + lr G; the loss before each step."""
    def step(w, _):
        return w + lr * lrg.lsq_grad(w, prob), lrg.lsq_loss(w, prob)

    _, loss = jax.jit(lambda w: jax.lax.scan(step, w, None, length=steps))(
        jnp.zeros(prob.a.shape[1:]))
    return np.asarray(loss, np.float64)


def draw(runs: dict, gd: np.ndarray, ref: dict, lr: float, path: pathlib.Path) -> None:
    fig, (ax0, ax1) = plots.figure(1, 2, panel_size=(4.6, 3.3))
    fixed = runs["fixed"]
    t = np.arange(len(fixed["r_norm"]))
    floor = 1e-6 * fixed["r_norm"][0]  # float32 projectors: P^T G is exact to ~1e-7 ||G||
    bound = fixed["r_norm"][0] * (1.0 - lr * fixed["kappa"][0]) ** t
    shown = t[: max(400, int(np.argmax(bound < floor)))]
    ax0.plot(shown, fixed["r_norm"][shown], lw=1.8, label="fixed P: measured ||R_t||")
    ax0.plot(shown, bound[shown], "k--", lw=1, label="bound (1 - eta kappa)^t ||R_0||")
    for name, run in runs.items():
        if name != "fixed":
            ax0.plot(shown, run["r_norm"][shown], lw=0.8, alpha=0.8,
                     label=f"{name}: ||P_t^T G_t||")
    ax0.axhspan(1e-9, floor, color="0.85", lw=0, label="float32 round-off")
    ax0.set_yscale("log")
    ax0.set_ylim(0.2 * floor, 2 * fixed["r_norm"].max())
    ax0.set_xlabel("step")
    ax0.set_title("projected gradient R_t = P^T G_t")
    ax0.legend(fontsize=6.5, loc="upper right", framealpha=0.9)
    scale = abs(ref["loss_star"])
    ax1.plot(t, (gd - ref["loss_star"]) / scale, "k", lw=1, label="full gradient descent")
    for name, run in runs.items():
        ax1.plot(t, (run["loss"] - ref["loss_star"]) / scale, lw=1.5, label=f"GaLore, {name}")
    ax1.set_yscale("log")
    ax1.set_ylim(1e-6, 3)
    ax1.set_xlabel("step")
    ax1.set_title("(phi(W_t) - phi*) / |phi*|")
    ax1.legend(fontsize=7)
    plots.save(fig, path, dpi=90)


def run(config, workdir) -> dict:
    """Runs the experiment of `config`, writing figures and metrics.json to `workdir`; returns the metrics."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    prob = lrg.lsq_problem(jax.random.key(config.seed), config.m, config.n, config.num_terms,
                           floor=config.floor)
    ref = reference(prob)
    lr = config.lr_frac / ref["lam_max"]
    runs = {"fixed": run_galore(prob, config.rank, FIXED, lr, config.steps)}
    for gap in config.gaps:
        runs[f"T={gap}"] = run_galore(prob, config.rank, gap, lr, config.steps)
    gd = run_gd(prob, lr, config.steps)
    fixed = runs["fixed"]
    rate = 1.0 - lr * fixed["kappa"][0]
    ratios = fixed["r_norm"][1:] / fixed["r_norm"][:-1]
    live = fixed["r_norm"][:-1] > 1e-5 * fixed["r_norm"][0]  # above float32 round-off
    summary = {
        "lr": lr,
        "kappa": float(fixed["kappa"][0]),
        "rate_bound": rate,
        "measured_ratio_max": float(ratios[live].max()),
        "bound_holds_every_step": bool(np.all(ratios[live] <= rate * (1 + 1e-5))),
        "loss_star": ref["loss_star"],
        "final_loss": {name: run["final_loss"] for name, run in runs.items()},
        "final_loss_full_gd": float(gd[-1]),
        "relative_gap_final": {name: (run["final_loss"] - ref["loss_star"]) / abs(ref["loss_star"])
                               for name, run in runs.items()},
    }
    logging.info("%s", summary)
    draw(runs, gd, ref, lr, workdir / "galore_convergence.png")
    out = {"config": config.to_dict(), **summary}
    (workdir / "metrics.json").write_text(json.dumps(out, indent=2, default=list) + "\n")
    logging.info("wrote %s", workdir)
    return out


if __name__ == "__main__":
    cli.launch(run, "configs/dynamics.py:galore_convergence")
