"""The one thin wrapper over diffrax that every simulator in `lorank.dynamics` uses.

A vector field is a pure function `field(t, y, args) -> dy/dt` where `y` is any
pytree of arrays. `solve` integrates it from `t0` to `t1` and returns the state at
the requested save times. It is jit-able and vmap-able: vmapping over `y0` (or over
`args`) simulates many initial conditions or seeds in one compiled program, each with
its own step sizes. `solve_batch` does that for a batch of initial conditions, in
chunks.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from lorank import checks

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

class Trajectory(NamedTuple):
    """A solved trajectory.

    ts: [T] save times.
    ys: pytree like y0 with a leading [T] axis: the state at each save time.
    num_steps: [] number of accepted solver steps.
    num_rejected: [] number of rejected steps (0 for fixed steps), or None.
    """

    ts: jax.Array
    ys: Any
    num_steps: jax.Array
    num_rejected: jax.Array | None = None


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
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
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
      rtol, atol: tolerances of the adaptive step-size controller: error per step
        <= atol + rtol * |y| (RMS over the state), as in SciPy's `solve_ivp`.
      dt0: first step (adaptive) or the fixed step (`adaptive=False`); `None` lets
        diffrax pick the first adaptive step.
      adaptive: adaptive steps if True; fixed steps of `dt0` if False.
      max_steps: the solve fails (under jit: returns an error) past this many steps.

    Returns:
      A `Trajectory` with `ts` [T], `ys` (leading axis T) and `num_steps`.
    """
    checks.one_of("solver", solver, tuple(SOLVERS))
    if adaptive and solver == "euler":
        raise ValueError("solver 'euler' has no error estimate: use adaptive=False with a dt0")
    if adaptive:
        checks.number("rtol", rtol, low=0.0, low_open=True)
        checks.number("atol", atol, low=0.0, low_open=True)
    elif dt0 is None:
        raise ValueError("fixed-step solves need a positive dt0, got dt0=None")
    else:
        checks.number("dt0", dt0, low=0.0, low_open=True)
    checks.integer("max_steps", max_steps, minimum=1)
    _check_times(t0, t1, ts)
    if adaptive:
        controller = diffrax.PIDController(rtol=rtol, atol=atol, pcoeff=pcoeff, icoeff=icoeff)
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
    return Trajectory(ts=sol.ts, ys=sol.ys, num_steps=sol.stats["num_accepted_steps"],
                      num_rejected=sol.stats["num_rejected_steps"])


def solve_batch(field: Callable[[Any, Any, Any], Any], y0: Any, t1: float, *,
                chunk_size: int | None = None, **kwargs: Any) -> Trajectory:
    """`solve` for a batch of independent initial conditions, each with its own steps.

    The batch is split into chunks of `chunk_size` initial conditions; each chunk is one
    vmapped `solve` and the chunks run one after another (`lax.map`). A vmapped adaptive
    solve loops until its slowest member is done and every iteration works on the whole
    chunk, so smaller chunks waste fewer evaluations on finished members and keep their
    working set in cache, while each iteration carries a fixed cost of the solver loop.

    Args:
      field: vector field `f(t, y, args)` of one initial condition (see `solve`).
      y0: pytree of float arrays with a shared leading batch axis [B].
      t1: final time.
      chunk_size: initial conditions per vmapped solve; None: the whole batch at once.
        A last, partial chunk is padded with copies of the first initial condition.
      **kwargs: passed to `solve` (t0, args, ts, solver, rtol, atol, pcoeff, ...).

    Returns:
      A `Trajectory` with `ts` [T] and, for each initial condition, `ys` (leading axes
      [B, T]), `num_steps` [B] and `num_rejected` [B].

    Raises:
      ValueError: leaves without a shared leading axis, or chunk_size < 1.
    """
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(y0)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"y0 leaves must share a leading batch axis, got sizes {sizes}")
    (batch,) = sizes
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")

    def one(y):
        return solve(field, y, t1, **kwargs)

    if chunk_size is None or chunk_size >= batch:
        traj = jax.vmap(one)(y0)
        return traj._replace(ts=traj.ts[0])
    num_chunks = -(-batch // chunk_size)
    pad = num_chunks * chunk_size - batch

    def to_chunks(leaf):
        leaf = jnp.concatenate([leaf, jnp.repeat(leaf[:1], pad, axis=0)]) if pad else leaf
        return leaf.reshape((num_chunks, chunk_size) + leaf.shape[1:])

    traj = jax.lax.map(jax.vmap(one), jax.tree.map(to_chunks, y0))
    traj = jax.tree.map(lambda a: a.reshape((num_chunks * chunk_size,) + a.shape[2:])[:batch],
                        traj)
    return traj._replace(ts=traj.ts[0])
