"""One-layer nonlinear contrastive dynamics (Tian, ICLR 2023).

A node f(x) = h(w^T x) with a positively homogeneous activation of degree p,
h(c x) = c^p h(x) for c > 0 (so x h'(x) = p h(x)): linear and ReLU and leaky ReLU
(p = 1), x^p. With the gated data x~ = x h'(w^T x) we have f = x~^T w / p, so the
alpha-CL energy is E_alpha = 1/2 tr C_alpha[f] = w^T A(w) w / (2 p^2) with

    A(w) = C_alpha[x~^w]     (the contrastive covariance of the gated data),

and dE/dw = A(w) w / p. On the unit sphere the training dynamics is

    dw/dt = P_w^perp A(w) w,    P_w^perp = I - w w^T / ||w||^2,

(p times the Riemannian gradient flow of E_alpha: the same orbits). Fixed points
are eigenvectors of A(w). With a linear h, A(w) = X_alpha is constant and every
node converges to its top eigenvector; with ReLU, A(w) depends on which samples
w gates on, and nodes started apart converge to different local patterns.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lorank.contrastive.energy import contrastive_cov
from lorank.dynamics.solve import Trajectory, solve_batch

NAMED_ACTIVATIONS = ("linear", "relu", "leaky_relu", "power")


@dataclasses.dataclass(frozen=True)
class Activation:
    """A positively homogeneous activation h of degree `degree`; hashable (jit-static).

    name: "linear", "relu", "leaky_relu", "power" or the name of a custom function.
    param: the negative slope of leaky_relu, or the integer power p of "power".
    degree: p in h(c x) = c^p h(x), c > 0.
    custom: a user function h (elementwise, jax-traceable), else None.
    """

    name: str
    param: float = 0.0
    degree: float = 1.0
    custom: Callable | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.custom is not None:
            return self.custom(x)
        if self.name == "linear":
            return x
        if self.name == "relu":
            return jnp.maximum(x, 0.0)
        if self.name == "leaky_relu":
            return jnp.where(x > 0, x, self.param * x)
        return x ** int(self.param)

    def grad(self, x: jax.Array) -> jax.Array:
        """h'(x), elementwise (h'(0) = 0 for ReLU, the slope for leaky ReLU)."""
        if self.custom is not None:
            return jnp.vectorize(jax.grad(self.custom))(x)
        if self.name == "linear":
            return jnp.ones_like(x)
        if self.name == "relu":
            return (x > 0).astype(x.dtype)
        if self.name == "leaky_relu":
            return jnp.where(x > 0, 1.0, self.param).astype(x.dtype)
        p = int(self.param)
        return p * x ** (p - 1)


def get_activation(spec: str | Callable | Activation, *, slope: float = 0.1,
                   power: int = 3) -> Activation:
    """Builds a homogeneous activation from a name or a function.

    Args:
      spec: one of NAMED_ACTIVATIONS, an `Activation`, or an elementwise function h,
        which is checked numerically for positive homogeneity.
      slope: negative slope of "leaky_relu", in [0, 1).
      power: integer p >= 1 of "power" (h(x) = x^p).

    Returns:
      An `Activation`.

    Raises:
      ValueError: unknown name, bad slope/power, or a function that is not positively
        homogeneous (e.g. tanh, softplus, GELU).
    """
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, str):
        if spec not in NAMED_ACTIVATIONS:
            raise ValueError(f"unknown activation {spec!r}; choose one of {NAMED_ACTIVATIONS} "
                             "or pass a positively homogeneous function")
        if spec == "leaky_relu":
            if not 0.0 <= slope < 1.0:
                raise ValueError(f"leaky_relu slope={slope} must be in [0, 1)")
            return Activation("leaky_relu", float(slope), 1.0)
        if spec == "power":
            if int(power) != power or power < 1:
                raise ValueError(f"power={power} must be an integer >= 1")
            return Activation("power", float(power), float(power))
        return Activation(spec)
    if not callable(spec):
        raise ValueError(f"activation must be a name or a function, got {spec!r}")
    name = getattr(spec, "__name__", repr(spec))
    return Activation(name, 0.0, homogeneity_degree(spec, name=name), spec)


def homogeneity_degree(fn: Callable, *, name: str = "h") -> float:
    """Degree p with fn(c x) = c^p fn(x) for all c > 0, checked on a grid.

    Raises:
      ValueError: naming `name` when fn is not positively homogeneous.
    """
    xs = np.array([-3.0, -1.7, -1.0, -0.4, 0.3, 0.8, 1.0, 2.5], dtype=np.float64)
    hx = np.asarray(fn(jnp.asarray(xs)), dtype=np.float64)
    if hx.shape != xs.shape:
        raise ValueError(f"activation {name!r} must be elementwise")
    if not np.any(np.abs(hx) > 1e-6):
        raise ValueError(f"activation {name!r} is zero on the test grid")
    c = 2.0
    hcx = np.asarray(fn(jnp.asarray(c * xs)), dtype=np.float64)
    live = np.abs(hx) > 1e-6
    ratios = hcx[live] / hx[live]
    if np.any(ratios <= 0):
        raise ValueError(f"activation {name!r} is not positively homogeneous: h(2x) and h(x) "
                         "differ in sign")
    p = float(np.median(np.log(ratios) / np.log(c)))
    for scale in (0.5, 2.0, 3.0):
        h_scaled = np.asarray(fn(jnp.asarray(scale * xs)), dtype=np.float64)
        want = scale**p * hx
        if not np.allclose(h_scaled, want, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(want).max())):
            bad = int(np.argmax(np.abs(h_scaled - want)))
            raise ValueError(
                f"activation {name!r} is not positively homogeneous: h({scale} x) != "
                f"{scale}^p h(x) at x={xs[bad]} (h({scale} x)={h_scaled[bad]:.6g}, "
                f"{scale}^p h(x)={want[bad]:.6g}, p={p:.4g}); the one-layer dynamics needs "
                "h(c x) = c^p h(x) for c > 0, as linear, ReLU, leaky ReLU and x^p satisfy")
    if p <= 0:
        raise ValueError(f"activation {name!r} has homogeneity degree {p:.4g} <= 0")
    return p


class Views(NamedTuple):
    """A contrastive data set: two views and the pairwise importance.

    x, x_prime: [N, d] the two views of N samples.
    alpha: [N, N] pairwise importance (diagonal ignored), or None for uniform alpha
      (`lorank.contrastive.uniform_alpha`), which costs O(N d) instead of O(N^2 d).
    """

    x: jax.Array
    x_prime: jax.Array
    alpha: jax.Array


def gated(x: jax.Array, w: jax.Array, act: Activation) -> jax.Array:
    """Gated data x~ = x h'(w^T x): [N, d] for x [N, d], w [d]."""
    return x * act.grad(x @ w)[:, None]


def a_matrix(w: jax.Array, data: Views, act: Activation) -> jax.Array:
    """A(w) = C_alpha[x~^w]: [d, d] for w [d]."""
    return contrastive_cov(gated(data.x, w, act), gated(data.x_prime, w, act), data.alpha)


def a_times_w(w: jax.Array, data: Views, act: Activation) -> jax.Array:
    """A(w) w = p C_alpha[x~, f] with f = h(w^T x): [d], without forming x~ or A.

    Since x~ = diag(h'(x w)) x, every term of C_alpha[x~, f] is x^T (or x'^T) times an
    [N] vector, so vmapping over many w turns each into one [d, N] x [N, K] product.
    """
    x, xp = data.x, data.x_prime
    z, zp = x @ w, xp @ w
    g, gp = act.grad(z), act.grad(zp)
    f, fp = act(z), act(zp)
    df = f - fp
    n = z.shape[0]
    if data.alpha is None:  # uniform alpha_ij = 1 / (N (N - 1))
        lf = 2.0 * (n * f - jnp.sum(f)) / (n * (n - 1))  # L f for the uniform Laplacian
        r = 1.0 / n
    else:
        alpha = jax.lax.stop_gradient(data.alpha * (1.0 - jnp.eye(n, dtype=data.alpha.dtype)))
        sym = alpha + alpha.T
        lf = jnp.sum(sym, axis=1) * f - sym @ f
        r = jnp.sum(alpha, axis=1)
    # C_alpha[x~, f] = x~^T L f - (x~ - x~')^T diag(r) (f - f')
    return act.degree * (x.T @ (g * (lf - r * df)) + xp.T @ (gp * r * df))


def field(t, w: jax.Array, args: tuple[Views, Activation]) -> jax.Array:
    """dw/dt = P_w^perp A(w) w for one node.

    Args:
      t: time (unused).
      w: [d] weight (non-zero).
      args: (data, activation).

    Returns:
      [d] velocity, orthogonal to w.
    """
    del t
    data, act = args
    aw = a_times_w(w, data, act)
    return aw - jnp.dot(w, aw) / jnp.dot(w, w) * w


def a_times_w_batched(ws: jax.Array, data: Views, act: Activation) -> jax.Array:
    """A(w) w for K nodes at once: [K, d] for ws [K, d], equal to vmapping `a_times_w`.

    With uniform alpha, the coefficients of x and x' in C_alpha[x~, f] are formed for
    all nodes in one pass over [K, N] arrays, between one [K, d] x [d, N] and one
    [K, N] x [N, d] product per view. L f - r df of `a_times_w` is rearranged as
    (2 / (N - 1) - 1 / N) f + f' / N - 2 sum(f) / (N (N - 1)).
    """
    if data.alpha is not None:
        return jax.vmap(a_times_w, in_axes=(0, None, None))(ws, data, act)
    x, xp = data.x, data.x_prime
    n = x.shape[0]
    z, zp = ws @ x.T, ws @ xp.T  # [K, N]
    f, fp = act(z), act(zp)
    total = jnp.sum(f, axis=1, keepdims=True)
    c = act.grad(z) * ((2.0 / (n - 1) - 1.0 / n) * f + fp / n - 2.0 * total / (n * (n - 1)))
    cp = act.grad(zp) * (f - fp) / n
    return act.degree * (c @ x + cp @ xp)


def field_batched(t, ws: jax.Array, args: tuple[Views, Activation]) -> jax.Array:
    """`field` for K nodes at once: [K, d] velocities for ws [K, d], args (data, act)."""
    del t
    data, act = args
    aw = a_times_w_batched(ws, data, act)
    return aw - (jnp.sum(ws * aw, axis=1) / jnp.sum(ws * ws, axis=1))[:, None] * ws


def _node_field(act: Activation) -> Callable:
    """`field` for one node, uniform alpha, whose vmap over nodes is `field_batched`.

    A vmapped solve keeps one step size per node and evaluates the field of all nodes
    at every stage; the batching rule hands that evaluation to `field_batched`. When
    the data are batched too (a vmap over data sets), it falls back to `jax.vmap`.
    Returns `f(t, w, (x, x_prime))`.
    """

    def one(w, x, xp):
        return field(None, w, (Views(x, xp, None), act))

    @jax.custom_batching.custom_vmap
    def node(w, x, xp):
        return one(w, x, xp)

    @node.def_vmap
    def _batched(axis_size, in_batched, w, x, xp):
        w_batched, x_batched, xp_batched = in_batched
        if x_batched or xp_batched:
            axes = tuple(0 if b else None for b in in_batched)
            return jax.vmap(one, in_axes=axes)(w, x, xp), True
        if not w_batched:
            w = jnp.broadcast_to(w, (axis_size,) + w.shape)
        return field_batched(None, w, (Views(x, xp, None), act)), True

    return lambda t, w, views: node(w, *views)


def simulate(w0: jax.Array, data: Views, act: str | Activation, t1: float, *,
             num_saves: int = 50, rtol: float = 1e-6, atol: float = 1e-8,
             solver: str = "tsit5", pcoeff: float = 0.0, icoeff: float = 1.0,
             chunk_size: int | None = 128) -> Trajectory:
    """Integrates the dynamics of K independent nodes, vmapped and jitted.

    Each node has its own adaptive step sizes; with uniform alpha the vmapped solve
    evaluates the field of all nodes of a chunk at once (`field_batched`).

    Args:
      w0: [K, d] initial weights, each non-zero (normalized to the unit sphere here).
      data: the contrastive data set.
      act: activation name or `Activation`.
      t1: horizon.
      num_saves: save times, evenly spaced in [0, t1].
      rtol, atol, solver, pcoeff, icoeff: passed to `solve`.
      chunk_size: nodes per vmapped solve (`solve_batch`); None: all K at once.

    Returns:
      Trajectory with ts [T], ys [K, T, d], num_steps [K] and num_rejected [K].
    """
    act = get_activation(act)
    w0 = check_initial_weights(w0, data)
    return _simulate(w0, data, act, float(t1), int(num_saves), float(rtol), float(atol), solver,
                     float(pcoeff), float(icoeff), chunk_size)


# act, num_saves, solver and chunk_size fix the program; the horizon, tolerances and gains are traced.
@functools.partial(jax.jit, static_argnums=(2, 4, 7, 10))
def _simulate(w0, data, act, t1, num_saves, rtol, atol, solver, pcoeff, icoeff,
              chunk_size) -> Trajectory:
    ts = jnp.linspace(0.0, t1, num_saves)
    if data.alpha is None:
        vector_field, args = _node_field(act), (data.x, data.x_prime)
    else:
        vector_field, args = field, (data, act)
    return solve_batch(vector_field, w0, t1, chunk_size=chunk_size, args=args, ts=ts, rtol=rtol,
                       atol=atol, solver=solver, pcoeff=pcoeff, icoeff=icoeff)


def check_initial_weights(w0, data: Views) -> jax.Array:
    """Validates [K, d] initial weights against the data and normalizes each row.

    Raises:
      ValueError: wrong shape, or a zero-norm row (named by its index).
    """
    x = data.x
    if jnp.ndim(w0) != 2 or jnp.shape(w0)[1] != x.shape[1]:
        raise ValueError(f"w0 must be [K, {x.shape[1]}] to match the data, got {jnp.shape(w0)}")
    norms = jnp.linalg.norm(w0, axis=1)
    if not isinstance(norms, jax.core.Tracer):
        zero = np.flatnonzero(np.asarray(norms) <= 1e-12)
        if zero.size:
            raise ValueError(f"w0 rows {zero.tolist()} have zero norm; the dynamics lives on the "
                             "unit sphere and needs non-zero initial weights")
    return w0 / norms[:, None]


def sphere_init(key: jax.Array, num: int, d: int) -> jax.Array:
    """[num, d] weights uniform on the unit sphere."""
    w = jax.random.normal(key, (num, d))
    return w / jnp.linalg.norm(w, axis=1, keepdims=True)


def count_patterns(ws: jax.Array, threshold: float = 0.95) -> int:
    """Number of distinct directions among rows of `ws`, up to sign.

    Greedy clustering: a row joins the first cluster whose representative has
    |cos| >= threshold with it, else starts a new one.

    Args:
      ws: [K, d] non-zero weights.
      threshold: |cos| above which two directions are the same pattern.

    Returns:
      The number of clusters.
    """
    w = np.asarray(ws, dtype=np.float64)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    reps: list[np.ndarray] = []
    for row in w:
        if not any(abs(float(row @ r)) >= threshold for r in reps):
            reps.append(row)
    return len(reps)
