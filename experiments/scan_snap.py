"""The figures of Scan&Snap (Tian, Wang, Chen, Du, NeurIPS 2023) from the (Y, Z) dynamics.

  python -m experiments.scan_snap --config configs/scan_snap.py:all --workdir runs/scan_snap

Variants (configs/scan_snap.py): syn_small (Fig. 4), chi (Fig. 3), h (Fig. 8), b (Fig. 9 and
Theorem 4's error table), syn_medium (Fig. 6, 640 runs as one vmapped program), all (every one).
Each writes its figure and metrics.json to the workdir; with `write_docs`, the figures go to
docs/figures/scan_snap_*.png and the measured numbers into docs/scan_snap.md.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchlib, cli
from lorank.analysis import plots
from lorank.data import synthetic
from lorank.dynamics import scan_snap as ss
from lorank.train.scan_snap_runs import final_distinct_entropy, keys, run_config, syn_medium_runs, take, world_of

DOC = benchlib.REPO_ROOT / "docs" / "scan_snap.md"
FIGURE_NAMES = ("syn_small", "chi", "h", "b", "syn_medium")


# ----- Fig. 4: Syn-Small --------------------------------------------------------------------------

def syn_small(c, workdir: pathlib.Path) -> dict[str, Any]:
    world = world_of(c)
    problem = ss.as_problem(world)
    rates = np.asarray(c.rates, np.float32)
    _, rec = ss.sweep(problem, run_config(c), jnp.asarray(rates[:, 0]), jnp.asarray(rates[:, 1]),
                      keys(c.seed, len(rates)))
    c_traj = np.asarray(ss.class_trajectory(rec, problem)[0])  # [R, S, K, M]
    tokens = np.concatenate([world.common, world.distinct[0]])
    fig, axes = plots.figure(1, len(rates), panel_size=(4.2, 3.4))
    summary = {}
    for i, (eta_y, eta_z) in enumerate(rates):
        image = c_traj[i, :, 0, tokens]
        axes[i].imshow(image.T, aspect="auto", interpolation="nearest", cmap="viridis")
        axes[i].axvline(len(world.common) - 0.5, color="w", ls="--", lw=1)
        axes[i].set_yticks([0, image.shape[1] - 1], ["0", str(int(rec.steps[i, -1]))])
        axes[i].set_xlabel("token (common | distinct of class 0)")
        axes[i].set_ylabel("iteration")
        axes[i].set_title(f"c_0 over training, eta_Y={eta_y:g}, eta_Z={eta_z:g}", fontsize=9)
        distinct_end = c_traj[i, -1, 0, world.distinct[0]]
        summary[f"eta_y={eta_y:g},eta_z={eta_z:g}"] = {
            "common_mass_start": float(c_traj[i, 0, 0, world.common].sum()),
            "common_mass_end": float(c_traj[i, -1, 0, world.common].sum()),
            "distinct_top_over_bottom_start": float(world.probs[0, world.distinct[0, -1]]
                                                    / world.probs[0, world.distinct[0, 0]]),
            "distinct_top_over_bottom_end": float(distinct_end[-1] / distinct_end[0]),
            "final_loss": max(0.0, float(rec.loss[i, -1])),
        }
    plots.save(fig, workdir / "scan_snap_syn_small.png", dpi=90)
    rows = [[k, v["common_mass_start"], v["common_mass_end"], v["distinct_top_over_bottom_start"],
             v["distinct_top_over_bottom_end"], v["final_loss"]] for k, v in summary.items()]
    body = benchlib.markdown_table(["rates", "common mass, start", "common mass, end",
                                    "top / bottom distinct, start", "top / bottom distinct, end", "final loss"], rows)
    return {"summary": summary, "body": body}


# ----- Fig. 3: chi_l(t) ---------------------------------------------------------------------------

def chi_figure(c, workdir: pathlib.Path) -> dict[str, Any]:
    world = world_of(c)
    problem = ss.as_problem(world)
    eta_y = np.asarray(c.eta_y, np.float32)
    _, rec = ss.sweep(problem, run_config(c), jnp.asarray(eta_y), jnp.full(len(eta_y), c.eta_z),
                      keys(c.seed, len(eta_y)))
    fig, axes = plots.figure(1, 2, panel_size=(4.6, 3.4))
    l0, ref = world.distinct[0, -1], world.distinct[0, 0]
    summary = {}
    for i, ey in enumerate(eta_y):
        one = take(rec, i)
        _, f = ss.class_trajectory(one, problem)
        t = np.asarray(one.steps)
        chi = np.asarray(ss.chi(one.z_query[:, 0]))  # [S, M]
        b = np.asarray(one.b[:, 0])
        f0 = float(f[0, 0, l0])
        (line,) = axes[0].plot(t[1:], chi[1:, l0] - 1, label=f"eta_Y={ey:g}")
        axes[0].fill_between(t[1:], np.expm1(2 * f0**2 * b[1:]), np.expm1(2 * b[1:]), color=line.get_color(),
                             alpha=0.12, lw=0)
        r = np.stack([np.asarray(ss.relative_gain(f[:, 0], tok, ref)) for tok in world.distinct[0, 1:]], -1)
        pred = r[0] * chi[:, world.distinct[0, 1:]]
        if i == 0:
            for j in (0, r.shape[1] // 2, r.shape[1] - 1):
                axes[1].plot(t, r[:, j] / r[0, j], color=f"C{j % 10}", label=f"token {world.distinct[0, 1 + j]}")
                axes[1].plot(t, pred[:, j] / r[0, j], "k:", lw=1)
        inside = (chi[:, l0] >= np.exp(2 * f0**2 * b) * (1 - 1e-4)) & (chi[:, l0] <= np.exp(2 * b) * (1 + 1e-4))
        summary[f"eta_y={ey:g}"] = {"chi_l0_end": float(chi[-1, l0]), "b_end": float(b[-1]),
                                    "bounds_hold_fraction": float(inside.mean()),
                                    "relative_gain_max_rel_error": float(np.abs(r - pred).max() / np.abs(r).max()),
                                    "xi_spread_max": float(np.asarray(one.xi_spread[1:, 0]).max())}
    axes[0].set_xlabel("step t")
    axes[0].set_ylabel("chi_l0(t) - 1")
    axes[0].set_yscale("log")
    axes[0].set_title(f"dominant token: chi - 1 (line) and the band [e^(2 f^2(0) B), e^(2B)] - 1\n"
                      f"K={world.num_classes}, M={world.num_tokens}, eta_Z={c.eta_z:g}", fontsize=8)
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("step t")
    axes[1].set_ylabel("r_{l/l'|n}(t) / r(0)")
    axes[1].set_title(f"r(t) / r(0) (solid) vs chi_l(t) (dotted), eta_Y={eta_y[0]:g}", fontsize=9)
    axes[1].legend(fontsize=7)
    plots.save(fig, workdir / "scan_snap_chi.png", dpi=90)
    rows = [[k, v["chi_l0_end"], v["b_end"], v["bounds_hold_fraction"], v["relative_gain_max_rel_error"],
             v["xi_spread_max"]] for k, v in summary.items()]
    body = ("Class 0, l0 its most probable distinct token. The band needs Theorem 2's shared rate; the last column "
            "is its largest relative spread over the run (0 when exact).\n\n"
            + benchlib.markdown_table(["eta_Y", "chi_l0 at the end", "B_n at the end", "saves inside the bounds",
                                       "max rel. error of r = r(0) chi", "spread of dz/f^2"], rows))
    return {"summary": summary, "body": body}


# ----- Fig. 8: h vs h* ----------------------------------------------------------------------------

def h_figure(c, workdir: pathlib.Path) -> dict[str, Any]:
    fig, axes = plots.figure(1, len(c.num_tokens) + 1, panel_size=(3.6, 3.0))
    s = np.arange(c.steps + 1)
    summary = {}
    for ax, m in zip(axes, c.num_tokens):
        for ey in c.eta_y:
            hs, hc = ss.h_recursion(c.steps, ey, m), ss.h_continuous(s, ey, m)
            (line,) = ax.plot(s, hs, label=f"h*, eta_Y={ey:g}")
            ax.plot(s, hc, ":", color="k", lw=1)
            summary[f"M={m},eta_y={ey:g}"] = {"max_gap_over_2eta_over_m": float((hs - hc).max() / (2 * ey / m)),
                                             "min_gap": float((hs - hc).min())}
        ax.set_xscale("log")
        ax.set_xlabel("step s")
        ax.set_title(f"M={m}: h*(s) (solid), h(t) of Lemma 6 (dotted)", fontsize=8)
        ax.legend(fontsize=6)
    world = synthetic.seq_world(1, c.next_per_query, num_common=0, distinct_per_next=c.distinct_per_next)
    problem = ss.as_problem(world)
    k, m = world.probs.shape
    run = ss.check_run(ss.RunConfig(steps=c.simulate_steps * k, mode="one_class", record_every=k, record_y=True))
    errors = []
    for ey in c.eta_y:
        _, rec = ss.run_one(problem, run, ey, 1.0, jax.random.key(c.seed))
        _, f = ss.class_trajectory(rec, problem)
        sim = np.asarray(jnp.einsum("sij,si->sj", rec.y, f[:, 0]))[:, world.next_token[0]] / (m - 1)
        hs = ss.h_recursion(c.simulate_steps, ey, m)
        errors.append(float(np.abs(sim - hs).max()))
        axes[-1].plot(np.arange(len(sim)), sim, "o", ms=3, label=f"simulated, eta_Y={ey:g}")
        axes[-1].plot(np.arange(len(hs)), hs, "k-", lw=0.8)
    axes[-1].set_xlabel("visits s of class 0")
    axes[-1].set_title(f"decoder (Y^T f_0)_n / (M-1) vs h*(s), M={m}", fontsize=8)
    axes[-1].legend(fontsize=6)
    plots.save(fig, workdir / "scan_snap_h.png", dpi=90)
    worst = max(v["max_gap_over_2eta_over_m"] for v in summary.values())
    body = (f"Largest gap h*(s) - h(s) over the panels, in units of the bound 2 eta_Y / M: {worst:.4g} "
            f"(smallest gap {min(v['min_gap'] for v in summary.values()):.3g}); simulated decoder against "
            f"h*(s), largest absolute difference: {max(errors):.3g}.")
    return {"summary": summary | {"simulated_max_abs_error": max(errors)}, "body": body}


# ----- Fig. 9 and Theorem 4 -----------------------------------------------------------------------

def b_figure(c, workdir: pathlib.Path) -> dict[str, Any]:
    world = world_of(c)
    problem = ss.as_problem(world)
    k, m = world.probs.shape
    run = run_config(c)
    eta_z = np.asarray(c.eta_z, np.float32)
    fig, axes = plots.figure(1, len(c.ratios) + 1, panel_size=(4.0, 3.2))
    summary: dict[str, Any] = {"curves": {}}
    for ax, ratio in zip(axes, c.ratios):
        _, rec = ss.sweep(problem, run, jnp.asarray(ratio * eta_z), jnp.asarray(eta_z), keys(c.seed, len(eta_z)))
        t = np.asarray(rec.steps[0], np.float64)
        for i, ez in enumerate(eta_z):
            b = np.asarray(rec.b[i, :, 0])
            closed = ss.b_closed_form(t, ratio * ez, ez, k, m, 1.0)
            (line,) = ax.plot(t[1:], b[1:], label=f"eta_Z={ez:g}")
            ax.plot(t[1:], closed[1:], "--", color=line.get_color(), lw=0.8)
            summary["curves"][f"ratio={ratio:g},eta_z={ez:g}"] = {"b_end": float(b[-1]),
                                                                  "closed_form_end": float(closed[-1])}
        ax.set_xscale("log")
        ax.set_xlabel("step t")
        ax.set_ylabel("B_n(t)")
        ax.set_title(f"eta_Y / eta_Z = {ratio:g}: simulated (solid), Theorem 4 (dashed, C0 = 1)", fontsize=8)
        ax.legend(fontsize=6)
    # The error table: eta_Z / eta_Y -> 0 at eta_Y = 1 in population mode, and finite T.
    small = np.asarray(c.small_ratios, np.float32)
    _, rec = ss.sweep(problem, run, jnp.ones(len(small)), jnp.asarray(small), keys(c.seed, len(small)))
    t = np.asarray(rec.steps[0], np.float64)
    rows = []
    for i, r in enumerate(small):
        b = np.asarray(rec.b[i, :, 0])
        closed = ss.b_closed_form(t, 1.0, float(r), k, m, 1.0)
        implied_c0 = 2 * r * k * (m - 1) ** 2 * ss.h_continuous(t[-1] / k, 1.0, m) ** 2 / np.expm1(4 * b[-1])
        spread = float(np.asarray(rec.xi_spread[i, 1:]).max())
        rows.append([f"{r:g}", "inf", float(b[-1]), float(closed[-1]), float(closed[-1] / b[-1]), float(implied_c0),
                     spread])
        axes[-1].plot(t[1:], b[1:] / r, label=f"eta_Z/eta_Y={r:g}")
    axes[-1].set_xscale("log")
    axes[-1].set_xlabel("step t")
    axes[-1].set_ylabel("B_n(t) / (eta_Z / eta_Y)")
    axes[-1].set_title("eta_Z / eta_Y -> 0 (eta_Y = 1)", fontsize=8)
    axes[-1].legend(fontsize=6)
    population_b = {f"{r:g}": row[2] for r, row in zip(small, rows)}
    finite = ss.RunConfig(**(run._asdict() | {"mode": "sampled", "momentum": 0.0}))
    r0 = float(small[0])
    for seq_len in c.seq_lens:
        _, one = ss.run_one(problem, finite._replace(seq_len=seq_len), 1.0, r0, jax.random.key(c.seed))
        b_end = float(one.b[-1, 0])
        closed = float(ss.b_closed_form(t[-1], 1.0, r0, k, m, 1.0))
        rows.append([f"{r0:g}", str(seq_len), b_end, closed, closed / b_end, float("nan"),
                     float(abs(b_end - population_b[f"{r0:g}"]) / population_b[f"{r0:g}"])])
    plots.save(fig, workdir / "scan_snap_b.png", dpi=90)
    summary["table"] = rows
    body = (f"K = {k}, M = {m}, eta_Y = 1, B_n at t = {int(t[-1])} (class 0). Last column: population rows, the "
            "largest relative spread of dz_ml / f_nl^2 over n's distinct tokens (Theorem 2's shared rate, 0 when "
            "exact); finite-T rows, |B(T) - B(inf)| / B(inf).\n\n"
            + benchlib.markdown_table(["eta_Z / eta_Y", "T", "B_n simulated", "Theorem 4 (C0 = 1)",
                                       "closed / simulated", "C0 that would match", "spread or finite-T gap"], rows))
    return {"summary": summary, "body": body}


# ----- Fig. 6: Syn-Medium -------------------------------------------------------------------------

def syn_medium(c, workdir: pathlib.Path) -> dict[str, Any]:
    problems, eta_y, eta_z, run_keys, labels = syn_medium_runs(c)
    start = time.perf_counter()
    _, rec = ss.sweep(problems, run_config(c), jnp.asarray(eta_y), jnp.asarray(eta_z), run_keys, stacked=True,
                      chunk_size=c.chunk_size)
    entropy = final_distinct_entropy(rec, problems)
    seconds = time.perf_counter() - start
    grid = entropy.reshape(len(c.num_queries), len(c.eta_z), len(c.ratios), c.num_seeds)
    fig, axes = plots.figure(1, len(c.num_queries), panel_size=(3.4, 3.0))
    for qi, q in enumerate(c.num_queries):
        for zi, ez in enumerate(c.eta_z):
            axes[qi].errorbar(c.ratios, grid[qi, zi].mean(-1), grid[qi, zi].std(-1), label=f"eta_Z={ez:g}",
                              capsize=2)
        axes[qi].axvline(1, color="k", ls="--", lw=0.5)
        axes[qi].set_xscale("log")
        axes[qi].set_xlabel("eta_Y / eta_Z")
        axes[qi].set_title(f"{q} queries / {q * c.next_per_query} next tokens", fontsize=9)
    axes[0].set_ylabel("entropy of c_n on distinct tokens")
    axes[0].legend(fontsize=7)
    plots.save(fig, workdir / "scan_snap_syn_medium.png", dpi=90)
    start_entropy = float(np.asarray(ss.distinct_entropy(
        ss.attention_mass(jnp.zeros_like(problems.probs[0]), problems.probs[0]), take(problems, 0)))[0])
    mean = grid.mean(-1)
    summary = {"runs": len(labels), "seconds_incl_compile": seconds, "uniform_attention_entropy": start_entropy,
               "entropy_mean": mean.tolist(), "entropy_std": grid.std(-1).tolist(),
               "eta_z_lowers_entropy_fraction": float(np.mean(mean[:, -1, :] < mean[:, 0, :])),
               "ratio_raises_entropy_fraction": float(np.mean(mean[:, :, -1] > mean[:, :, 0]))}
    header = ["queries", "eta_Z"] + [f"eta_Y/eta_Z={r:g}" for r in c.ratios]
    rows = [[q, f"{ez:g}"] + [f"{mean[qi, zi, ri]:.3f} ± {grid[qi, zi, ri].std():.3f}" for ri in range(len(c.ratios))]
            for qi, q in enumerate(c.num_queries) for zi, ez in enumerate(c.eta_z)]
    body = (f"{len(labels)} runs ({c.num_seeds} seeds per cell, {c.steps} SGD steps, batch {c.batch_size}, "
            f"T = {c.seq_len}) in one vmapped program: {seconds:.1f} s including compilation. Entropy (nats) of "
            f"c_n on the distinct tokens after training, mean ± std over seeds (the data's own: "
            f"{start_entropy:.3f}). Cells where the largest eta_Z gives lower entropy than the smallest: "
            f"{summary['eta_z_lowers_entropy_fraction']:.0%}; where the largest eta_Y / eta_Z gives higher entropy "
            f"than 1: {summary['ratio_raises_entropy_fraction']:.0%}.\n\n" + benchlib.markdown_table(header, rows))
    return {"summary": summary, "body": body}


RUNNERS = {"syn_small": syn_small, "chi": chi_figure, "h": h_figure, "b": b_figure, "syn_medium": syn_medium}


def run(config, workdir: str, log=print) -> dict[str, Any]:
    """Draws `config.figure` (or every figure for "all") into `workdir`; returns each figure's summary."""
    command = f"python -m experiments.scan_snap --config configs/scan_snap.py:{config.figure} --workdir runs/scan_snap"
    return benchlib.run_figures(config, workdir, RUNNERS, order=FIGURE_NAMES, prefix="scan_snap", doc=DOC,
                                command=command, log=log)


if __name__ == "__main__":
    cli.launch(run, "configs/scan_snap.py:all")
