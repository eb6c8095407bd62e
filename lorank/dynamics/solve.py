"""The one thin wrapper over diffrax that every simulator in `lorank.dynamics` uses.

A vector field is a pure function `field(t, y, args) -> dy/dt` where `y` is any
pytree of arrays. `solve` integrates it from `t0` to `t1` and returns the state at
the requested save times. It is jit-able and vmap-able: vmapping over `y0` (or over
`args`) simulates many initial conditions or seeds in one compiled program.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

SOLVERS: dict[str, Callable[[], diffrax.AbstractSolver]] = {
    "euler": diffrax.Euler,  # order 1, fixed steps only
    "heun": diffrax.Heun,  # order 2
    "midpoint": diffrax.Midpoint,  # order 2
    "ralston": diffrax.Ralston,  # order 2
    "bosh3": diffrax.Bosh3,  # order 3
    "tsit5": diffrax.Tsit5,  # order 5
    "dopri5": diffrax.Dopri5,  # order 5 (the pair SciPy's RK45 uses)
    "dopri8": diffrax.Dopri8,  # order 8
}

ORDERS = {"euler": 1, "heun": 2, "midpoint": 2, "ralston": 2, "bosh3": 3, "tsit5": 5,
          "dopri5": 5, "dopri8": 8}


class Trajectory(NamedTuple):
    """A solved trajectory.

    ts: [T] save times.
    ys: pytree like y0 with a leading [T] axis: the state at each save time.
    num_steps: [] number of accepted solver steps.
    """

    ts: jax.Array
    ys: Any
    num_steps: jax.Array


def _check_times(t0: float, t1: float, ts: Any) -> None:
    """Raises ValueError for a bad time span or save grid (concrete values only)."""
    if isinstance(t0, jax.core.Tracer) or isinstance(t1, jax.core.Tracer):
        return
    if not float(t1) > float(t0):
        raise ValueError(f"t1={t1} must be greater than t0={t0}")
    if ts is None or isinstance(ts, jax.core.Tracer):
        return
    ts_np = np.asarray(ts, dtype=np.float64)
    if ts_np.ndim != 1 or ts_np.size == 0:
        raise ValueError(f"ts must be a non-empty 1-D array of save times, got shape {ts_np.shape}")
    if np.any(np.diff(ts_np) < 0):
        raise ValueError("ts must be non-decreasing")
    if ts_np[0] < float(t0) or ts_np[-1] > float(t1):
        raise ValueError(f"ts must lie in [t0, t1] = [{t0}, {t1}], got [{ts_np[0]}, {ts_np[-1]}]")


def solve(
    field: Callable[[Any, Any, Any], Any],
    y0: Any,
    t1: float,
    *,
    t0: float = 0.0,
    args: Any = None,
    ts: Any = None,
    solver: str = "tsit5",
    rtol: float = 1e-6,
    atol: float = 1e-8,
    dt0: float | None = None,
    adaptive: bool = True,
    max_steps: int = 100_000,
) -> Trajectory:
    """Integrates dy/dt = field(t, y, args) from t0 to t1.

    Args:
      field: vector field `f(t, y, args)` returning a pytree shaped like `y`.
      y0: initial state, any pytree of float arrays.
      t1: final time (> t0).
      t0: initial time.
      args: passed unchanged to `field`.
      ts: [T] save times in [t0, t1]; default: only t1.
      solver: a key of `SOLVERS`.
      rtol, atol: tolerances of the adaptive step-size controller (PID, as SciPy's RK45
        uses: error per step <= atol + rtol * |y|).
      dt0: first step (adaptive) or the fixed step (`adaptive=False`); `None` lets
        diffrax pick the first adaptive step.
      adaptive: adaptive steps if True; fixed steps of `dt0` if False.
      max_steps: the solve fails (under jit: returns an error) past this many steps.

    Returns:
      A `Trajectory` with `ts` [T], `ys` (leading axis T) and `num_steps`.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    if adaptive and solver == "euler":
        raise ValueError("solver 'euler' has no error estimate: use adaptive=False with a dt0")
    if adaptive and not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol={rtol} and atol={atol} must be positive")
    if not adaptive and (dt0 is None or (not isinstance(dt0, jax.core.Tracer) and not dt0 > 0)):
        raise ValueError(f"fixed-step solves need a positive dt0, got dt0={dt0}")
    if max_steps < 1:
        raise ValueError(f"max_steps={max_steps} must be >= 1")
    _check_times(t0, t1, ts)
    if adaptive:
        controller = diffrax.PIDController(rtol=rtol, atol=atol)
    else:
        controller = diffrax.ConstantStepSize()
    saveat = diffrax.SaveAt(ts=jnp.asarray(ts)) if ts is not None else diffrax.SaveAt(t1=True)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        SOLVERS[solver](),
        t0=t0,
        t1=t1,
        dt0=dt0,
        y0=y0,
        args=args,
        saveat=saveat,
        stepsize_controller=controller,
        max_steps=max_steps,
    )
    return Trajectory(ts=sol.ts, ys=sol.ys, num_steps=sol.stats["num_accepted_steps"])
