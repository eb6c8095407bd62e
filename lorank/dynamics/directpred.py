"""Non-contrastive SSL in linear networks: BYOL/SimSiam dynamics and DirectPred (Tian, Chen, Ganguli, ICML 2021).

The model (docs/noncontrastive.md has the derivations). An input x [d_in] is seen through two
augmented views x1, x2 ~ p_aug(. | x), independent given x. The online network is linear,
W [d_out, d_in], followed by a linear predictor W_p [d_out, d_out]; the target network W_a
[d_out, d_in] is a stop-gradient copy: W itself (SimSiam) or an exponential moving average of W
(BYOL). The loss is

    J(W, W_p) = 1/2 E ||W_p W x1 - StopGrad(W_a x2)||^2,

trained by gradient flow with weight decay eta and a predictor learning rate alpha_p relative to
W's. With X = E[xbar xbar^T] (xbar = E[x' | x], the mean augmented view) and
X' = E_x[Cov(x' | x)] (the augmentation covariance), E[x1 x1^T] = X + X' and E[x1 x2^T] = X, so
(the paper's Lemma 1)

    dW_p/dt = alpha_p (-W_p W (X + X') + W_a X) W^T - eta W_p
    dW/dt   = W_p^T (-W_p W (X + X') + W_a X) - eta W
    dW_a/dt = beta (W - W_a)                                   (`byol_field`)

Collapse (`collapse_args`, `collapse_field`): without the predictor (W_p = I) and with W_a = W,
dW/dt = -W (X' + eta I); without the stop-gradient (gradients through both branches, W_a = W) and
a fixed predictor, vec(dW/dt) = -H vec(W) with the paper's
H = X' (x) (W_p^T W_p + I) + X (x) (W_p - I)^T (W_p - I) + eta I (column-major vec), which is
-W (2 X' + eta I) for W_p = I. Both are linear with a positive definite generator when eta > 0,
so W(t) = expm(-H t) W(0) -> 0 from every start (`collapse_closed_form`).

Eigenvalue dynamics (`eigen_field`). With X = I, X' = sigma^2 I, F = W X W^T, and W_p, F and the
target's W_a W^T sharing one eigenbasis (an invariant set of the flow above), the eigenvalues
p_j of W_p, s_j of F and tau_j of the target (W_a W^T = diag(tau) F) decouple:

    dp_j/dt   = alpha_p s_j [tau_j - (1 + sigma^2) p_j] - eta p_j
    ds_j/dt   = 2 p_j s_j [tau_j - (1 + sigma^2) p_j] - 2 eta s_j
    s_j dtau_j/dt = beta (1 - tau_j) s_j - tau_j (ds_j/dt) / 2      (BYOL's EMA target)

with tau_j fixed for a fixed target (SimSiam: tau_j = 1). Along every trajectory
s_j(t) = p_j(t)^2 / alpha_p + c_j e^{-2 eta t}, c_j = s_j(0) - p_j(0)^2 / alpha_p (`invariant_residual`).
On c_j = 0 the dynamics reduce to one dimension (`reduced_field`):

    dp/dt = p^2 [tau - (1 + sigma^2) p] - eta p,

with stationary points 0 (stable for eta > 0), p*_- (unstable) and p*_+ (stable),
p*_+- = (tau +- sqrt(tau^2 - 4 eta (1 + sigma^2))) / (2 (1 + sigma^2)), which exist iff
tau^2 >= 4 eta (1 + sigma^2); p*_- ~ eta / tau for small eta (`fixed_points`). Starts below p*_-
collapse to 0, starts above go to p*_+.

DirectPred (`directpred_predictor`) sets the predictor from a running estimate F_hat of E[f f^T]
(`update_correlation`): W_p = U diag(p) U^T with p_j = sqrt(s_j / max_j s_j) + eps;
DirectCopy (`directcopy_predictor`) sets W_p = F_hat / ||F_hat|| + eps I.
`commutator_alignment(f, w_p)` measures how far F and W_p are from sharing an eigenbasis.
`train_linear_byol` trains the linear network on Gaussian data by autodiff, for the comparison with
the ODE.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lorank import checks
from lorank.dynamics.solve import Trajectory, solve, solve_batch

TARGETS = ("ema", "fixed")  # BYOL's EMA target (tau evolves) or a fixed tau (SimSiam: tau = 1)
CORRELATION_NORMS = ("spectral", "frobenius")


# ----- hyperparameters --------------------------------------------------------------------------

def _check_rate(name: str, value, *, positive: bool = False) -> None:
    checks.number(name, value, low=0.0, low_open=positive)


class EigenArgs(NamedTuple):
    """Hyperparameters of the eigenvalue dynamics (each a scalar, or [B] when vmapped).

    alpha_p: predictor learning rate relative to W's (> 0).
    eta: weight decay (>= 0).
    sigma2: augmentation variance sigma^2 (X' = sigma^2 I, >= 0).
    beta: EMA rate of the target, dW_a/dt = beta (W - W_a) (>= 0; unused for a fixed target).
    ema: 1.0 for BYOL's EMA target (tau evolves), 0.0 for a fixed tau.
    """

    alpha_p: jax.Array | float
    eta: jax.Array | float
    sigma2: jax.Array | float
    beta: jax.Array | float
    ema: jax.Array | float


def eigen_args(*, alpha_p: float = 1.0, eta: float = 0.0, sigma2: float = 0.0, beta: float = 1.0,
               target: str = "ema") -> EigenArgs:
    """Checked `EigenArgs`.

    Raises:
      ValueError: alpha_p <= 0, eta < 0, sigma2 < 0, beta < 0, or target not in TARGETS (each named).
    """
    _check_rate("alpha_p", alpha_p, positive=True)
    _check_rate("eta", eta)
    _check_rate("sigma2", sigma2)
    _check_rate("beta", beta)
    checks.one_of("target", target, TARGETS)
    return EigenArgs(float(alpha_p), float(eta), float(sigma2), float(beta), 1.0 if target == "ema" else 0.0)


class ReducedArgs(NamedTuple):
    """Hyperparameters of the 1-D reduced dynamics (scalars, or [B] when vmapped).

    tau: the (fixed) target eigenvalue (> 0); eta: weight decay (>= 0); sigma2: augmentation variance (>= 0).
    """

    tau: jax.Array | float
    eta: jax.Array | float
    sigma2: jax.Array | float


def reduced_args(*, tau: float = 1.0, eta: float = 0.0, sigma2: float = 0.0) -> ReducedArgs:
    """Checked `ReducedArgs`.

    Raises:
      ValueError: tau <= 0, eta < 0 or sigma2 < 0 (each named).
    """
    _check_rate("tau", tau, positive=True)
    _check_rate("eta", eta)
    _check_rate("sigma2", sigma2)
    return ReducedArgs(float(tau), float(eta), float(sigma2))


# ----- Lemma 1: the full linear dynamics ---------------------------------------------------------

class ByolState(NamedTuple):
    """Weights of the linear BYOL network.

    w: [d_out, d_in] online network; w_p: [d_out, d_out] predictor; w_a: [d_out, d_in] target.
    """

    w: jax.Array
    w_p: jax.Array
    w_a: jax.Array


class ByolArgs(NamedTuple):
    """Data statistics and hyperparameters of `byol_field`.

    x_cov: [d_in, d_in] X = E[xbar xbar^T]; x_prime_cov: [d_in, d_in] X' = E[Cov(x' | x)];
    alpha_p, eta, beta: as in `EigenArgs` (scalars).
    """

    x_cov: jax.Array
    x_prime_cov: jax.Array
    alpha_p: jax.Array | float
    eta: jax.Array | float
    beta: jax.Array | float


def byol_field(t, y: ByolState, args: ByolArgs) -> ByolState:
    """Lemma 1: the gradient flow of J with stop-gradient on the target, weight decay and an EMA target.

    Args:
      t: time (unused).
      y: `ByolState` (w [d_out, d_in], w_p [d_out, d_out], w_a [d_out, d_in]).
      args: `ByolArgs`.

    Returns:
      The velocity, a `ByolState` of the same shapes.
    """
    del t
    w, w_p, w_a = y
    x, xp = args.x_cov, args.x_prime_cov
    resid = -w_p @ w @ (x + xp) + w_a @ x  # [d_out, d_in]
    dw_p = args.alpha_p * resid @ w.T - args.eta * w_p
    dw = w_p.T @ resid - args.eta * w
    dw_a = args.beta * (w - w_a)
    return ByolState(dw, dw_p, dw_a)


def expected_loss(w_online: jax.Array, w_target: jax.Array, x_cov: jax.Array, x_prime_cov: jax.Array) -> jax.Array:
    """1/2 E ||A x1 - B x2||^2 in closed form for A = w_online, B = w_target [d_out, d_in]:
    1/2 tr(A (X + X') A^T) - tr(A X B^T) + 1/2 tr(B (X + X') B^T). Its autodiff gradient checks the fields."""
    s = x_cov + x_prime_cov
    return 0.5 * jnp.trace(w_online @ s @ w_online.T) - jnp.trace(w_online @ x_cov @ w_target.T) \
        + 0.5 * jnp.trace(w_target @ s @ w_target.T)


# ----- collapse: no predictor, no stop-gradient --------------------------------------------------

COLLAPSE_VARIANTS = ("no_predictor", "no_stop_gradient")


class CollapseArgs(NamedTuple):
    """A collapsing variant as dW/dt = -L' W X' - L W X - eta W, i.e. vec(dW/dt) = -H vec(W) with
    H = X' (x) L' + X (x) L + eta I (column-major vec).

    x_cov: [d_in, d_in] X; x_prime_cov: [d_in, d_in] X' (PSD); left_prime, left_x: [d_out, d_out] L', L
    (both PSD); eta: weight decay. `collapse_args` builds them for each variant.
    """

    x_cov: jax.Array
    x_prime_cov: jax.Array
    left_prime: jax.Array
    left_x: jax.Array
    eta: jax.Array | float


def collapse_args(x_cov, x_prime_cov, *, d_out: int, variant: str, w_p=None, eta: float = 0.0) -> CollapseArgs:
    """Checked `CollapseArgs` of a variant.

    "no_predictor": W_p = I, stop-gradient kept, target W_a = W (SimSiam without its predictor):
      -grad_W J = -W (X + X') + W X, so dW/dt = -W (X' + eta I): L' = I, L = 0.
    "no_stop_gradient": gradients through both branches (W_a = W), a fixed predictor W_p (None: I):
      dW/dt = -(W_p^T W_p + I) W X' - (W_p - I)^T (W_p - I) W X - eta W, the paper's
      H = X' (x) (W_p^T W_p + I) + X (x) (W_p - I)^T (W_p - I) + eta I; -W (2 X' + eta I) for W_p = I.

    Raises:
      ValueError: an unknown variant, non-square or mismatched covariances, a w_p not [d_out, d_out],
        a w_p with the no_predictor variant, or eta < 0 (named).
    """
    checks.one_of("variant", variant, COLLAPSE_VARIANTS)
    x_cov, x_prime_cov = jnp.asarray(x_cov), jnp.asarray(x_prime_cov)
    if x_cov.ndim != 2 or x_cov.shape[0] != x_cov.shape[1] or x_prime_cov.shape != x_cov.shape:
        raise ValueError(f"x_cov {x_cov.shape} and x_prime_cov {x_prime_cov.shape} must be the same square shape")
    d_out = checks.integer("d_out", d_out, minimum=1)
    _check_rate("eta", eta)
    eye = jnp.eye(d_out, dtype=x_cov.dtype)
    if variant == "no_predictor":
        if w_p is not None:
            raise ValueError("variant 'no_predictor' has no w_p (it is the identity); got one")
        return CollapseArgs(x_cov, x_prime_cov, eye, jnp.zeros_like(eye), float(eta))
    w_p = eye if w_p is None else jnp.asarray(w_p, x_cov.dtype)
    if w_p.shape != (d_out, d_out):
        raise ValueError(f"w_p must be [{d_out}, {d_out}], got {w_p.shape}")
    return CollapseArgs(x_cov, x_prime_cov, w_p.T @ w_p + eye, (w_p - eye).T @ (w_p - eye), float(eta))


def collapse_field(t, w: jax.Array, args: CollapseArgs) -> jax.Array:
    """dW/dt = -L' W X' - L W X - eta W of a collapsing variant.

    Args:
      t: time (unused).
      w: [d_out, d_in] online weights.
      args: `CollapseArgs`.

    Returns:
      [d_out, d_in] velocity.
    """
    del t
    return -args.left_prime @ w @ args.x_prime_cov - args.left_x @ w @ args.x_cov - args.eta * w


def collapse_generator(args: CollapseArgs) -> jax.Array:
    """H = X' (x) L' + X (x) L + eta I [d_in d_out, d_in d_out], with vec(dW/dt) = -H vec(W)
    (column-major vec: vec(A W B) = (B^T (x) A) vec W). Symmetric PSD, definite for eta > 0."""
    d = args.left_x.shape[0] * args.x_cov.shape[0]
    return (jnp.kron(args.x_prime_cov, args.left_prime) + jnp.kron(args.x_cov, args.left_x)
            + args.eta * jnp.eye(d, dtype=args.x_cov.dtype))


def vec(w: jax.Array) -> jax.Array:
    """Column-major vec: [d_out, d_in] -> [d_in d_out]."""
    return w.T.reshape(-1)


def unvec(v: jax.Array, d_out: int) -> jax.Array:
    """Inverse of `vec`: [d_in d_out] -> [d_out, d_in]."""
    return v.reshape(-1, d_out).T


def collapse_closed_form(w0: jax.Array, ts: jax.Array, args: CollapseArgs) -> jax.Array:
    """W(t) = unvec(expm(-H t) vec(W0)) at each time: [T, d_out, d_in] for w0 [d_out, d_in], ts [T].

    H is symmetric, so expm(-H t) = V diag(e^{-lambda t}) V^T from one eigendecomposition
    (the tests compare it with SciPy's expm)."""
    lam, v = jnp.linalg.eigh(collapse_generator(args))
    coef = v.T @ vec(w0)
    ts = jnp.asarray(ts, w0.dtype)
    return jax.vmap(lambda t: unvec(v @ (jnp.exp(-lam * t) * coef), w0.shape[0]))(ts)


def simulate_collapse(w0: jax.Array, args: CollapseArgs, t1: float, *, num_saves: int = 50, rtol: float = 1e-8,
                      atol: float = 1e-10, chunk_size: int | None = None) -> Trajectory:
    """Integrates `collapse_field` from a batch of starts (every variant shares one compiled program per shape).

    Args:
      w0: [B, d_out, d_in] initial online weights.
      args: `CollapseArgs` (shared by every start).
      t1: horizon; saves at num_saves evenly spaced times in [0, t1].

    Returns:
      Trajectory with ts [T] and ys [B, T, d_out, d_in].
    """
    if jnp.ndim(w0) != 3 or jnp.shape(w0)[1] != args.left_x.shape[0] or jnp.shape(w0)[2] != args.x_cov.shape[0]:
        raise ValueError(f"w0 must be [B, {args.left_x.shape[0]}, {args.x_cov.shape[0]}], got {jnp.shape(w0)}")
    return _simulate_collapse(w0, args, float(t1), int(num_saves), float(rtol), float(atol), chunk_size)


@functools.partial(jax.jit, static_argnums=(3, 6))
def _simulate_collapse(w0, args, t1, num_saves, rtol, atol, chunk_size):
    return solve_batch(collapse_field, w0, t1, chunk_size=chunk_size, args=args, ts=jnp.linspace(0.0, t1, num_saves),
                       rtol=rtol, atol=atol)


# ----- eigenvalue dynamics -----------------------------------------------------------------------

class EigenState(NamedTuple):
    """Eigenvalues along the shared eigenbasis, each [d] (or [B, d], [B, T, d]).

    p: of the predictor W_p; s: of F = W X W^T (>= 0); tau: of the target, W_a W^T = diag(tau) F.
    """

    p: jax.Array
    s: jax.Array
    tau: jax.Array


def eigen_field(t, y: EigenState, args: EigenArgs) -> EigenState:
    """The decoupled eigenvalue dynamics of every direction j (module docstring).

    Args:
      t: time (unused).
      y: `EigenState` with p, s, tau [d].
      args: `EigenArgs` (scalars).

    Returns:
      The velocity, an `EigenState` [d] each. With args.ema = 0, dtau/dt = 0.
    """
    del t
    p, s, tau = y
    gain = tau - (1.0 + args.sigma2) * p
    dp = args.alpha_p * s * gain - args.eta * p
    g = p * gain - args.eta  # (ds/dt) / (2 s)
    ds = 2.0 * s * g
    dtau = args.ema * (args.beta * (1.0 - tau) - tau * g)
    return EigenState(dp, ds, dtau)


class AmplitudeState(NamedTuple):
    """Per-direction amplitudes of the aligned BYOL network, each [d] (or [B, d], [B, T, d]).

    p: eigenvalue of W_p; w: amplitude of W along the direction (s = w^2); a: amplitude of the
    target W_a along it (tau = a / w, so s tau = w a).
    """

    p: jax.Array
    w: jax.Array
    a: jax.Array


def amplitude_field(t, y: AmplitudeState, args: EigenArgs) -> AmplitudeState:
    """`eigen_field` of BYOL's EMA target in the coordinates (p, w, a), s = w^2, tau = a / w:

        dp/dt = alpha_p (w a - (1 + sigma^2) p w^2) - eta p
        dw/dt = p a - ((1 + sigma^2) p^2 + eta) w
        da/dt = beta (w - a)

    Lemma 1 restricted to one direction of the shared eigenbasis. The same flow as `eigen_field`
    where w != 0, and regular where w crosses 0 (a collapsing direction), where tau = a / w is not.
    args.ema is ignored (the target is the EMA).
    """
    del t
    p, w, a = y
    dp = args.alpha_p * (w * a - (1.0 + args.sigma2) * p * w**2) - args.eta * p
    dw = p * a - ((1.0 + args.sigma2) * p**2 + args.eta) * w
    return AmplitudeState(dp, dw, args.beta * (w - a))


def simulate_amplitudes(y0: AmplitudeState, args: EigenArgs, t1: float, *, num_saves: int = 50,
                        rtol: float = 1e-8, atol: float = 1e-10) -> Trajectory:
    """Integrates `amplitude_field` from a batch of starts y0 (p, w, a each [B, d]); ys [B, T, d] each."""
    shapes = {jnp.shape(leaf) for leaf in y0}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"y0's p, w, a must all be [B, d], got shapes {[jnp.shape(v) for v in y0]}")
    return _simulate_amplitudes(y0, args, float(t1), int(num_saves), float(rtol), float(atol))


@functools.partial(jax.jit, static_argnums=(3,))
def _simulate_amplitudes(y0, args, t1, num_saves, rtol, atol):
    return solve_batch(amplitude_field, y0, t1, args=args, ts=jnp.linspace(0.0, t1, num_saves), rtol=rtol, atol=atol)


def simulate_eigen(y0: EigenState, args: EigenArgs, t1: float, *, num_saves: int = 50, rtol: float = 1e-8,
                   atol: float = 1e-10, solver: str = "tsit5", chunk_size: int | None = None) -> Trajectory:
    """Integrates `eigen_field` from a batch of starts in one jitted, vmapped program.

    Args:
      y0: `EigenState` with p, s, tau [B, d] (s >= 0).
      args: `EigenArgs` shared by every start.
      t1: horizon; saves at num_saves evenly spaced times in [0, t1].
      rtol, atol, solver: passed to `solve`.
      chunk_size: starts per vmapped solve (`solve_batch`); None: all at once.

    Returns:
      Trajectory with ts [T] and ys an `EigenState` of [B, T, d] arrays.

    Raises:
      ValueError: leaves of y0 not all [B, d], or a negative s (named with its index).
    """
    shapes = {jnp.shape(leaf) for leaf in y0}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"y0's p, s, tau must all be [B, d], got shapes {[jnp.shape(v) for v in y0]}")
    s = np.asarray(y0.s)
    if np.any(s < 0):
        raise ValueError(f"y0.s must be >= 0 (eigenvalues of F), got {s.min()} at {np.argwhere(s < 0)[0].tolist()}")
    return _simulate_eigen(y0, args, float(t1), int(num_saves), float(rtol), float(atol), solver, chunk_size)


@functools.partial(jax.jit, static_argnums=(3, 6, 7))
def _simulate_eigen(y0, args, t1, num_saves, rtol, atol, solver, chunk_size):
    return solve_batch(eigen_field, y0, t1, chunk_size=chunk_size, args=args, ts=jnp.linspace(0.0, t1, num_saves),
                       rtol=rtol, atol=atol, solver=solver)


def invariant_constant(p0: jax.Array, s0: jax.Array, alpha_p) -> jax.Array:
    """c_j = s_j(0) - p_j(0)^2 / alpha_p, the constant of s_j(t) = p_j(t)^2 / alpha_p + c_j e^{-2 eta t}."""
    return s0 - p0**2 / alpha_p


def invariant_residual(ts: jax.Array, ys: EigenState, args: EigenArgs) -> jax.Array:
    """|s_j(t) - p_j(t)^2 / alpha_p - c_j e^{-2 eta t}| along trajectories ys [..., T, d] saved at ts [T]
    (c_j from the first save, which must be t = 0)."""
    c = invariant_constant(ys.p[..., :1, :], ys.s[..., :1, :], args.alpha_p)
    decay = jnp.exp(-2.0 * args.eta * (ts - ts[0]))[:, None]
    return jnp.abs(ys.s - ys.p**2 / args.alpha_p - c * decay)


# ----- the 1-D reduced dynamics ------------------------------------------------------------------

def reduced_field(t, p: jax.Array, args: ReducedArgs) -> jax.Array:
    """dp/dt = p^2 [tau - (1 + sigma^2) p] - eta p, elementwise over p."""
    del t
    return p**2 * (args.tau - (1.0 + args.sigma2) * p) - args.eta * p


def reduced_slope(p, args: ReducedArgs):
    """d(dp/dt)/dp = 2 tau p - 3 (1 + sigma^2) p^2 - eta: negative at a stable stationary point."""
    return 2.0 * args.tau * p - 3.0 * (1.0 + args.sigma2) * p**2 - args.eta


class FixedPoints(NamedTuple):
    """Stationary points of `reduced_field` besides 0 (NaN where they do not exist).

    minus: p*_- (unstable: the collapse threshold); plus: p*_+ (stable); exists: tau^2 >= 4 eta (1 + sigma^2).
    """

    minus: np.ndarray
    plus: np.ndarray
    exists: np.ndarray


def fixed_points(tau, eta, sigma2) -> FixedPoints:
    """p*_+- = (tau +- sqrt(tau^2 - 4 eta (1 + sigma^2))) / (2 (1 + sigma^2)), broadcast over the
    arguments in float64. p*_- is computed as 2 eta / (tau + sqrt(...)) (the same root, without cancellation)."""
    tau, eta, sigma2 = (np.asarray(v, np.float64) for v in (tau, eta, sigma2))
    a = 1.0 + sigma2
    disc = tau**2 - 4.0 * eta * a
    exists = disc >= 0
    root = np.sqrt(np.where(exists, disc, np.nan))
    return FixedPoints(minus=2.0 * eta / (tau + root), plus=(tau + root) / (2.0 * a), exists=exists)


def simulate_reduced(p0: jax.Array, args: ReducedArgs, t1: float, *, num_saves: int = 50, rtol: float = 1e-8,
                     atol: float = 1e-12, time_unit_eta: bool = False) -> Trajectory:
    """Integrates `reduced_field` for a batch of starts, each with its own hyperparameters, in one program.

    Args:
      p0: [B] starts.
      args: `ReducedArgs` of scalars or [B] arrays (vmapped together with p0).
      t1: horizon; with time_unit_eta, in units of 1 / eta (the field is divided by eta, eta > 0).
      num_saves: saves evenly spaced in [0, t1].

    Returns:
      Trajectory with ts [T] and ys [B, T].
    """
    p0 = jnp.asarray(p0)
    if p0.ndim != 1:
        raise ValueError(f"p0 must be [B], got shape {p0.shape}")
    args = ReducedArgs(*(jnp.broadcast_to(jnp.asarray(v, p0.dtype), p0.shape) for v in args))
    if time_unit_eta and not checks.is_traced(args.eta) and bool(jnp.any(args.eta <= 0)):
        raise ValueError("time_unit_eta needs eta > 0 for every start")
    return _simulate_reduced(p0, args, float(t1), int(num_saves), float(rtol), float(atol), bool(time_unit_eta))


def _scaled_reduced_field(t, p, args):
    return reduced_field(t, p, args) / args.eta


@functools.partial(jax.jit, static_argnums=(3, 6))
def _simulate_reduced(p0, args, t1, num_saves, rtol, atol, time_unit_eta):
    field = _scaled_reduced_field if time_unit_eta else reduced_field
    ts = jnp.linspace(0.0, t1, num_saves)
    traj = jax.vmap(lambda p, a: solve(field, p, t1, args=a, ts=ts, rtol=rtol, atol=atol))(p0, args)
    return traj._replace(ts=traj.ts[0])


# ----- DirectPred, DirectCopy, the running correlation, alignment --------------------------------

def _check_square(name: str, m: jax.Array) -> None:
    if jnp.ndim(m) != 2 or jnp.shape(m)[0] != jnp.shape(m)[1]:
        raise ValueError(f"{name} must be a square [d, d] matrix, got shape {jnp.shape(m)}")


def directpred_predictor(f_hat: jax.Array, *, eps: float = 0.01, eps_inside_root: bool = False) -> jax.Array:
    """DirectPred: W_p = U diag(p) U^T from F_hat = U diag(s) U^T (jnp.linalg.eigh of its symmetric part).

    p_j = sqrt(max(s_j, 0) / max_j s_j) + eps, or with eps_inside_root sqrt(max(s_j, 0) / max_j s_j + eps).
    Negative eigenvalues (round-off of a PSD estimate) are clipped to 0, so p_j = eps (sqrt(eps)) there;
    an F_hat with no positive eigenvalue gives p = eps (sqrt(eps)) everywhere.

    Args:
      f_hat: [d, d] correlation estimate (symmetric PSD up to round-off).
      eps: >= 0.
      eps_inside_root: where eps is added.

    Returns:
      [d, d] symmetric predictor.

    Raises:
      ValueError: a non-square f_hat or eps < 0 (named).
    """
    _check_square("f_hat", f_hat)
    checks.number("eps", eps, low=0.0)
    s, u = jnp.linalg.eigh(0.5 * (f_hat + f_hat.T))
    s = jnp.maximum(s, 0.0)
    top = s[-1]
    ratio = jnp.where(top > 0, s / jnp.where(top > 0, top, 1.0), 0.0)
    p = jnp.sqrt(ratio + eps) if eps_inside_root else jnp.sqrt(ratio) + eps
    return (u * p) @ u.T


def directcopy_predictor(f_hat: jax.Array, *, eps: float = 0.01, normalize: bool = True,
                         norm: str = "spectral") -> jax.Array:
    """DirectCopy: W_p = F_hat / ||F_hat|| + eps I (no eigendecomposition for the Frobenius norm).

    Args:
      f_hat: [d, d] correlation estimate.
      eps: >= 0.
      normalize: divide by the norm (False: F_hat + eps I, as the public luckmatters code does).
      norm: "spectral" (the largest |eigenvalue| of the symmetric part, the normalization under which
        DirectSet(1/2) is DirectPred) or "frobenius".

    Returns:
      [d, d] predictor (F_hat's zero matrix stays zero before eps I).

    Raises:
      ValueError: a non-square f_hat, eps < 0, or an unknown norm (named).
    """
    _check_square("f_hat", f_hat)
    checks.number("eps", eps, low=0.0)
    checks.one_of("norm", norm, CORRELATION_NORMS)
    eye = jnp.eye(f_hat.shape[0], dtype=f_hat.dtype)
    if not normalize:
        return f_hat + eps * eye
    if norm == "frobenius":
        scale = jnp.linalg.norm(f_hat)
    else:
        scale = jnp.max(jnp.abs(jnp.linalg.eigvalsh(0.5 * (f_hat + f_hat.T))))
    return jnp.where(scale > 0, f_hat / jnp.where(scale > 0, scale, 1.0), 0.0) + eps * eye


def update_correlation(f_hat: jax.Array, f1: jax.Array, f2: jax.Array, rho, *, centered: bool = False) -> jax.Array:
    """F_hat <- rho F_hat + (1 - rho) E[f f^T], the mean over the online projector outputs of both views.

    Args:
      f_hat: [d, d] running estimate.
      f1, f2: [N, d] outputs of the two views.
      rho: in [0, 1) (may be traced).
      centered: subtract the mean of the 2N rows first (a covariance instead of a correlation).

    Returns:
      [d, d] updated estimate.

    Raises:
      ValueError: rho outside [0, 1), or mismatched shapes (named).
    """
    checks.number("rho", rho, low=0.0, high=1.0, high_open=True)
    _check_square("f_hat", f_hat)
    if jnp.ndim(f1) != 2 or jnp.shape(f1) != jnp.shape(f2) or jnp.shape(f1)[1] != f_hat.shape[0]:
        raise ValueError(f"f1 {jnp.shape(f1)} and f2 {jnp.shape(f2)} must both be [N, {f_hat.shape[0]}]")
    f = jnp.concatenate([f1, f2], axis=0)
    if centered:
        f = f - jnp.mean(f, axis=0, keepdims=True)
    return rho * f_hat + (1.0 - rho) * (f.T @ f) / f.shape[0]


def commutator_alignment(f: jax.Array, w_p: jax.Array) -> jax.Array:
    """||F W_p - W_p F||_F / (||F||_F ||W_p||_F): 0 when F and W_p commute (a shared eigenbasis for
    symmetric ones), invariant to scaling either; 0 if either is zero. f, w_p: [d, d] (leading batch axes allowed)."""
    comm = f @ w_p - w_p @ f
    num = jnp.sqrt(jnp.sum(comm**2, axis=(-2, -1)))
    den = jnp.sqrt(jnp.sum(f**2, axis=(-2, -1)) * jnp.sum(w_p**2, axis=(-2, -1)))
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


# ----- linear BYOL trained by autodiff -----------------------------------------------------------

class ByolRun(NamedTuple):
    """Hyperparameters of `train_linear_byol`.

    lr: SGD step (time per step: the flow's t = step * lr); steps: SGD steps; batch: samples per step;
    alpha_p: predictor rate relative to W's; eta: weight decay; sigma2: augmentation variance;
    beta: EMA rate per unit time (W_a += lr beta (W - W_a), BYOL's momentum 1 - lr beta);
    record_every: steps between saves.
    """

    lr: float
    steps: int
    batch: int
    alpha_p: float
    eta: float
    sigma2: float
    beta: float
    record_every: int


def byol_run(*, lr: float, steps: int, batch: int, alpha_p: float = 1.0, eta: float = 0.0, sigma2: float = 0.0,
             beta: float = 1.0, record_every: int = 10) -> ByolRun:
    """Checked `ByolRun`.

    Raises:
      ValueError: lr <= 0, lr beta > 1, steps/batch/record_every < 1, steps not a multiple of record_every,
        alpha_p <= 0, eta/sigma2/beta < 0 (named).
    """
    _check_rate("lr", lr, positive=True)
    for name, value in (("steps", steps), ("batch", batch), ("record_every", record_every)):
        checks.integer(name, value, minimum=1)
    if steps % record_every:
        raise ValueError(f"steps={steps} must be a multiple of record_every={record_every}")
    _check_rate("alpha_p", alpha_p, positive=True)
    _check_rate("eta", eta)
    _check_rate("sigma2", sigma2)
    _check_rate("beta", beta)
    if lr * beta > 1:
        raise ValueError(f"lr * beta = {lr * beta} must be <= 1 (the EMA step), got lr={lr}, beta={beta}")
    return ByolRun(float(lr), int(steps), int(batch), float(alpha_p), float(eta), float(sigma2), float(beta),
                   int(record_every))


def sampled_loss(w: jax.Array, w_p: jax.Array, w_a: jax.Array, x1: jax.Array, x2: jax.Array) -> jax.Array:
    """The symmetrized sample loss 1/4 mean ||W_p W x1 - sg(W_a x2)||^2 + ||W_p W x2 - sg(W_a x1)||^2
    (its expectation is J); x1, x2 [N, d_in]."""
    w_a = jax.lax.stop_gradient(w_a)
    e1 = x1 @ w.T @ w_p.T - x2 @ w_a.T
    e2 = x2 @ w.T @ w_p.T - x1 @ w_a.T
    return 0.25 * (jnp.mean(jnp.sum(e1**2, -1)) + jnp.mean(jnp.sum(e2**2, -1)))


def train_linear_byol(y0: ByolState, run: ByolRun, key: jax.Array) -> tuple[ByolState, ByolState]:
    """SGD on `sampled_loss` with x ~ N(0, I), x' = x + N(0, sigma^2 I) (so X = I, X' = sigma^2 I),
    weight decay eta on W and W_p, the predictor's gradient scaled by alpha_p, and the EMA target,
    in one `lax.scan`; batches are a pure function of (key, step).

    Args:
      y0: initial `ByolState` (w [d_out, d_in], w_p [d_out, d_out], w_a [d_out, d_in]).
      run: `ByolRun`.
      key: PRNG key of the data.

    Returns:
      (final state, saved states with a leading [steps / record_every + 1] axis, the first the start).
    """
    return _train(y0, run, key)


@functools.partial(jax.jit, static_argnums=(1,))
def _train(y0, run, key):
    d_in = y0.w.shape[1]
    grad = jax.grad(sampled_loss, argnums=(0, 1))

    def step(state, i):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
        x = jax.random.normal(k1, (run.batch, d_in), y0.w.dtype)
        noise = jnp.sqrt(run.sigma2)
        x1 = x + noise * jax.random.normal(k2, x.shape, x.dtype)
        x2 = x + noise * jax.random.normal(k3, x.shape, x.dtype)
        g_w, g_p = grad(state.w, state.w_p, state.w_a, x1, x2)
        w = state.w - run.lr * (g_w + run.eta * state.w)
        w_p = state.w_p - run.lr * (run.alpha_p * g_p + run.eta * state.w_p)
        w_a = state.w_a + run.lr * run.beta * (w - state.w_a)
        return ByolState(w, w_p, w_a), None

    def block(state, b):
        state, _ = jax.lax.scan(step, state, b * run.record_every + jnp.arange(run.record_every))
        return state, state

    final, saved = jax.lax.scan(block, y0, jnp.arange(run.steps // run.record_every))
    saved = jax.tree.map(lambda a0, a: jnp.concatenate([a0[None], a]), y0, saved)
    return final, saved


def measured_eigen(states: ByolState, x_cov: jax.Array | None = None) -> tuple[EigenState, jax.Array]:
    """The eigen-variables of trained weights along F's eigenbasis, and the alignment metric.

    F = W X W^T (X = I by default) = U diag(s) U^T (eigh, ascending); p_j = u_j^T W_p u_j;
    tau_j = u_j^T W_a W^T u_j / s_j (NaN where s_j <= 1e-9 max s: a collapsed direction has no tau).
    Eigenvalues of F below zero by round-off are clipped to 0.

    Args:
      states: `ByolState` with any leading axes ([T] for a saved run).
      x_cov: [d_in, d_in] X, or None for the identity.

    Returns:
      (EigenState of [..., d_out] arrays, commutator_alignment(F, W_p) [...]).
    """
    w, w_p, w_a = states
    f = w @ w.swapaxes(-1, -2) if x_cov is None else w @ x_cov @ w.swapaxes(-1, -2)
    s, u = jnp.linalg.eigh(f)
    s = jnp.maximum(s, 0.0)  # round-off below zero
    p = jnp.einsum("...ij,...ik,...kj->...j", u, w_p, u)
    cross = w_a @ w.swapaxes(-1, -2) if x_cov is None else w_a @ x_cov @ w.swapaxes(-1, -2)
    live = s > 1e-9 * jnp.max(s, axis=-1, keepdims=True)
    tau = jnp.where(live, jnp.einsum("...ij,...ik,...kj->...j", u, cross, u) / jnp.where(live, s, 1.0), jnp.nan)
    return EigenState(p, s, tau), commutator_alignment(f, w_p)


def measured_amplitudes(states: ByolState) -> tuple[AmplitudeState, jax.Array]:
    """`AmplitudeState` of trained weights (X = I) along F's eigenbasis (ascending s): w_j = sqrt(s_j),
    a_j = u_j^T W_a W^T u_j / w_j (0 where s_j <= 1e-9 max s), p_j = u_j^T W_p u_j; and the alignment."""
    eig, align = measured_eigen(states)
    w = jnp.sqrt(eig.s)
    live = eig.s > 1e-9 * jnp.max(eig.s, axis=-1, keepdims=True)
    return AmplitudeState(eig.p, w, jnp.where(live, jnp.nan_to_num(eig.tau) * w, 0.0)), align
