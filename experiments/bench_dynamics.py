"""Benchmark: vmapped diffrax one-layer dynamics vs a SciPy solve_ivp loop over the same ODEs.

  python -m experiments.bench_dynamics --config configs/dynamics.py:bench --workdir runs/bench_dynamics

Integrates dw/dt = P_w^perp A(w) w (one-layer ReLU contrastive dynamics on a mixture of
clusters) from `num_ics` initial conditions twice, in float64 with the same
Dormand-Prince 5(4) pair and the same rtol/atol: once as one jit-compiled, vmapped
diffrax solve, once as a Python loop of `scipy.integrate.solve_ivp(method="RK45")`
with a NumPy right-hand side. Reports both wall times (diffrax after compilation,
median of `repeats`), the compile time, the speedup and how far the trajectories
differ. Writes bench_dynamics.json to the workdir and, unless smoke, its section of
docs/benchmarks.md.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from scipy.integrate import solve_ivp

from experiments import benchlib
from experiments import cli
from lorank.data import synthetic
from lorank.dynamics import one_layer

def numpy_field(x: np.ndarray, xp: np.ndarray, act: str, slope: float, power: int):
    """The same vector field in NumPy float64, uniform alpha, written out directly."""
    n = x.shape[0]
    if act == "relu":
        h, dh, p = (lambda z: np.maximum(z, 0.0)), (lambda z: (z > 0).astype(float)), 1.0
    elif act == "leaky_relu":
        h, dh, p = (lambda z: np.where(z > 0, z, slope * z)), (lambda z: np.where(z > 0, 1.0, slope)), 1.0
    elif act == "linear":
        h, dh, p = (lambda z: z), (lambda z: np.ones_like(z)), 1.0
    else:
        h, dh, p = (lambda z: z**power), (lambda z: power * z ** (power - 1)), float(power)

    def rhs(t, w):
        z, zp = x @ w, xp @ w
        xt, xtp = x * dh(z)[:, None], xp * dh(zp)[:, None]
        f, fp = h(z), h(zp)
        pairs = 2.0 * (n * xt.T @ f - xt.sum(0) * f.sum()) / (n * (n - 1))
        aw = p * (pairs - (xt - xtp).T @ (f - fp) / n)
        return aw - (w @ aw) / (w @ w) * w

    return rhs


def run(config, workdir) -> dict:
    """Runs the benchmark of `config` in float64 (a scoped `jax.enable_x64`, so nothing leaks into
    later work in the process), writing bench_dynamics.json to `workdir`; returns the results."""
    with jax.enable_x64(True):
        return _run(config, workdir)


def _run(config, workdir) -> dict:
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    x, x_prime, _ = synthetic.cluster_mixture(config)
    data = one_layer.Views(x, x_prime, None)
    act = one_layer.get_activation(config.activation, slope=config.leaky_slope, power=config.power)
    x_alpha = np.asarray(one_layer.a_matrix(jnp.ones(config.dim), data,
                                            one_layer.get_activation("linear")))
    t1 = config.horizon / float(np.linalg.eigvalsh(x_alpha)[-1])
    w0 = one_layer.sphere_init(jax.random.key(config.seed + 2), config.num_ics, config.dim)
    kw = dict(num_saves=config.num_saves, rtol=config.rtol, atol=config.atol,
              solver=config.solver, pcoeff=config.pcoeff, icoeff=config.icoeff,
              chunk_size=config.chunk_size)

    start = time.perf_counter()
    traj = one_layer.simulate(w0, data, act, t1, **kw)
    jax.block_until_ready(traj.ys)
    first = time.perf_counter() - start
    jax_s = benchlib.time_fn(lambda: one_layer.simulate(w0, data, act, t1, **kw).ys,
                             repeats=config.repeats)
    logging.info("diffrax: first call %.2f s, compiled %.3f s", first, jax_s)

    rhs = numpy_field(np.asarray(data.x), np.asarray(data.x_prime), config.activation,
                      config.leaky_slope, config.power)
    ts = np.asarray(traj.ts)
    w0_np = np.asarray(w0)
    start = time.perf_counter()
    scipy_ys, nfev = [], 0
    for i in range(config.num_ics):
        sol = solve_ivp(rhs, (0.0, t1), w0_np[i], method="RK45", t_eval=ts, rtol=config.rtol,
                        atol=config.atol)
        if not sol.success:
            raise RuntimeError(f"solve_ivp failed on initial condition {i}: {sol.message}")
        scipy_ys.append(sol.y.T)
        nfev += sol.nfev
    scipy_s = time.perf_counter() - start
    scipy_ys = np.stack(scipy_ys)
    logging.info("scipy: %.2f s", scipy_s)

    attempted = np.asarray(traj.num_steps) + np.asarray(traj.num_rejected)  # per IC
    chunk = min(config.chunk_size or config.num_ics, config.num_ics)
    # a vmapped solve iterates until the slowest initial condition of its chunk is done
    padded = np.concatenate([attempted, np.repeat(attempted[:1], -config.num_ics % chunk)])
    loop_iterations = padded.reshape(-1, chunk).max(axis=1)
    gap = np.abs(np.asarray(traj.ys) - scipy_ys).max(axis=2)  # [ICs, save times]
    diff = gap.max(axis=1)  # per initial condition
    # accuracy of both against a tight DOP853 solution: the first few initial conditions
    # and the three where diffrax and SciPy differ most
    worst = [int(i) for i in np.argsort(diff)[-3:]]
    checked = sorted(set(range(min(config.num_reference, config.num_ics))) | set(worst))
    err_jax, err_scipy, err_worst = [], [], {}
    for i in checked:
        ref = solve_ivp(rhs, (0.0, t1), w0_np[i], method="DOP853", t_eval=ts,
                        rtol=config.reference_rtol, atol=config.reference_atol).y.T
        err_jax.append(np.abs(np.asarray(traj.ys[i]) - ref).max())
        err_scipy.append(np.abs(scipy_ys[i] - ref).max())
        if i in worst:
            err_worst[i] = (err_jax[-1], err_scipy[-1])
    results = {
        "num_ics": config.num_ics,
        "dim": config.dim,
        "num_samples": config.num_samples,
        "activation": config.activation,
        "rtol": config.rtol,
        "atol": config.atol,
        "t1": t1,
        "diffrax_solver": config.solver,
        "diffrax_pcoeff": config.pcoeff,
        "diffrax_icoeff": config.icoeff,
        "diffrax_chunk_size": chunk,
        "diffrax_first_call_s": first,
        "diffrax_compiled_s": jax_s,
        "scipy_loop_s": scipy_s,
        "speedup": scipy_s / jax_s,
        "diffrax_steps_mean": float(np.mean(traj.num_steps)),
        "diffrax_rejected_mean": float(np.mean(traj.num_rejected)),
        "diffrax_attempted_max": int(attempted.max()),
        # steps computed per initial condition, counting those a chunk spends on its
        # finished members
        "diffrax_attempted_per_ic_in_loop": float(np.sum(loop_iterations) * chunk
                                                  / config.num_ics),
        "scipy_rhs_evals_mean": nfev / config.num_ics,
        # RK45: 2 evaluations to start, then 6 per attempted step (first same as last)
        "scipy_attempted_mean": (nfev / config.num_ics - 2) / 6,
        "max_abs_diff": float(diff.max()),
        "max_abs_diff_at_t1": float(gap[:, -1].max()),
        "median_abs_diff": float(np.median(diff)),
        "fraction_within_tol": float(np.mean(diff <= config.agree_tol)),
        "agree_tol": config.agree_tol,
        "num_reference": len(err_jax),
        "diffrax_max_err_vs_reference": float(max(err_jax)),
        "scipy_max_err_vs_reference": float(max(err_scipy)),
        "diffrax_steps_max": int(np.max(traj.num_steps)),
        "worst_ics_err_vs_reference": {str(i): list(e) for i, e in err_worst.items()},
    }
    logging.info("%s", results)
    (workdir / "bench_dynamics.json").write_text(json.dumps(results, indent=2) + "\n")
    if config.write_docs:
        table = benchlib.markdown_table(
            ["method", "wall time (s)", "per initial condition (ms)"],
            [["diffrax, vmapped + jit (after compile)", jax_s, 1e3 * jax_s / config.num_ics],
             ["diffrax, first call (incl. compile)", first, 1e3 * first / config.num_ics],
             ["SciPy solve_ivp RK45 loop", scipy_s, 1e3 * scipy_s / config.num_ics]])
        body = (
            f"One-layer ReLU contrastive dynamics dw/dt = P_w^perp A(w) w (d={config.dim}, "
            f"N={config.num_samples} sample pairs, uniform alpha) from {config.num_ics} initial "
            f"conditions to t1={t1:.3g}, float64, Dormand-Prince 5(4) in both, "
            f"rtol={config.rtol:g}, atol={config.atol:g}.\n\n{table}\n\n"
            f"Speedup after compilation: **{scipy_s / jax_s:.0f}x** (target: 50x). "
            f"Trajectories agree: max |w_diffrax - w_scipy| over initial conditions and "
            f"{config.num_saves} save times = {diff.max():.2g} (median over initial conditions "
            f"{np.median(diff):.2g}); {100 * np.mean(diff <= config.agree_tol):.1f}% of initial "
            f"conditions within {config.agree_tol:g}; at t1 the largest difference is "
            f"{gap[:, -1].max():.2g}. Against a DOP853 solution at rtol={config.reference_rtol:g} on "
            f"{len(err_jax)} initial conditions (the first {config.num_reference} and the 3 "
            f"where the two differ most), the largest error is {max(err_jax):.2g} for diffrax "
            f"and {max(err_scipy):.2g} for SciPy: the two agree as closely as either matches the "
            "exact trajectory. The largest differences occur mid-trajectory, on initial "
            "conditions that pass close to a saddle, where both solvers lag or lead the exact "
            "solution by a similar amount (the ReLU gate makes the vector field discontinuous, "
            "so errors exceed the per-step tolerance). Both accept a step when the RMS of "
            "its error estimate over atol + rtol |w| is at most 1; diffrax adapts the step "
            f"with a PI controller (pcoeff={config.pcoeff:g}, icoeff={config.icoeff:g}), "
            "SciPy with the integral controller of RK45, which rejects more steps on this "
            "discontinuous field: per initial condition diffrax attempts "
            f"{float(np.mean(attempted)):.0f} steps on average "
            f"({float(np.mean(traj.num_steps)):.0f} accepted), SciPy "
            f"{(nfev / config.num_ics - 2) / 6:.0f}. diffrax integrates the initial "
            f"conditions as {len(loop_iterations)} vmapped solves of {chunk} run one after "
            "another, each looping until its slowest member is done, so it computes "
            f"{np.sum(loop_iterations) * chunk / config.num_ics:.0f} steps per initial "
            "condition (the slowest takes "
            f"{int(attempted.max())}); the field of a whole chunk is evaluated at once "
            "(`one_layer.field_batched`).")
        benchlib.write_section(
            "bench_dynamics",
            "python -m experiments.bench_dynamics --config configs/dynamics.py:bench "
            "--workdir runs/bench_dynamics", body, results)
    return results


if __name__ == "__main__":
    cli.launch(run, "configs/dynamics.py:bench")
