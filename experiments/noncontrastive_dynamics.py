"""The eigenvalue dynamics of non-contrastive SSL (Tian, Chen, Ganguli, ICML 2021): figures and measured numbers.

  python -m experiments.noncontrastive_dynamics --config configs/noncontrastive_dynamics.py:all \\
      --workdir runs/nc_dynamics

Variants (configs/noncontrastive_dynamics.py): phase (the 1-D reduced dynamics, its stationary points and their
stability against simulation), basin (the collapse threshold p*_- over weight decay and augmentation variance),
collapse (no predictor / no stop-gradient: W -> 0, against the closed form), invariance (s_j = p_j^2 / alpha_p +
c_j e^{-2 eta t} along 1000 vmapped trajectories), byol (a linear BYOL network trained by SGD against the
eigenvalue ODE), alignment (the eigenspace alignment of W_p and F in that run), all (every one). Each writes
noncontrastive_NAME.png and metrics.json to the workdir; with `write_docs`, the figures go to
docs/figures/noncontrastive_*.png and the measured numbers into docs/noncontrastive.md.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchlib, cli
from lorank.analysis import plots
from lorank.dynamics import directpred as dp

DOC = benchlib.REPO_ROOT / "docs" / "noncontrastive.md"
FIGURE_NAMES = ("phase", "basin", "collapse", "invariance", "byol", "alignment")


def _np(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """`benchlib.markdown_table` with the norms' bars escaped, so that ||W|| does not split a cell."""
    esc = lambda v: v.replace("|", "\\|") if isinstance(v, str) else v  # noqa: E731
    return benchlib.markdown_table([esc(h) for h in header], [[esc(v) for v in row] for row in rows])


# ----- the 1-D reduced dynamics ------------------------------------------------------------------

def phase(c, workdir: pathlib.Path) -> dict[str, Any]:
    fig, axes = plots.figure(1, 3, panel_size=(4.3, 3.3))
    p = np.linspace(-0.05, 0.75, 400)
    rows = []
    for eta in c.etas:
        args = dp.reduced_args(tau=c.tau, eta=eta, sigma2=c.sigma2)
        (line,) = axes[0].plot(p, _np(dp.reduced_field(0.0, p, args)), lw=1.2, label=f"eta = {eta:g}")
        fp = dp.fixed_points(c.tau, eta, c.sigma2)
        points = [0.0] + ([float(fp.minus), float(fp.plus)] if fp.exists else [])
        for q in points:
            stable = float(dp.reduced_slope(q, args)) < 0
            axes[0].plot([q], [0.0], "o", ms=6, color=line.get_color(), mfc=line.get_color() if stable else "white")
        rows.append([eta, "yes" if fp.exists else "no", float(fp.minus), float(fp.plus),
                     float(dp.reduced_slope(0.0, args)),
                     float(dp.reduced_slope(fp.minus, args)) if fp.exists else float("nan"),
                     float(dp.reduced_slope(fp.plus, args)) if fp.exists else float("nan")])
    axes[0].axhline(0.0, color="k", lw=0.6)
    axes[0].set_xlabel("p")
    axes[0].set_ylabel("dp/dt = p^2 [tau - (1 + sigma^2) p] - eta p")
    axes[0].set_title(f"tau = {c.tau:g}, sigma^2 = {c.sigma2:g}: filled stable, open unstable", fontsize=8)
    axes[0].legend(fontsize=7)

    # trajectories around p*_- and p*_+, time in units of 1 / eta
    fp = dp.fixed_points(c.tau, c.traj_eta, c.sigma2)
    m, pl = float(fp.minus), float(fp.plus)
    starts = np.array([m * (1 + c.delta), m * (1 - c.delta), pl * (1 + c.delta), pl * (1 - c.delta), 2 * m, m / 2])
    expect = np.array([pl, 0.0, pl, pl, pl, 0.0])
    with jax.enable_x64(True):
        args = dp.reduced_args(tau=c.tau, eta=c.traj_eta, sigma2=c.sigma2)
        traj = dp.simulate_reduced(jnp.asarray(starts), args, c.horizon, num_saves=c.num_saves, time_unit_eta=True)
        ys, ts = _np(traj.ys), _np(traj.ts)
    final = ys[:, -1]
    agree = np.abs(final - expect) <= 1e-4 * pl
    for s0, y in zip(starts, ys):
        axes[1].plot(ts, y, lw=1.2, label=f"p(0) = {s0:.4f}")
    for q, name in ((m, "p*_-"), (pl, "p*_+")):
        axes[1].axhline(q, color="k", ls=":", lw=0.8)
        axes[1].text(ts[-1], q, name, fontsize=7, va="bottom", ha="right")
    axes[1].set_yscale("symlog", linthresh=1e-3)
    axes[1].set_xlabel("eta t")
    axes[1].set_ylabel("p(t)")
    axes[1].set_title(f"starts around the stationary points (eta = {c.traj_eta:g})", fontsize=8)
    axes[1].legend(fontsize=6)

    # p*_- against eta / tau for small eta
    approx = {}
    for sigma2 in c.small_sigma2s:
        etas = np.asarray(c.small_etas)
        ratio = dp.fixed_points(c.tau, etas, sigma2).minus / (etas / c.tau)
        approx[f"{sigma2:g}"] = (ratio - 1).tolist()
        axes[2].plot(etas, np.abs(ratio - 1), "o-", ms=3, label=f"sigma^2 = {sigma2:g}")
        axes[2].plot(etas, (1 + sigma2) * etas / c.tau**2, "k:", lw=0.7)
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("eta")
    axes[2].set_ylabel("|p*_- / (eta / tau) - 1|")
    axes[2].set_title("small-eta approximation (dotted: (1 + sigma^2) eta / tau^2)", fontsize=8)
    axes[2].legend(fontsize=7)
    plots.save(fig, workdir / "noncontrastive_phase.png", dpi=90)

    worst = max(max(abs(v) for v in vals) for vals in approx.values())
    small = [min(c.small_etas)]
    small_worst = max(abs(vals[0]) for vals in approx.values())
    body = (f"The 1-D reduced dynamics at tau = {c.tau:g}, sigma^2 = {c.sigma2:g}; existence needs "
            f"eta <= tau^2 / (4 (1 + sigma^2)) = {c.tau**2 / (4 * (1 + c.sigma2)):.4g}. Slopes d(dp/dt)/dp at each "
            "stationary point (negative: stable):\n\n"
            + _table(["eta", "p*_+- exist", "p*_-", "p*_+", "slope at 0", "slope at p*_-",
                                       "slope at p*_+"], rows)
            + f"\n\nSimulated (Tsit5, float64, {c.horizon:g} / eta) from p*_- (1 +- {c.delta:g}), "
            f"p*_+ (1 +- {c.delta:g}), 2 p*_- and p*_- / 2 at eta = {c.traj_eta:g}: {int(agree.sum())} of "
            f"{len(agree)} end at the predicted point (p*_+ above p*_-, 0 below), final values "
            f"{', '.join(f'{v:.6g}' for v in final)}.\n\n"
            f"p*_- against eta / tau: the largest relative gap over eta in {list(c.small_etas)} and sigma^2 in "
            f"{list(c.small_sigma2s)} is {worst:.3g}; at eta = {small[0]:g} it is {small_worst:.3g} "
            "(the next term of the expansion, (1 + sigma^2) eta / tau^2, is the dotted line).")
    return {"summary": {"table": rows, "simulated_agree_fraction": float(agree.mean()),
                        "final": final.tolist(), "approx_rel_error": approx,
                        "approx_rel_error_smallest_eta": small_worst}, "body": body}


def basin(c, workdir: pathlib.Path) -> dict[str, Any]:
    etas = np.geomspace(*c.eta_range, c.num_eta)
    sigma2s = np.linspace(*c.sigma2_range, c.num_sigma2)
    eta_g, sig_g = np.meshgrid(etas, sigma2s, indexing="ij")  # [E, S]
    fp = dp.fixed_points(c.tau, eta_g, sig_g)
    exists = fp.exists
    ratio = fp.minus / (eta_g / c.tau)

    # simulate p*_- (1 +- delta) on every grid point with a fixed point, one vmapped program
    e, s = eta_g[exists], sig_g[exists]
    m, pl = fp.minus[exists], fp.plus[exists]
    p0 = np.concatenate([m * (1 + c.delta), m * (1 - c.delta)])
    # and beyond the edge: a start at 1 (above every p*_+) collapses; all in one program
    beyond = ~exists
    nb = int(beyond.sum())
    with jax.enable_x64(True):
        args = dp.ReducedArgs(np.full(2 * e.size + nb, c.tau), np.concatenate([e, e, eta_g[beyond]]),
                              np.concatenate([s, s, sig_g[beyond]]))
        traj = dp.simulate_reduced(jnp.asarray(np.concatenate([p0, np.ones(nb)])), args, c.horizon, num_saves=2,
                                   time_unit_eta=True)
        final = _np(traj.ys[:, -1])
    up = np.abs(final[: e.size] - pl) <= 1e-3 * pl
    down = np.abs(final[e.size:2 * e.size]) <= 1e-3 * m
    beyond_collapse = np.abs(final[2 * e.size:]) <= 1e-3

    fig, axes = plots.figure(1, 3, panel_size=(4.3, 3.4))
    masked = np.ma.masked_invalid(np.log10(fp.minus))
    im = axes[0].pcolormesh(etas, sigma2s, masked.T, shading="auto", cmap="viridis")
    fig.colorbar(im, ax=axes[0], label="log10 p*_-")
    cs = axes[0].contour(etas, sigma2s, masked.T, levels=[-2.5, -2, -1.5, -1, -0.5], colors="w", linewidths=0.7)
    axes[0].clabel(cs, fontsize=6, fmt="%g")
    edge = c.tau**2 / (4 * (1 + sigma2s))
    for ax in axes[:2]:
        ax.fill_betweenx(sigma2s, edge, etas[-1], color="0.75", hatch="//", lw=0, zorder=0)
        ax.plot(edge, sigma2s, "k-", lw=1.0, label="tau^2 = 4 eta (1 + sigma^2)")
        ax.set_xscale("log")
        ax.set_xlabel("weight decay eta")
        ax.set_ylabel("augmentation variance sigma^2")
    axes[0].set_title(f"collapse threshold p*_- (tau = {c.tau:g});\ngray: no p*_+-, every start collapses", fontsize=8)
    axes[0].legend(fontsize=6, loc="upper left")
    im = axes[1].pcolormesh(etas, sigma2s, np.ma.masked_invalid(ratio).T, shading="auto", cmap="magma",
                            vmin=1.0, vmax=2.0)
    fig.colorbar(im, ax=axes[1], label="p*_- / (eta / tau)")
    axes[1].contour(etas, sigma2s, np.ma.masked_invalid(ratio).T, levels=[1 + c.approx_tol], colors="c",
                    linewidths=1.0)
    axes[1].set_title(f"small-eta approximation (cyan: {100 * c.approx_tol:g}% off)", fontsize=8)
    ok = np.zeros_like(eta_g, dtype=bool)
    ok[exists] = up & down
    ok[beyond] = beyond_collapse
    axes[2].pcolormesh(etas, sigma2s, ok.T.astype(float), shading="auto", cmap="RdYlGn", vmin=0, vmax=1)
    axes[2].plot(edge, sigma2s, "k-", lw=1.0)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("weight decay eta")
    axes[2].set_ylabel("augmentation variance sigma^2")
    axes[2].set_title(f"green: simulation agrees (p*_-(1 +- {c.delta:g}) -> p*_+ / 0;\npast the edge p = 1 -> 0)",
                      fontsize=7)
    plots.save(fig, workdir / "noncontrastive_basin.png", dpi=90)

    # a start that has not collapsed yet sits next to the edge, where the ghost of the saddle-node slows the flow
    edge_ratio = eta_g[beyond] / (c.tau**2 / (4 * (1 + sig_g[beyond])))
    slow = edge_ratio[~beyond_collapse]
    within = exists & (np.abs(ratio - 1) <= c.approx_tol)
    eta_within = {f"{sv:g}": float(etas[within[:, j]].max()) if within[:, j].any() else float("nan")
                  for j, sv in enumerate(sigma2s) if j in (0, len(sigma2s) // 2, len(sigma2s) - 1)}
    summary = {"grid": [int(c.num_eta), int(c.num_sigma2)], "points_with_fixed_point": int(exists.sum()),
               "above_to_p_plus_fraction": float(up.mean()), "below_to_zero_fraction": float(down.mean()),
               "beyond_edge_collapse_fraction": float(beyond_collapse.mean()) if beyond.any() else 1.0,
               "beyond_edge_not_collapsed_eta_over_edge_max": float(slow.max()) if slow.size else None,
               "approx_rel_error_at_smallest_eta": float(np.nanmax(np.abs(ratio[0] - 1))),
               "largest_eta_within_tol": eta_within}
    body = (f"Grid: {c.num_eta} weight decays in [{c.eta_range[0]:g}, {c.eta_range[1]:g}] (log) x {c.num_sigma2} "
            f"augmentation variances in [{c.sigma2_range[0]:g}, {c.sigma2_range[1]:g}], tau = {c.tau:g}; "
            f"{int(exists.sum())} points have p*_+-. Simulated from p*_- (1 + {c.delta:g}): "
            f"{100 * up.mean():.1f}% reach p*_+; from p*_- (1 - {c.delta:g}): {100 * down.mean():.1f}% collapse to 0; "
            f"past the edge, from p = 1: {100 * summary['beyond_edge_collapse_fraction']:.1f}% of "
            f"{int(beyond.sum())} collapse"
            + (f"; the {slow.size} not yet collapsed, all within eta / eta_edge <= {slow.max():.4f} of the edge, are "
               "still passing the slow ghost of the saddle-node the two fixed points leave where they merge"
               if slow.size else "")
            + f". At eta = {etas[0]:g}, p*_- is within "
            f"{100 * summary['approx_rel_error_at_smallest_eta']:.2f}% of eta / tau for every sigma^2; the largest eta "
            f"with eta / tau within {100 * c.approx_tol:g}% of p*_-, by sigma^2: "
            + ", ".join(f"{k}: {v:.3g}" for k, v in eta_within.items()) + ".")
    return {"summary": summary, "body": body}


# ----- collapse without predictor / stop-gradient ------------------------------------------------

def collapse(c, workdir: pathlib.Path) -> dict[str, Any]:
    rng = np.random.default_rng(c.seed)
    a = rng.normal(size=(c.d_in, c.d_in))
    x = a @ a.T / c.d_in + 0.1 * np.eye(c.d_in)
    b = rng.normal(size=(c.d_in, c.aug_rank))
    xp = b @ b.T / c.d_in  # singular: weight decay alone kills its null space
    w0 = rng.normal(size=(c.num_starts, c.d_out, c.d_in)) / np.sqrt(c.d_in)
    w_p = c.predictor_scale * rng.normal(size=(c.d_out, c.d_out))
    runs = {"no predictor (stop-grad, W_a = W)": ("no_predictor", None),
            "no stop-gradient, W_p = I": ("no_stop_gradient", None),
            "no stop-gradient, fixed random W_p": ("no_stop_gradient", w_p)}
    fig, axes = plots.figure(1, 2, panel_size=(4.6, 3.4))
    rows, summary = [], {}
    with jax.enable_x64(True):
        for i, (name, (variant, pred)) in enumerate(runs.items()):
            args = dp.collapse_args(x, xp, d_out=c.d_out, variant=variant, w_p=pred, eta=c.eta)
            traj = dp.simulate_collapse(jnp.asarray(w0), args, c.horizon, num_saves=c.num_saves)
            closed = _np(jax.vmap(dp.collapse_closed_form, in_axes=(0, None, None))(jnp.asarray(w0), traj.ts, args))
            ys, ts = _np(traj.ys), _np(traj.ts)
            h_eigs = np.linalg.eigvalsh(_np(dp.collapse_generator(args)))
            norms = np.linalg.norm(ys, axis=(-2, -1))
            ratio = norms / norms[:, :1]
            err = np.abs(ys - closed).max(axis=(0, 2, 3))
            color = f"C{i}"
            plots.plot_band(axes[0], ts, ratio, label=name, color=color, logy=True)
            axes[0].plot(ts, np.exp(-h_eigs[0] * ts), ":", color=color, lw=0.8)
            axes[1].plot(ts, err + 1e-18, color=color, label=name)
            summary[variant if pred is None else f"{variant}_random_predictor"] = {
                "h_min": float(h_eigs[0]), "h_max": float(h_eigs[-1]),
                "final_norm_ratio_max": float(ratio[:, -1].max()),
                "closed_form_max_abs_error": float(err.max()),
                "norm_increase_max": float(np.maximum(np.diff(norms, axis=1), 0).max()),
                "solver_steps_max": int(np.max(traj.num_steps))}
            rows.append([name, float(h_eigs[0]), float(h_eigs[-1]), float(ratio[:, -1].max()),
                         float(np.exp(-h_eigs[0] * c.horizon)), float(err.max())])
    axes[0].set_xlabel("t")
    axes[0].set_ylabel("||W(t)||_F / ||W(0)||_F")
    axes[0].set_title(f"{c.num_starts} random starts (band: min-max); dotted: exp(-lambda_min(H) t)", fontsize=8)
    axes[0].legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("t")
    axes[1].set_ylabel("max |W_ode - expm(-H t) W(0)|")
    axes[1].set_title("against the closed form (float64)", fontsize=8)
    plots.save(fig, workdir / "noncontrastive_collapse.png", dpi=90)
    worst = max(v["closed_form_max_abs_error"] for v in summary.values())
    body = (f"d_in = {c.d_in}, d_out = {c.d_out}, X = A A^T / d_in + 0.1 I, X' = B B^T / d_in of rank {c.aug_rank} "
            f"(singular), eta = {c.eta:g}, {c.num_starts} starts W(0) ~ N(0, 1/d_in) vmapped, Tsit5 at rtol 1e-8 in "
            f"float64 to t = {c.horizon:g}:\n\n"
            + _table(["variant", "lambda_min(H)", "lambda_max(H)", "max ||W(t1)|| / ||W(0)||",
                                       "exp(-lambda_min t1)", "max error vs expm"], rows)
            + f"\n\nEvery start decays to zero; the largest deviation from expm(-H t) vec W(0) is {worst:.2g}.")
    summary["closed_form_max_abs_error"] = worst
    summary["final_norm_ratio_max"] = max(v["final_norm_ratio_max"] for k, v in summary.items() if isinstance(v, dict))
    return {"summary": summary, "body": body}


# ----- the invariance ----------------------------------------------------------------------------

def invariance(c, workdir: pathlib.Path) -> dict[str, Any]:
    k1, k2, k3 = jax.random.split(jax.random.key(c.seed), 3)
    shape = (c.num_starts, c.dim)
    with jax.enable_x64(True):
        y0 = dp.EigenState(jax.random.uniform(k1, shape, jnp.float64, *c.p_range),
                           jax.random.uniform(k2, shape, jnp.float64, *c.s_range),
                           jax.random.uniform(k3, shape, jnp.float64, *c.tau_range))
        args = dp.eigen_args(alpha_p=c.alpha_p, eta=c.eta, sigma2=c.sigma2, beta=c.beta)
        traj = dp.simulate_eigen(y0, args, c.horizon, num_saves=c.num_saves, rtol=c.rtol, atol=c.atol)
        res = _np(dp.invariant_residual(traj.ts, traj.ys, args))
        p, s, tau = (_np(v) for v in traj.ys)
        ts = _np(traj.ts)
        cst = _np(dp.invariant_constant(y0.p, y0.s, c.alpha_p))
        steps = int(np.asarray(traj.num_steps).max())
    fig, axes = plots.figure(1, 3, panel_size=(4.2, 3.3))
    axes[0].plot(ts, res.max(axis=(0, 2)) + 1e-20, label="max over starts")
    axes[0].plot(ts, np.median(res, axis=(0, 2)) + 1e-20, label="median")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("t")
    axes[0].set_ylabel("|s - p^2 / alpha_p - c e^{-2 eta t}|")
    axes[0].set_title(f"{c.num_starts} x {c.dim} directions, one vmapped solve", fontsize=8)
    axes[0].legend(fontsize=7)
    grid = np.linspace(min(c.p_range[0], p.min()), max(c.p_range[1], p.max()), 200)
    for i in range(min(40, c.num_starts)):
        axes[1].plot(p[i, :, 0], s[i, :, 0], lw=0.7, alpha=0.7)
    axes[1].plot(grid, grid**2 / c.alpha_p, "k--", lw=1.2, label="s = p^2 / alpha_p")
    axes[1].set_xlabel("p_j")
    axes[1].set_ylabel("s_j")
    axes[1].set_title("trajectories approach the parabola", fontsize=8)
    axes[1].legend(fontsize=7)
    gap = s - p**2 / c.alpha_p
    for i in range(6):
        (line,) = axes[2].plot(ts, gap[i, :, 0], lw=1.0)
        axes[2].plot(ts, cst[i, 0] * np.exp(-2 * c.eta * ts), "o", ms=2.5, color=line.get_color())
    axes[2].set_xlabel("t")
    axes[2].set_ylabel("s_j - p_j^2 / alpha_p")
    axes[2].set_title("lines: simulated; dots: c_j e^{-2 eta t}", fontsize=8)
    plots.save(fig, workdir / "noncontrastive_invariance.png", dpi=90)
    collapsed = float(np.mean(np.abs(p[:, -1]) < 1e-2))
    summary = {"residual_max": float(res.max()), "residual_median": float(np.median(res)),
               "s_change_max": float(np.abs(s[:, -1] - s[:, 0]).max()), "solver_steps_max": steps,
               "collapsed_fraction": collapsed, "tau_final_range": [float(tau[:, -1].min()), float(tau[:, -1].max())]}
    body = (f"{c.num_starts} starts x {c.dim} directions, p_j(0) ~ U{tuple(c.p_range)}, s_j(0) ~ U{tuple(c.s_range)}, "
            f"tau_j(0) ~ U{tuple(c.tau_range)}; alpha_p = {c.alpha_p:g}, eta = {c.eta:g}, sigma^2 = {c.sigma2:g}, "
            f"BYOL's EMA target with beta = {c.beta:g}; one jitted, vmapped Tsit5 solve at rtol {c.rtol:g}, atol "
            f"{c.atol:g} (float64) to t = {c.horizon:g}. Largest |s_j - p_j^2 / alpha_p - c_j e^{{-2 eta t}}| over "
            f"every start, direction and save: {summary['residual_max']:.2g} (median "
            f"{summary['residual_median']:.2g}), while "
            f"s_j moved by up to {summary['s_change_max']:.3g}; {100 * collapsed:.1f}% of the directions end with "
            "|p_j| < 0.01 (collapsed).")
    return {"summary": summary, "body": body}


# ----- linear BYOL against the ODE ---------------------------------------------------------------

def _train(c):
    k1, k2, k3 = jax.random.split(jax.random.key(c.seed), 3)
    scale = c.init_scale / np.sqrt(c.dim)
    w = scale * jax.random.normal(k1, (c.dim, c.dim))
    y0 = dp.ByolState(w, scale * jax.random.normal(k2, (c.dim, c.dim)), w)
    run = dp.byol_run(lr=c.lr, steps=c.steps, batch=c.batch, alpha_p=c.alpha_p, eta=c.eta, sigma2=c.sigma2,
                      beta=c.beta, record_every=c.record_every)
    _, saved = dp.train_linear_byol(y0, run, k3)
    ts = np.arange(c.steps // c.record_every + 1) * c.record_every * c.lr
    return saved, ts


def _compare(c):
    saved, ts = _train(c)
    eig, align = dp.measured_eigen(saved)
    amp, _ = dp.measured_amplitudes(saved)
    align = _np(align)
    below = np.flatnonzero(align < c.align_threshold)
    if below.size == 0:
        raise ValueError(f"the alignment never fell below align_threshold={c.align_threshold} "
                         f"(min {align.min():.3g}); raise steps or the threshold")
    i0 = int(below[0])
    with jax.enable_x64(True):
        start = dp.AmplitudeState(*(jnp.asarray(_np(v[i0]))[None] for v in amp))
        args = dp.eigen_args(alpha_p=c.alpha_p, eta=c.eta, sigma2=c.sigma2, beta=c.beta)
        ode = dp.simulate_amplitudes(start, args, float(ts[-1] - ts[i0]), num_saves=len(ts) - i0)
        op, ow, oa = (_np(v[0]) for v in ode.ys)
    os_ = ow**2
    ot = np.where(os_ > 1e-9 * os_.max(axis=1, keepdims=True), oa / np.where(ow == 0, 1.0, ow), np.nan)
    ms, mp, mt = _np(eig.s), _np(eig.p), _np(eig.tau)
    # both sorted by s at every save (measured_eigen's order)
    order = np.argsort(os_, axis=1)
    os_, op, ot = (np.take_along_axis(v, order, 1) for v in (os_, op, ot))
    ms_t, mp_t = ms[i0:], mp[i0:]
    live = ms[-1] >= c.live_fraction * ms[-1].max()
    s_err = np.abs(os_ - ms_t).max(axis=1) / ms_t.max(axis=1)
    p_err = (np.abs(op - mp_t)[:, live] / np.abs(mp_t[:, live])).max(axis=1)
    s_rel = (np.abs(os_ - ms_t)[:, live] / ms_t[:, live]).max(axis=1)
    return dict(ts=ts, i0=i0, align=align, saved=saved, ms=ms, mp=mp, mt=mt, os=os_, op=op, ot=ot, live=live,
                s_err=s_err, p_err=p_err, s_rel=s_rel)


def byol(c, workdir: pathlib.Path) -> dict[str, Any]:
    r = _compare(c)
    ts, i0 = r["ts"], r["i0"]
    t_ode = ts[i0:]
    fig, axes = plots.figure(1, 4, panel_size=(3.9, 3.2))
    # tau_j of a collapsed direction is a ratio of vanishing amplitudes: drawn only where s_j >= 1e-3 max s
    mt = np.where(r["ms"] >= 1e-3 * r["ms"].max(axis=1, keepdims=True), r["mt"], np.nan)
    ot = np.where(r["os"] >= 1e-3 * r["os"].max(axis=1, keepdims=True), r["ot"], np.nan)
    for j in range(c.dim):
        color = f"C{j % 10}"
        for ax, meas, ode in ((axes[0], r["ms"], r["os"]), (axes[1], r["mp"], r["op"]), (axes[2], mt, ot)):
            ax.plot(ts, meas[:, j], color=color, lw=1.0)
            ax.plot(t_ode, ode[:, j], "--", color="k", lw=0.8)
    fp = dp.fixed_points(1.0, c.eta, c.sigma2)
    for ax, name, star in ((axes[0], "s_j (eigenvalues of F = W W^T)", float(fp.plus) ** 2 / c.alpha_p),
                           (axes[1], "p_j = u_j^T W_p u_j", float(fp.plus)), (axes[2], "tau_j", 1.0)):
        ax.axvline(ts[i0], color="0.5", ls=":", lw=0.8)
        ax.axhline(star, color="0.5", ls="-.", lw=0.6)
        ax.set_xlabel("t = step x lr")
        ax.set_title(f"{name}\ncolors: SGD; dashed: ODE from t0", fontsize=8)
    axes[2].set_ylim(0.0, 2.0)
    axes[3].plot(t_ode, r["s_err"], label="max_j |s_ode - s| / max_j s")
    axes[3].plot(t_ode, r["p_err"], label="max_live |p_ode - p| / |p|")
    axes[3].plot(t_ode, r["s_rel"], label="max_live |s_ode - s| / s")
    axes[3].set_yscale("log")
    axes[3].set_xlabel("t")
    axes[3].set_title("ODE vs SGD", fontsize=8)
    axes[3].legend(fontsize=6)
    plots.save(fig, workdir / "noncontrastive_byol.png", dpi=90)
    live = r["live"]
    summary = {"t0": float(ts[i0]), "alignment_at_t0": float(r["align"][i0]), "live_directions": int(live.sum()),
               "s_error_over_top_max": float(r["s_err"].max()), "p_rel_error_live_max": float(r["p_err"].max()),
               "s_rel_error_live_max": float(r["s_rel"].max()),
               "final_s": r["ms"][-1].tolist(), "final_p": r["mp"][-1].tolist(),
               "p_plus": float(fp.plus), "s_plus": float(fp.plus) ** 2 / c.alpha_p,
               "final_p_live_rel_error_to_p_plus": float(np.abs(r["mp"][-1][live] / float(fp.plus) - 1).max()),
               "collapsed_s_over_top_end": (float(r["ms"][-1][~live].max() / r["ms"][-1].max())
                                            if (~live).any() else 0.0)}
    body = (f"Linear BYOL, d_in = d_out = {c.dim}, W(0), W_p(0) ~ N(0, {c.init_scale:g}^2 / {c.dim}), W_a(0) = W(0); "
            f"x ~ N(0, I), views x + N(0, {c.sigma2:g} I); SGD with lr {c.lr:g} for {c.steps} steps (t = "
            f"{c.steps * c.lr:g}), {c.batch} fresh samples per step, alpha_p = {c.alpha_p:g}, weight decay "
            f"{c.eta:g}, EMA rate beta = {c.beta:g} (momentum {1 - c.lr * c.beta:g}); the symmetrized loss, gradients "
            f"by jax.grad in one lax.scan. The ODE (`amplitude_field`, the eigenvalue dynamics in (p, w, a)) starts at "
            f"the first save with commutator alignment below {c.align_threshold:g}: t0 = {summary['t0']:g} "
            f"(alignment {summary['alignment_at_t0']:.3g}), from the measured p_j, s_j, tau_j.\n\n"
            + _table(
                ["quantity (t >= t0)", "max relative error"],
                [["s_j, all directions, relative to max_j s_j", summary["s_error_over_top_max"]],
                 [f"s_j, the {int(live.sum())} non-collapsed directions, relative to s_j",
                  summary["s_rel_error_live_max"]],
                 [f"p_j, the {int(live.sum())} non-collapsed directions, relative to |p_j|",
                  summary["p_rel_error_live_max"]]])
            + f"\n\nAt the end, {int(live.sum())} of {c.dim} directions sit at p_j = "
            f"{', '.join(f'{v:.4f}' for v in np.asarray(summary['final_p'])[live])} (theory p*_+ = {fp.plus:.4f}, "
            f"s*_+ = p*_+^2 / alpha_p = {summary['s_plus']:.4f}; measured s_j "
            f"{', '.join(f'{v:.4f}' for v in np.asarray(summary['final_s'])[live])}); the other "
            f"{c.dim - int(live.sum())} collapsed (s_j / max s = {summary['collapsed_s_over_top_end']:.2g}).")
    return {"summary": summary, "body": body}


def alignment(c, workdir: pathlib.Path) -> dict[str, Any]:
    saved, ts = _train(c)
    w, w_p = _np(saved.w), _np(saved.w_p)
    f = w @ np.swapaxes(w, 1, 2)
    align = _np(dp.commutator_alignment(jnp.asarray(f), jnp.asarray(w_p)))
    balance = np.swapaxes(w_p, 1, 2) @ w_p / c.alpha_p - f
    bal_norm = np.linalg.norm(balance, axis=(1, 2))
    asym = np.linalg.norm(w_p - np.swapaxes(w_p, 1, 2), axis=(1, 2)) / np.linalg.norm(w_p, axis=(1, 2))
    fig, axes = plots.figure(1, 2, panel_size=(4.6, 3.4))
    axes[0].plot(ts, align, label="||F W_p - W_p F||_F / (||F||_F ||W_p||_F)")
    axes[0].plot(ts, asym, label="||W_p - W_p^T||_F / ||W_p||_F")
    axes[0].axhline(c.align_threshold, color="0.5", ls=":", lw=0.8, label=f"ODE start threshold {c.align_threshold:g}")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("t = step x lr")
    axes[0].set_title("eigenspace alignment over training", fontsize=8)
    axes[0].legend(fontsize=6)
    axes[1].plot(ts, bal_norm, label="||W_p^T W_p / alpha_p - W W^T||_F")
    axes[1].plot(ts, bal_norm[0] * np.exp(-2 * c.eta * ts), "k--", lw=0.8, label="initial x e^{-2 eta t} (flow)")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("t")
    axes[1].set_title("weight decay balances predictor and online net", fontsize=8)
    axes[1].legend(fontsize=6)
    plots.save(fig, workdir / "noncontrastive_alignment.png", dpi=90)
    # the balance is a matrix identity of the flow: compare the whole matrix, not only its norm
    pred = balance[0] * np.exp(-2 * c.eta * ts)[:, None, None]
    bal_err = np.linalg.norm(balance - pred, axis=(1, 2)) / np.linalg.norm(balance[0])
    checkpoints = [0, len(ts) // 4, len(ts) // 2, len(ts) - 1]
    rows = [[float(ts[i]), float(align[i]), float(asym[i]), float(bal_norm[i]), float(bal_err[i])] for i in checkpoints]
    summary = {"alignment_start": float(align[0]), "alignment_end": float(align[-1]),
               "alignment_min": float(align.min()), "asymmetry_end": float(asym[-1]),
               "balance_rel_deviation_max": float(bal_err.max())}
    body = ("The run of the previous figure. Commutator alignment ||F W_p - W_p F||_F / (||F||_F ||W_p||_F) with "
            "F = W W^T, the asymmetry of W_p, and the balance B = W_p^T W_p / alpha_p - W W^T, which the gradient flow "
            "carries as B(t) = e^{-2 eta t} B(0) (for any target):\n\n"
            + _table(["t", "alignment", "||W_p - W_p^T|| / ||W_p||", "||B||_F",
                                       "||B(t) - e^{-2 eta t} B(0)|| / ||B(0)||"], rows)
            + f"\n\nThe alignment falls from {summary['alignment_start']:.3g} to {summary['alignment_end']:.2g}; the "
            f"balance follows e^{{-2 eta t}} B(0) to within {100 * summary['balance_rel_deviation_max']:.2g}% of "
            "||B(0)|| under SGD.")
    return {"summary": summary, "body": body}


RUNNERS = {"phase": phase, "basin": basin, "collapse": collapse, "invariance": invariance, "byol": byol,
           "alignment": alignment}


def run(config, workdir: str, log=print) -> dict[str, Any]:
    """Draws `config.figure` (or every figure for "all") into `workdir`; returns each figure's summary."""
    command = (f"python -m experiments.noncontrastive_dynamics --config configs/noncontrastive_dynamics.py:"
               f"{config.figure} --workdir runs/nc_dynamics")
    return benchlib.run_figures(config, workdir, RUNNERS, order=FIGURE_NAMES, prefix="noncontrastive", doc=DOC,
                                command=command, log=log)


if __name__ == "__main__":
    cli.launch(run, "configs/noncontrastive_dynamics.py:all")
