"""The figures of JoMA (Tian, Wang, Zhang, Chen, Du, ICLR 2024): Theorem 1 along real training, the ODEs of
Theorems 2-4 and of K > 1 nodes, and the hierarchical latent tree of Theorem 5.

  python -m experiments.joma --config configs/joma.py:all --workdir runs/joma

Variants (configs/joma.py): invariants (Theorem 1 on the paper's toy, Fig. 2-3, and its exact forms), linear
(Theorem 2), nonlinear (Theorems 3-4, Fig. 4), nodes (K > 1: the stable rank of V(t)), hierarchy (Theorem 5's
co-occurrence; the public code's composition tree), all (every one). Each writes its figure and metrics.json
to the workdir; with `write_docs`, the figures go to docs/figures/joma_*.png and the measured numbers into
docs/joma.md.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchlib, cli
from lorank.analysis import plots
from lorank.data import synthetic
from lorank.dynamics import joma

DOC = benchlib.REPO_ROOT / "docs" / "joma.md"
FIGURE_NAMES = ("invariants", "linear", "nonlinear", "nodes", "hierarchy")


def _np(a) -> np.ndarray:
    return np.asarray(a, np.float64)


# ----- Theorem 1 along real training (Fig. 2-3) ---------------------------------------------------

def _exact_forms(c) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Linear and exp attention on a smaller problem: SGD's discrete identity and the gradient flow's invariant."""
    x, labels = synthetic.joma_toy(c.exact_classes, c.exact_distinct, c.exact_common, seed=c.seed)
    data = joma.make_data(x, labels)
    m = x.shape[1]
    u = joma.embeddings(m, c.exact_d, jax.random.key(c.seed + 1))
    eta_z, eta_w = c.exact_rates
    ratio = joma.rate_ratio(eta_z, eta_w)
    out, curves = {}, {}
    for attention in ("exp", "linear"):
        model = joma.Model(attention, c.exact_temperature, "tanh", "linear")
        p0 = joma.init_params(jax.random.key(c.seed + 2), m, c.exact_d, c.exact_nodes, c.exact_classes, model,
                              c.exact_scale)
        _, rec = joma.train(p0, u, data, model, joma.RunConfig(c.exact_steps, record_every=c.exact_steps // 20),
                            eta_z, eta_w)
        lhs = _np(joma.theorem1_lhs(rec.z, model))
        residual = np.abs(_np(joma.discrete_residual(rec, model, ratio))).max(-1)
        naive = np.abs(_np(joma.predicted_z(rec.z[0], rec.v[0], rec.v, model, ratio).value) - lhs).max(-1)
        out[attention] = {"sgd_residual_max": float(residual.max()), "sgd_without_squares_max": float(naive.max()),
                          "sgd_change_max": float(np.abs(lhs - lhs[0]).max()), "flow_error_max": float("nan"),
                          "flow_change_max": float("nan"), "flow_solver_steps": 0}
        if attention in c.flow_attentions:
            traj = joma.flow(p0, u, data, model, c.flow_t1, 0.5, 0.5, num_saves=21, rtol=1e-7, atol=1e-9)
            v = joma.contextual_weights(traj.ys.w, u)
            flow_lhs = _np(joma.theorem1_lhs(traj.ys.z, model))
            flow_err = np.abs(_np(joma.predicted_z(traj.ys.z[0], v[0], v, model, 1.0).value) - flow_lhs).max(-1)
            out[attention].update(flow_error_max=float(flow_err.max()),
                                  flow_change_max=float(np.abs(flow_lhs - flow_lhs[0]).max()),
                                  flow_solver_steps=int(traj.num_steps))
        curves[attention] = (_np(rec.steps), residual, naive)
    return out, curves


def invariants(c, workdir: pathlib.Path) -> dict[str, Any]:
    x, labels = synthetic.joma_toy(c.num_classes, c.num_distinct, c.num_common, width=c.bump_width, seed=c.seed)
    data = joma.make_data(x, labels)
    m = x.shape[1]
    u = joma.embeddings(m, c.d)
    run = joma.RunConfig(c.steps, record_every=c.record_every)
    ratio = joma.rate_ratio(c.eta_z, c.eta_w)
    fig, axes = plots.figure(2, 3, panel_size=(4.2, 3.2))
    axes[0].imshow(x.T, aspect="auto", interpolation="nearest", cmap="viridis")
    axes[0].set_xlabel("class y (one sequence each)")
    axes[0].set_ylabel("contextual token l")
    axes[0].set_title("token frequencies x (the toy of Fig. 2)", fontsize=9)
    summary: dict[str, Any] = {}
    for i, temperature in enumerate(c.temperatures):
        model = joma.Model("softmax", float(temperature), "linear", "identity")
        p0 = joma.init_params(jax.random.key(c.seed), m, c.d, c.num_classes, c.num_classes, model, c.init_scale)
        _, rec = joma.train(p0, u, data, model, run, c.eta_z, c.eta_w)
        b0 = joma.mean_attention(rec.z[0], data, model)
        pred = joma.predicted_z(rec.z[0], rec.v[0], rec.v, model, ratio, b0)
        b_t = joma.mean_attention(rec.z, data, model)
        current = joma.predicted_z(rec.z[0], rec.v[0], rec.v, model, ratio, b_t, b0)
        integrated = pred.term1 + pred.c + pred.term2[0] + joma.integrated_term2(rec.v, b_t, model, ratio)
        # the public code's constants: ||W||_F^2 (query part and the never-moving rest included) and E[x]
        rest = float(jnp.sum(p0.w**2) - jnp.sum(rec.v[0] ** 2) - jnp.sum(rec.v_query[0] ** 2))
        fro_w = jnp.sum(rec.v**2, axis=(-2, -1)) + jnp.sum(rec.v_query**2, axis=-1) + rest
        x_bar = jnp.einsum("n,nm->m", data.weight, data.x)
        public = pred.term1 - ratio / (2 * temperature) * fro_w[:, None] * x_bar
        public = public + (rec.z[0] - public[0])
        exact2 = _np(joma.softmax_exact_term(rec, model, ratio))
        theorem2 = _np(pred.term2 - pred.term2[0])
        z, t = _np(rec.z), _np(rec.steps)
        corr = _np(joma.pearson(rec.z, pred.value))[1:]
        corr1 = _np(joma.pearson(rec.z, pred.term1))[1:]
        corr2 = _np(joma.pearson(rec.z, pred.term2))[1:]
        ranks = _np(joma.node_stable_rank(rec.v))
        summary[f"T={temperature:g}"] = {
            "corr_min": float(corr.min()), "corr_end": float(corr[-1]), "corr_term1_end": float(corr1[-1]),
            "corr_term2_end": float(corr2[-1]), "corr_term1_min": float(corr1.min()),
            "corr_integrated_min": float(_np(joma.pearson(rec.z, integrated))[1:].min()),
            "corr_current_b_bar_min": float(_np(joma.pearson(rec.z, current.value))[1:].min()),
            "corr_public_code_min": float(_np(joma.pearson(rec.z, public))[1:].min()),
            "z_change_max": float(np.abs(z[-1] - z[0]).max()),
            "z_hat_change_max": float(np.abs(_np(pred.value[-1] - pred.value[0])).max()),
            "term2_exact_abs_max": float(np.abs(exact2[-1]).max()),
            "term2_theorem_abs_max": float(np.abs(theorem2[-1]).max()),
            "term2_exact_vs_theorem_corr": float(np.corrcoef(exact2[-1], theorem2[-1])[0, 1]),
            "loss_start": float(rec.loss[0]),
            "loss_end": float(rec.loss[-1]), "stable_rank_start": float(ranks[0]), "stable_rank_end": float(ranks[-1]),
        }
        style = "-" if i == 0 else ":"
        axes[1].plot(t[1:], corr, "r" + style, label=f"NC(z, z_hat), T={temperature:g}")
        axes[1].plot(t[1:], corr1, "g" + style, lw=0.9, label=f"NC(z, term 1), T={temperature:g}")
        axes[1].plot(t[1:], corr2, "b" + style, lw=0.9, label=f"NC(z, term 2), T={temperature:g}")
        axes[4].plot(t, ranks, style, label=f"T={temperature:g}")
        if i == 0:
            axes[3].scatter(z[-1] - z[0], _np(pred.value[-1] - pred.value[0]), s=14, marker="o",
                            label="z_hat(T) - z_hat(0) against z(T) - z(0)")
            axes[3].scatter(exact2[-1], theorem2[-1], s=14, marker="s",
                            label="term 2 (b_bar) against the exact b b^T term")
        if i == 0:
            for tok in c.shown_tokens:
                (line,) = axes[2].plot(t, z[:, tok], label=f"token {tok}")
                axes[2].plot(t, _np(pred.value[:, tok]), "--", color=line.get_color(), lw=1)
    axes[1].axhline(0.99, color="k", ls="--", lw=0.5)
    axes[1].set_ylim(-1.05, 1.05)
    axes[1].set_xlabel("SGD step")
    axes[1].set_ylabel("Pearson correlation over tokens")
    axes[1].set_title("z(t) vs Theorem 1 (term 1: sum_k v_k^2/2T, term 2: -||V||^2 b_bar/2T)", fontsize=8)
    axes[1].legend(fontsize=6)
    axes[2].set_xlabel("SGD step")
    axes[2].set_ylabel("z_l(t)")
    axes[2].set_title(f"z_l(t) (solid) and z_hat_l(t) (dashed), T={c.temperatures[0]:g}", fontsize=9)
    axes[2].legend(fontsize=6)
    lo, hi = axes[3].get_xlim()
    axes[3].plot([lo, hi], [lo, hi], "k--", lw=0.6)
    axes[3].set_xlabel("measured (one point per token)")
    axes[3].set_ylabel("Theorem 1")
    axes[3].set_title(f"every token at the end, T={c.temperatures[0]:g}: correlated, not equal", fontsize=8)
    axes[3].legend(fontsize=6)
    axes[4].set_xlabel("SGD step")
    axes[4].set_ylabel("stable rank of V = U_C^T W")
    axes[4].set_title("the MLP's contextual weights become low rank", fontsize=9)
    axes[4].legend(fontsize=7)
    exact, curves = _exact_forms(c)
    for name, (ts, residual, naive) in curves.items():
        (line,) = axes[5].plot(ts[1:], np.maximum(residual[1:], 1e-12), label=f"{name}: with the per-step squares")
        axes[5].plot(ts[1:], naive[1:], "--", color=line.get_color(), label=f"{name}: without")
    axes[5].set_yscale("log")
    axes[5].set_xlabel("SGD step")
    axes[5].set_ylabel("max over tokens of |lhs - prediction|")
    axes[5].set_title(f"linear / exp attention under SGD, eta_z/eta_w = {exact_ratio(c):g}", fontsize=9)
    axes[5].legend(fontsize=6)
    plots.save(fig, workdir / "joma_invariants.png", dpi=90)
    summary["exact"] = exact
    rows = [[k, v["corr_min"], v["corr_end"], v["corr_term1_end"], v["corr_term2_end"], v["corr_integrated_min"],
             v["corr_current_b_bar_min"], v["corr_public_code_min"], v["z_change_max"], v["z_hat_change_max"],
             v["term2_exact_abs_max"], v["term2_theorem_abs_max"], v["term2_exact_vs_theorem_corr"],
             f"{v['loss_start']:.3f} -> {v['loss_end']:.3f}",
             f"{v['stable_rank_start']:.2f} -> {v['stable_rank_end']:.2f}"]
            for k, v in summary.items() if k.startswith("T=")]
    exact_rows = [[name, v["sgd_change_max"], v["sgd_residual_max"], v["sgd_without_squares_max"],
                   v["flow_change_max"], v["flow_error_max"], v["flow_solver_steps"]] for name, v in exact.items()]
    body = (f"The toy: {m} contextual tokens, {c.num_classes} classes and nodes, d = {c.d}, U = [I; 0], softmax "
            f"attention, SGD with eta_z = {c.eta_z:g}, eta_w = {c.eta_w:g} for {c.steps} full-batch steps from "
            f"N(0, {c.init_scale:g}^2). NC = Pearson correlation over tokens, over the saves after step 0; b_bar = "
            "E[b] at step 0 unless named.\n\n"
            + benchlib.markdown_table(["run", "min NC(z, z_hat)", "NC at the end", "NC(z, term 1), end",
                                       "NC(z, term 2), end", "min NC, b_bar(t) inside the integral",
                                       "min NC, b_bar(t) plugged in", "min NC, the public code's constants",
                                       "max abs z(T) - z(0)", "max abs z_hat(T) - z_hat(0)",
                                       "exact b b^T term: max abs", "term 2 (b_bar): max abs",
                                       "NC(term 2, exact term)", "loss", "stable rank of V"],
                                      rows)
            + f"\n\nExact forms on a smaller problem ({c.exact_classes} classes, {c.exact_nodes} tanh nodes, a trained "
            f"linear classifier, random orthonormal U, T = {c.exact_temperature:g}): SGD for {c.exact_steps} steps "
            f"with (eta_z, eta_w) = {tuple(c.exact_rates)} (the discrete identity of `joma.discrete_residual`), and "
            f"the gradient flow with equal rates to t = {c.flow_t1:g} (rtol 1e-7). lhs = z (exp) or z^2 (linear).\n\n"
            + benchlib.markdown_table(["attention", "SGD: max abs(lhs(t) - lhs(0))", "SGD: max residual",
                                       "SGD: gap without the per-step squares", "flow: max abs(lhs(t) - lhs(0))",
                                       "flow: max abs(lhs - prediction)", "flow: solver steps"], exact_rows))
    return {"summary": summary, "body": body}


def exact_ratio(c) -> float:
    return joma.rate_ratio(*c.exact_rates)


# ----- Theorem 2: linear activation ---------------------------------------------------------------

def linear(c, workdir: pathlib.Path) -> dict[str, Any]:
    rng = np.random.default_rng(c.seed)
    m = c.num_tokens
    delta = rng.normal(size=m) * c.delta_scale
    xbar = rng.uniform(*c.xbar_range, m)
    v0 = np.stack([rng.normal(size=m) * s for s in c.init_scales])
    args = joma.ode_args(delta, xbar, c.scale, True)
    traj = joma.simulate_linear(v0, args, c.t1, num_saves=c.num_saves, log_times=True)
    ts, v, tau = _np(traj.ts), _np(traj.ys[0]), _np(traj.ys[1])
    inv = _np(joma.linear_invariant(jnp.asarray(v), jnp.asarray(delta), c.scale))
    clock = 2.0 / np.sqrt(np.pi * c.scale) * (tau - tau[:, :1])
    resolved = np.abs(v) < 5.0 * np.sqrt(c.scale / 2.0)  # where float32 still resolves 1 - erf(v / sqrt(s))
    deviation = np.where(resolved, inv - inv[:, :1] - clock[..., None], 0.0)
    spread_ours = _token_spread(inv, resolved)
    # erf(v / 2) / Delta: conserved by dv/dt = Delta exp(v^2 / 4), not by the ODE integrated here
    spread_erf_half = _token_spread(_np(jax.scipy.special.erf(jnp.asarray(v) / 2.0)) / delta, resolved)
    entropy = _np(joma.attention_entropy(joma.ode_attention(jnp.asarray(v), args)))
    p_end = _np(joma.ode_attention(jnp.asarray(v[:, -1]), args))
    starts = {}
    for b, scale in enumerate(c.init_scales):
        star, limit, tau_star = joma.linear_limit(v0[b], delta, c.scale)
        others = np.arange(m) != star
        starts[f"init_scale={scale:g}"] = {
            "salient_token": star, "largest_abs_delta": int(np.argmax(np.abs(delta))),
            "salient_final_abs_v": float(abs(v[b, -1, star])),
            "others_max_abs_error_to_limit": float(np.abs(v[b, -1, others] - limit[others]).max()),
            "others_max_abs_final": float(np.abs(v[b, -1, others]).max()),
            "tau_end": float(tau[b, -1]), "tau_blowup": tau_star,
            "entropy_start": float(entropy[b, 0]), "entropy_end": float(entropy[b, -1]),
            "max_attention_end": float(p_end[b].max()),
            "invariant_max_deviation": float(np.abs(deviation[b]).max()), "clock_end": float(clock[b, -1]),
            "spread_erf_sqrt2": float(spread_ours[b]), "spread_erf_half": float(spread_erf_half[b])}
    fig, axes = plots.figure(1, 3, panel_size=(4.4, 3.3))
    star0 = starts[f"init_scale={c.init_scales[0]:g}"]["salient_token"]
    for tok in range(m):
        axes[0].plot(ts[1:], v[0, 1:, tok], lw=2.0 if tok == star0 else 1.0,
                     label=f"token {tok}, Delta={delta[tok]:+.2f}" if tok == star0 or tok < 3 else None)
    axes[0].set_xscale("log")
    axes[0].set_yscale("symlog", linthresh=1.0)
    axes[0].set_xlabel("t")
    axes[0].set_ylabel("v_l(t)")
    axes[0].set_title("dv/dt = Delta exp(v^2/2) / A from v(0) = 0: one token escapes", fontsize=8)
    axes[0].legend(fontsize=6)
    for b, scale in enumerate(c.init_scales):
        axes[1].plot(ts[1:], np.maximum(np.abs(deviation[b, 1:]).max(-1), 1e-12), label=f"v(0) ~ N(0, {scale:g}^2)")
        axes[2].plot(ts, entropy[b], label=f"v(0) ~ N(0, {scale:g}^2)")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("t")
    axes[1].set_ylabel("deviation of the invariant")
    axes[1].set_title("max_l |change of erf(v_l/sqrt 2)/Delta_l - sqrt(2/pi) tau|", fontsize=8)
    axes[1].legend(fontsize=7)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("t")
    axes[2].set_ylabel("attention entropy (nats)")
    axes[2].set_title("attention becomes one-hot (sparse)", fontsize=9)
    axes[2].legend(fontsize=7)
    plots.save(fig, workdir / "joma_linear.png", dpi=90)
    rows = [[k, s["salient_token"], s["largest_abs_delta"], s["salient_final_abs_v"],
             s["others_max_abs_final"], s["others_max_abs_error_to_limit"], s["invariant_max_deviation"],
             s["clock_end"], s["spread_erf_sqrt2"], s["spread_erf_half"],
             f"{s['entropy_start']:.3f} -> {s['entropy_end']:.2e}", s["max_attention_end"]]
            for k, s in starts.items()]
    body = (f"M = {m} tokens, Delta ~ N(0, {c.delta_scale:g}^2), A = sum_l xbar_l exp(v_l^2 / {c.scale:g}) with "
            f"xbar ~ U{tuple(c.xbar_range)}, integrated to t = {c.t1:g} (tsit5, rtol 1e-7). The limit of the other "
            "tokens is the one the conserved quantity predicts (`joma.linear_limit`). Spread: the largest, over "
            "saves, of (max - min over tokens of the change since t = 0) / (largest change), over tokens with "
            "abs v < 5 (0 for a quantity whose change is the same for every token).\n\n"
            + benchlib.markdown_table(["start", "salient token (first to blow up)", "largest abs Delta",
                                       "abs v of the salient token at the end", "max abs v of the others",
                                       "max abs(v_l - predicted limit)", "max deviation of the invariant",
                                       "sqrt(2/pi) tau at the end", "spread of erf(v/sqrt 2)/Delta",
                                       "spread of erf(v/2)/Delta", "entropy", "max attention at the end"], rows))
    return {"summary": {"starts": starts, "delta": delta.tolist()}, "body": body}


def _token_spread(inv: np.ndarray, resolved: np.ndarray) -> np.ndarray:
    """[B] largest over saves of (max - min over tokens of inv(t) - inv(0)) / max |inv(t) - inv(0)|, over the
    resolved tokens: 0 when the change is the same for every token, as for a conserved difference."""
    moved = inv - inv[:, :1]
    hi = np.where(resolved, moved, -np.inf).max(-1)
    lo = np.where(resolved, moved, np.inf).min(-1)
    size = np.abs(np.where(resolved, moved, 0.0)).max(-1)
    ok = size > 1e-3
    return np.where(ok, (hi - lo) / np.where(ok, size, 1.0), 0.0).max(-1)


# ----- Theorems 3-4: nonlinear activation (Fig. 4) ------------------------------------------------

def nonlinear(c, workdir: pathlib.Path) -> dict[str, Any]:
    rng = np.random.default_rng(c.seed)
    mu_code = np.sort(1.0 + 3.0 * rng.uniform(size=c.code_components))
    args_code = joma.ode_args(mu_code, None, c.code_scale, True)
    code = joma.simulate_nonlinear(np.full((1, c.code_components), c.v0), args_code, c.code_t1,
                                   num_saves=c.num_saves)
    v_code, t_code = _np(code.ys[0][0]), _np(code.ts)
    h_code = _np(joma.attention_entropy(joma.ode_attention(jnp.asarray(v_code), args_code)))
    mu = np.linspace(*c.rate_mu, c.rate_components)
    args = joma.ode_args(mu, None, 2.0, True)
    traj = joma.simulate_nonlinear(np.full((1, c.rate_components), c.v0), args, c.rate_t1, num_saves=c.num_saves,
                                   log_times=True)
    v, tau, ts = _np(traj.ys[0][0]), _np(traj.ys[1][0]), _np(traj.ts)
    h = _np(joma.attention_entropy(joma.ode_attention(jnp.asarray(v), args)))
    fit_tau = joma.fit_rates(tau, v, mu, window=tuple(c.rate_window))
    fit_t = joma.fit_rates(ts, v, mu, window=tuple(c.rate_window))
    pred_tau, pred_t = np.exp(mu**2 / 2.0), joma.nonlinear_rates(mu, None, 2.0, True, clock="t")
    ratio = fit_tau[:, None] / fit_tau[None, :]
    ratio_ref = np.exp((mu[:, None] ** 2 - mu[None, :] ** 2) / 2.0)
    summary = {"code_bounce": joma.bounce(h_code), "rate_bounce": joma.bounce(h),
               "code_final_gap": (np.abs(v_code[-1] - mu_code) / mu_code).tolist(),
               "fitted_rates_tau": fit_tau.tolist(), "predicted_rates_tau": pred_tau.tolist(),
               "fitted_rates_t": fit_t.tolist(), "predicted_rates_t": pred_t.tolist(),
               "ratio_max_rel_error": float(np.nanmax(np.abs(ratio / ratio_ref - 1.0))),
               "tau_rate_max_rel_error": float(np.nanmax(np.abs(fit_tau / pred_tau - 1.0))),
               "t_rate_rel_error": (fit_t / pred_t - 1.0).tolist(), "mu": mu.tolist(), "mu_code": mu_code.tolist()}
    fig, axes = plots.figure(1, 4, panel_size=(4.0, 3.2))
    cmap = plots_cmap()
    for i in range(0, len(t_code), max(1, len(t_code) // 20)):
        axes[0].plot(v_code[i], color=cmap(t_code[i] / t_code[-1]), lw=1)
    axes[0].plot(mu_code, "k--", lw=1)
    axes[0].set_xlabel("sorted component j")
    axes[0].set_ylabel("v_j")
    axes[0].set_title(f"v(t) (colour: t up to {c.code_t1:g}), target mu dashed; s = {c.code_scale:g}", fontsize=8)
    axes[1].plot(t_code, h_code, label=f"s = {c.code_scale:g} (public code)")
    axes[1].plot(ts, h, label="s = 2 (theory)")
    axes[1].set_xscale("symlog", linthresh=1.0)
    axes[1].set_xlabel("t")
    axes[1].set_ylabel("entropy of softmax(v^2 / s) (nats)")
    axes[1].set_title("attention entropy falls, then bounces back", fontsize=9)
    axes[1].legend(fontsize=7)
    gap = np.abs(mu[None] - v) / mu[None]
    for j in range(len(mu)):
        axes[2].plot(tau[1:], np.maximum(gap[1:, j], 1e-9), label=f"mu={mu[j]:.2f}")
    axes[2].axhspan(*c.rate_window, color="0.85", lw=0)
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("tau = integral dt / A")
    axes[2].set_ylabel("|mu_j - v_j| / mu_j")
    axes[2].set_title("convergence (shaded: the fitting window)", fontsize=9)
    axes[2].legend(fontsize=6)
    axes[3].plot(mu**2 / 2, fit_tau, "o", label="fitted, clock tau")
    axes[3].plot(mu**2 / 2, pred_tau, "k-", lw=0.8, label="exp(mu^2 / 2)")
    axes[3].plot(mu**2 / 2, fit_t, "s", ms=4, label="fitted, clock t")
    axes[3].plot(mu**2 / 2, pred_t, "k:", lw=0.8, label="exp(mu^2 / 2) / A(mu)")
    axes[3].set_yscale("log")
    axes[3].set_xlabel("mu_j^2 / 2")
    axes[3].set_ylabel("rate")
    axes[3].set_title("convergence rates", fontsize=9)
    axes[3].legend(fontsize=6)
    plots.save(fig, workdir / "joma_nonlinear.png", dpi=90)
    rows = [[f"{mu[j]:.3f}", fit_tau[j], pred_tau[j], fit_t[j], pred_t[j]] for j in range(len(mu))]
    bc, br = summary["code_bounce"], summary["rate_bounce"]
    body = (f"The public code's setting (s = {c.code_scale:g}, mu = sorted(1 + 3 U(0, 1)) over {c.code_components} "
            f"components, v(0) = {c.v0:g}, t up to {c.code_t1:g}): entropy {bc['start']:.3f} -> min {bc['min']:.3f} -> "
            f"{bc['end']:.3f} nats at the end. The theory's s = 2 with mu = linspace{tuple(c.rate_mu)} over "
            f"{len(mu)} components: {br['start']:.3f} -> {br['min']:.3f} -> {br['end']:.3f}.\n\n"
            f"Convergence rates (fits of log |mu_j - v_j| over relative gaps in {tuple(c.rate_window)}): in the clock "
            f"tau = integral dt / A each component alone has rate exp(mu_j^2 / 2); in t the rate is exp(mu_j^2 / 2) / "
            f"A(mu) once every component is near mu. Largest relative error of the fitted ratios lambda_j / "
            f"lambda_k against exp(mu_j^2 / 2) / exp(mu_k^2 / 2): {summary['ratio_max_rel_error']:.2e}.\n\n"
            + benchlib.markdown_table(["mu_j", "fitted (tau)", "exp(mu^2/2)", "fitted (t)", "exp(mu^2/2) / A(mu)"],
                                      rows))
    return {"summary": summary, "body": body}


def plots_cmap():
    from matplotlib import colormaps

    return colormaps["rainbow"]


# ----- K > 1 nodes: the stable rank of V(t) -------------------------------------------------------

def nodes(c, workdir: pathlib.Path) -> dict[str, Any]:
    rng = np.random.default_rng(c.seed)
    m, k = c.num_tokens, c.num_nodes
    delta = rng.normal(size=(m, k)) * c.delta_scale
    v0 = np.concatenate([np.zeros((1, m, k)), c.init_scale * rng.normal(size=(c.num_starts, m, k))])
    args = joma.ode_args(delta, None, 2.0, True)
    s_delta = np.linalg.svd(delta, compute_uv=False)
    summary: dict[str, Any] = {"delta_stable_rank": float((s_delta**2).sum() / s_delta[0] ** 2)}
    fig, axes = plots.figure(1, 3, panel_size=(4.3, 3.3))
    for exponent in c.exponents:
        traj = joma.simulate_nodes(v0, args, c.t1, node_exponent=exponent, num_saves=c.num_saves, log_times=True)
        ts, v = _np(traj.ts), traj.ys
        ranks = _np(joma.node_stable_rank(v[:, 1:]))  # [B, T - 1] (V(0) = 0 has no stable rank)
        entropy = _np(joma.attention_entropy(joma.ode_attention(v, args, exponent)))
        rows_end = np.abs(_np(v[:, -1])).max(-1).argmax(-1)
        summary[exponent] = {
            "zero_start_first": float(ranks[0, 0]), "zero_start_end": float(ranks[0, -1]),
            "zero_start_never_rises": bool(np.all(np.diff(ranks[0]) <= 1e-4)),
            "random_start_mean": float(_np(joma.node_stable_rank(jnp.asarray(v0[1:]))).mean()),
            "end_max": float(ranks[:, -1].max()), "fraction_ending_below_1.05": float(np.mean(ranks[:, -1] < 1.05)),
            "winning_row_is_largest_delta_row": float(np.mean(rows_end == np.argmax(np.linalg.norm(delta, axis=1)))),
            "zero_start_winner_is_largest_delta_row": bool(rows_end[0] == np.argmax(np.linalg.norm(delta, axis=1))),
            "entropy_end_max": float(entropy[:, -1].max())}
        style = "-" if exponent == "sum" else "--"
        label = "exp(sum_k V_lk^2 / 2)" if exponent == "sum" else "sum_k exp(V_lk^2 / 2)"
        plots.plot_band(axes[0], ts[1:], ranks[1:], label=f"{label}, random V(0)")
        axes[0].plot(ts[1:], ranks[0], "k" + style, lw=1, label=f"{label}, V(0) = 0")
        plots.plot_band(axes[1], ts, entropy[1:], label=label)
        if exponent == c.exponents[0]:
            sv = np.linalg.svd(_np(v[0, 1:]), compute_uv=False)  # V(0) = 0: [T - 1, min(M, K)]
            for i in range(sv.shape[1]):
                axes[2].plot(ts[1:], sv[:, i] / sv[:, 0], label=f"sigma_{i + 1} / sigma_1")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("t")
    axes[0].set_ylabel("stable rank of V(t)")
    axes[0].set_title(f"dV/dt = diag(exp(e)) Delta / A, M={m}, K={k} (band: {c.num_starts} starts)", fontsize=8)
    axes[0].legend(fontsize=6)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("t")
    axes[1].set_ylabel("attention entropy (nats)")
    axes[1].set_title("the attention over tokens", fontsize=9)
    axes[1].legend(fontsize=6)
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("t")
    axes[2].set_title(f"singular values of V(t) from V(0) = 0 ({c.exponents[0]})", fontsize=9)
    axes[2].legend(fontsize=6)
    plots.save(fig, workdir / "joma_nodes.png", dpi=90)
    rows = [[e, s["random_start_mean"], s["zero_start_first"], s["zero_start_end"], s["zero_start_never_rises"],
             s["end_max"], s["fraction_ending_below_1.05"], s["winning_row_is_largest_delta_row"]]
            for e, s in summary.items() if isinstance(s, dict)]
    body = (f"M = {m} tokens, K = {k} nodes, Delta ~ N(0, {c.delta_scale:g}^2) (stable rank "
            f"{summary['delta_stable_rank']:.3f}), V(0) = 0 and {c.num_starts} starts V(0) ~ N(0, {c.init_scale:g}^2), "
            f"integrated to t = {c.t1:g}. Exponent 'sum' is e_l = sum_k V_lk^2 / 2 (Theorem 1 with K nodes); "
            "'sum_of_exp' reads diag(exp(V∘V/2) 1) literally.\n\n"
            + benchlib.markdown_table(["exponent", "stable rank of V(0), random starts", "V(0) = 0: first save",
                                       "V(0) = 0: end", "V(0) = 0: never rises", "largest at the end",
                                       "starts ending below 1.05", "winning row = largest norm of Delta_l"], rows))
    return {"summary": summary, "body": body}


# ----- Theorem 5: the hierarchical latent tree ----------------------------------------------------

def hierarchy(c, workdir: pathlib.Path) -> dict[str, Any]:
    tree = synthetic.latent_tree(c.num_classes, c.height, rho=c.rho or None, seed=c.seed)
    _, levels = synthetic.sample_latent_tree(jax.random.key(c.seed), tree, c.num_samples)
    leaves = _np(levels[-1])
    n = tree.num_leaves
    joint = leaves.T @ leaves  # [n, n] counts of y_l = y_m = 1
    count = np.diag(joint)
    pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
    up = np.array([synthetic.lca_height(tree, a, b) for a, b in pairs])
    emp = np.array([joint[a, b] / count[b] for a, b in pairs])
    exact = np.array([synthetic.tree_cooccurrence(tree, a, b) for a, b in pairs])
    zscore = (emp - exact) / np.sqrt(exact * (1 - exact) / np.array([count[b] for _, b in pairs]))
    by_h = {}
    for h in range(1, c.height + 1):
        sel = up == h
        closed = float(synthetic.cooccurrence_closed_form(h, tree.rho)) if h < c.height else float(exact[sel].mean())
        by_h[h] = {"pairs": int(sel.sum()), "empirical_mean": float(emp[sel].mean()),
                   "empirical_std": float(emp[sel].std()), "exact": closed, "one_minus_h_over_l": 1 - h / c.height,
                   "max_abs_z": float(np.abs(zscore[sel]).max())}
    comp = synthetic.composition_tree(c.comp_tokens, c.comp_seq_len, list(c.comp_levels), list(c.comp_combinations),
                                      seed=c.seed)
    tokens, _, active = synthetic.sample_composition_tree(jax.random.key(c.seed + 1), comp, c.comp_samples)
    lengths = (np.asarray(tokens) != c.comp_tokens - 1).sum(1)
    comp_summary = {"level_sizes": list(comp.level_sizes), "tokens_min": int(lengths.min()),
                    "tokens_mean": float(lengths.mean()), "tokens_max": int(lengths.max()),
                    "active_per_level_mean": [float(np.asarray(a).sum(1).mean()) for a in active]}
    fig, axes = plots.figure(1, 2, panel_size=(4.6, 3.4))
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(up))
    axes[0].plot(up + jitter, emp, ".", ms=2, alpha=0.4, label="empirical, every pair (l, m)")
    hs = np.arange(1, c.height + 1)
    axes[0].plot(hs, [by_h[h]["exact"] for h in hs], "ko-", label="closed form (root: its average)")
    axes[0].plot(hs, 1 - hs / c.height, "r--", label="1 - H/L")
    axes[0].set_xlabel("H, levels up to the lowest common ancestor")
    axes[0].set_ylabel("P(y_l = 1 | y_m = 1)")
    axes[0].set_title(f"latent tree: D={c.num_classes}, L={c.height}, rho={tree.rho:.3f}, "
                      f"{c.num_samples} samples", fontsize=8)
    axes[0].legend(fontsize=7)
    axes[1].hist(zscore, bins=40)
    axes[1].set_xlabel("(empirical - exact) / binomial std")
    axes[1].set_title("sampling error of every pair", fontsize=9)
    plots.save(fig, workdir / "joma_hierarchy.png", dpi=90)
    rows = [[h, v["pairs"], v["empirical_mean"], v["empirical_std"], v["exact"], v["one_minus_h_over_l"],
             v["max_abs_z"]] for h, v in by_h.items()]
    body = (f"Stochastic tree: D = {c.num_classes} root values, height L = {c.height} ({n} leaf tokens), binary "
            f"branching, rho = {tree.rho:.4f}, {c.num_samples} samples. For each H the mean and spread over pairs "
            "of leaves of the empirical P(y_l = 1 | y_m = 1), the closed form (1 + rho^(2H)) / 2 (H < L; H = L: the "
            "exact average over the root's values), 1 - H/L, and the largest |z| of a pair against the exact value.\n\n"
            + benchlib.markdown_table(["H", "pairs", "empirical mean", "empirical std over pairs", "closed form",
                                       "1 - H/L", "max abs z"], rows)
            + f"\n\nDeterministic composition tree (the public code's, M = {c.comp_tokens}, L = {c.comp_seq_len}, "
            f"levels {tuple(c.comp_levels)}, combinations {tuple(c.comp_combinations)}): level sizes "
            f"{comp_summary['level_sizes']}, tokens per sequence {comp_summary['tokens_min']} to "
            f"{comp_summary['tokens_max']} (mean {comp_summary['tokens_mean']:.2f}) over {c.comp_samples} samples; "
            f"active latents per level (bottom up) {[round(a, 2) for a in comp_summary['active_per_level_mean']]}.")
    return {"summary": {"by_h": {str(h): v for h, v in by_h.items()}, "max_abs_z": float(np.abs(zscore).max()),
                        "rho": tree.rho, "composition": comp_summary}, "body": body}


RUNNERS = {"invariants": invariants, "linear": linear, "nonlinear": nonlinear, "nodes": nodes, "hierarchy": hierarchy}


def run(config, workdir: str, log=print) -> dict[str, Any]:
    """Draws `config.figure` (or every figure for "all") into `workdir`; returns each figure's summary."""
    command = f"python -m experiments.joma --config configs/joma.py:{config.figure} --workdir runs/joma"
    return benchlib.run_figures(config, workdir, RUNNERS, order=FIGURE_NAMES, prefix="joma", doc=DOC,
                                command=command, log=log)


if __name__ == "__main__":
    cli.launch(run, "configs/joma.py:all")
