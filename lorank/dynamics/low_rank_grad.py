"""Why gradients become low rank, and why GaLore must switch subspaces (Zhao et al., 2024).

Low-rank gradients. For a reversible network (a bias-free MLP with linear, ReLU or
leaky-ReLU activations) and the l2 loss, the negative gradient of layer l is

    G = (1/N) sum_i (a_i - B_i W f_i) f_i^T,   a_i = J_i^T y_i,  B_i = J_i^T J_i,

where f_i is the layer's input and J_i the Jacobian of the output with respect to
the layer's output (`reversible_form`). If a_i, B_i and C_i = f_i f_i^T stay
constant, gradient descent W <- W + eta G gives vec(G_t) = (I - eta S)^t vec(G_0)
with S = (1/N) sum_i C_i kron B_i, and the stable rank obeys (GaLore, Lemma 3.3)

    sr(G_t) <= sr(G_par) + ((1 - eta l2) / (1 - eta l1))^(2 (t - t0))
               ||G_t0 - G_par||_F^2 / ||G_par||_2^2,

l1 < l2 the two smallest distinct eigenvalues of S and G_par the projection of
G_t0 onto l1's eigenspace (`stable_rank_bound`; eigenspaces that G_t0 has no
component in are left out, since gradient descent never reaches them).

GaLore convergence. For G = (1/N) sum_i (A_i - B_i W C_i) with positive definite
B_i, C_i (`LsqProblem`), projected SGD W <- W + eta P P^T G keeps the projected
gradient R_t = P^T G_t shrinking, ||R_t||_F <= (1 - eta kappa) ||R_{t-1}||_F with
kappa = (1/N) sum_i lambda_min(P^T B_i P) lambda_min(C_i) (`galore_kappa`), so a
fixed P stalls once R_t ~ 0; refreshing P from the current gradient every T steps
lets the full loss keep falling (`projected_sgd`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lorank.analysis.spectrum import stable_rank

REVERSIBLE = ("linear", "relu", "leaky_relu")
LOSSES = ("l2", "softmax")

Params = tuple  # (W_1, ..., W_L), W_l: [d_l, d_{l-1}]


def _act(name: str, slope: float):
    if name not in REVERSIBLE:
        raise ValueError(f"activation {name!r} does not make a reversible network; choose one "
                         f"of {REVERSIBLE}")
    if name == "linear":
        return lambda z: z
    if name == "relu":
        return jax.nn.relu
    return lambda z: jnp.where(z > 0, z, slope * z)


def mlp_init(key: jax.Array, dims: Sequence[int]) -> Params:
    """Bias-free MLP weights with He-normal scale.

    Args:
      key: PRNG key.
      dims: [d_0, ..., d_L] widths.

    Returns:
      (W_1, ..., W_L), W_l: [d_l, d_{l-1}].
    """
    if len(dims) < 2 or any(int(d) < 1 for d in dims):
        raise ValueError(f"dims must list >= 2 positive widths, got {list(dims)}")
    keys = jax.random.split(key, len(dims) - 1)
    return tuple(jax.random.normal(k, (d_out, d_in)) * jnp.sqrt(2.0 / d_in)
                 for k, d_in, d_out in zip(keys, dims[:-1], dims[1:]))


def mlp_apply(params: Params, x: jax.Array, act: str = "relu", slope: float = 0.1) -> jax.Array:
    """Forward pass: [N, d_0] -> [N, d_L], activation between layers, none after the last."""
    h = _act(act, slope)
    for w in params[:-1]:
        x = h(x @ w.T)
    return x @ params[-1].T


def loss_fn(params: Params, x: jax.Array, y: jax.Array, act: str = "relu", loss: str = "l2",
            slope: float = 0.1) -> jax.Array:
    """Mean loss over the batch.

    Args:
      params: MLP weights.
      x: [N, d_0] inputs.
      y: [N, d_L] targets (one-hot for "softmax").
      act: one of REVERSIBLE.
      loss: "l2" (1/2 ||y - out||^2) or "softmax" (cross-entropy).

    Returns:
      [] the loss.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    out = mlp_apply(params, x, act, slope)
    if loss == "l2":
        return 0.5 * jnp.mean(jnp.sum((y - out) ** 2, axis=1))
    return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(out, axis=1), axis=1))


def layer_gradients(params: Params, x: jax.Array, y: jax.Array, act: str = "relu",
                    loss: str = "l2", slope: float = 0.1) -> Params:
    """G_l = -dLoss/dW_l for every layer (the descent direction, GaLore's sign)."""
    grads = jax.grad(loss_fn)(params, x, y, act, loss, slope)
    return tuple(-g for g in grads)


class TrainLog(NamedTuple):
    """Per-step record of full-batch gradient descent.

    loss: [steps] loss before each step.
    stable_rank: [steps, L] stable rank of each layer's gradient before each step.
    grad_norm: [steps, L] Frobenius norm of each layer's gradient before each step.
    """

    loss: jax.Array
    stable_rank: jax.Array
    grad_norm: jax.Array


def train(params: Params, x: jax.Array, y: jax.Array, *, lr: float, steps: int,
          act: str = "relu", loss: str = "l2", slope: float = 0.1) -> tuple[Params, TrainLog]:
    """Full-batch gradient descent W <- W + lr G, logging per-layer stable ranks.

    Args:
      params: initial weights.
      x: [N, d_0] inputs; y: [N, d_L] targets.
      lr: learning rate (> 0).
      steps: number of steps (>= 1).
      act, loss, slope: network and loss.

    Returns:
      (final params, TrainLog).
    """
    _act(act, slope)
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    if not lr > 0 or steps < 1:
        raise ValueError(f"need lr > 0 and steps >= 1, got lr={lr}, steps={steps}")
    return _train(params, x, y, float(lr), int(steps), act, loss, float(slope))


@functools.partial(jax.jit, static_argnums=(4, 5, 6))  # steps, act, loss; lr and slope traced
def _train(params, x, y, lr, steps, act, loss, slope):
    def step(p, _):
        value, grads = jax.value_and_grad(loss_fn)(p, x, y, act, loss, slope)
        sr = jnp.stack([stable_rank(g) for g in grads])
        norm = jnp.stack([jnp.linalg.norm(g) for g in grads])
        return tuple(w - lr * g for w, g in zip(p, grads)), (value, sr, norm)

    params, (losses, srs, norms) = jax.lax.scan(step, params, None, length=steps)
    return params, TrainLog(losses, srs, norms)


def reversible_form(params: Params, x: jax.Array, y: jax.Array, layer: int, act: str = "relu",
                    slope: float = 0.1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The pieces of G_l = (1/N) sum_i (a_i - B_i W_l f_i) f_i^T for the l2 loss.

    Args:
      params: MLP weights; layer: index l in [0, L) (0 is the first layer).
      x: [N, d_0]; y: [N, d_L].

    Returns:
      (a [N, d_l], b [N, d_l, d_l], f [N, d_{l-1}]): a_i = J_i^T y_i, B_i = J_i^T J_i,
      f_i the layer input, J_i [d_L, d_l] the Jacobian of the output with respect to
      the layer's output (for reversible activations, out_i = J_i W_l f_i exactly).
    """
    if not 0 <= layer < len(params):
        raise ValueError(f"layer={layer} must be in [0, {len(params)})")
    _act(act, slope)
    return _reversible_form(tuple(params), x, y, int(layer), act, float(slope))


@functools.partial(jax.jit, static_argnums=(3, 4))  # layer, act; slope traced
def _reversible_form(params, x, y, layer, act, slope):
    h = _act(act, slope)
    f = x
    for w in params[:layer]:
        f = h(f @ w.T)

    def upper(z):
        for w in params[layer + 1:]:
            z = w @ h(z)
        return z

    z = f @ params[layer].T
    jac = jax.vmap(jax.jacfwd(upper))(z)  # [N, d_L, d_l]
    a = jnp.einsum("nok,no->nk", jac, y)
    b = jnp.einsum("nok,noj->nkj", jac, jac)
    return a, b, f


def kron_s(b: np.ndarray, f: np.ndarray) -> np.ndarray:
    """S = (1/N) sum_i (f_i f_i^T) kron B_i, acting on column-major vec(G) (float64).

    Args:
      b: [N, m, m] the B_i; f: [N, n] the layer inputs (C_i = f_i f_i^T).

    Returns:
      [n m, n m] symmetric S with vec(B W C) = S vec(W) when all B_i, C_i agree.
    """
    b = np.asarray(b, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    n_samples, m, _ = b.shape
    n = f.shape[1]
    ff = (f[:, :, None] * f[:, None, :]).reshape(n_samples, n * n)
    s = (ff.T @ b.reshape(n_samples, m * m)) / n_samples  # [(j, k), (a, b)]
    return s.reshape(n, n, m, m).transpose(0, 2, 1, 3).reshape(n * m, n * m)


def vec(g: np.ndarray) -> np.ndarray:
    """Column-major vec of [m, n] -> [m n]."""
    return np.asarray(g).T.reshape(-1)


def unvec(v: np.ndarray, m: int, n: int) -> np.ndarray:
    """Inverse of `vec`: [m n] -> [m, n]."""
    return np.asarray(v).reshape(n, m).T


class StableRankBound(NamedTuple):
    """The GaLore stable-rank bound for t >= t0 (all float64).

    lam1, lam2: the two smallest distinct eigenvalues of S that G_t0 has weight on.
    sr_parallel: sr(G_par), G_par the projection of G_t0 onto lam1's eigenspace.
    ratio: (1 - eta lam2) / (1 - eta lam1).
    excess: ||G_t0 - G_par||_F^2 / ||G_par||_2^2.
    bound: [steps + 1] the bound at t = t0, ..., t0 + steps.
    """

    lam1: float
    lam2: float
    sr_parallel: float
    ratio: float
    excess: float
    bound: np.ndarray


def stable_rank_bound(g_t0: np.ndarray, s: np.ndarray, lr: float, steps: int, *,
                      rel_tol: float = 1e-6) -> StableRankBound:
    """Evaluates the stable-rank bound of GaLore's Lemma 3.3 in NumPy float64.

    Args:
      g_t0: [m, n] the gradient at t0.
      s: [n m, n m] symmetric PSD S (`kron_s`).
      lr: the gradient-descent step eta; needs eta * lambda_max(S) < 1.
      steps: number of steps after t0.
      rel_tol: eigenvalues closer than rel_tol * lambda_max(S) are one eigenvalue,
        and eigenspaces holding less than rel_tol of ||G_t0||^2 are left out.

    Returns:
      A `StableRankBound`.
    """
    g = np.asarray(g_t0, dtype=np.float64)
    m, n = g.shape
    s = np.asarray(s, dtype=np.float64)
    if s.shape != (m * n, m * n):
        raise ValueError(f"S must be [{m * n}, {m * n}] for a [{m}, {n}] gradient, got {s.shape}")
    evals, evecs = np.linalg.eigh(s)
    top = max(float(evals[-1]), 1e-300)
    if not lr * top < 1.0:
        raise ValueError(f"lr={lr} is too large: lr * lambda_max(S) = {lr * top:.4g} must be < 1")
    coef = evecs.T @ vec(g)
    groups = _eigen_groups(evals, rel_tol * top)
    weight = [float(np.sum(coef[idx] ** 2)) for _, idx in groups]
    total = float(np.sum(coef**2))
    live = [(lam, idx) for (lam, idx), w in zip(groups, weight) if w > rel_tol * total]
    if len(live) < 2:
        raise ValueError("G_t0 lies in a single eigenspace of S: its stable rank is already "
                         "constant and the bound has no decaying term")
    (lam1, idx1), (lam2, _) = live[0], live[1]
    g_par = unvec(evecs[:, idx1] @ coef[idx1], m, n)
    spec = np.linalg.norm(g_par, 2) ** 2
    sr_par = float(np.linalg.norm(g_par) ** 2 / spec)
    excess = float(np.linalg.norm(g - g_par) ** 2 / spec)
    ratio = (1.0 - lr * lam2) / (1.0 - lr * lam1)
    bound = sr_par + ratio ** (2.0 * np.arange(steps + 1)) * excess
    return StableRankBound(float(lam1), float(lam2), sr_par, float(ratio), excess, bound)


def _eigen_groups(evals: np.ndarray, tol: float) -> list[tuple[float, np.ndarray]]:
    """Groups sorted eigenvalues closer than `tol`: [(mean value, indices), ...]."""
    groups, start = [], 0
    for i in range(1, len(evals) + 1):
        if i == len(evals) or evals[i] - evals[i - 1] > tol:
            idx = np.arange(start, i)
            groups.append((float(np.mean(evals[idx])), idx))
            start = i
    return groups


# ----------------------------------------------------------------------------------------
# GaLore convergence on G = (1/N) sum_i (A_i - B_i W C_i)


class LsqProblem(NamedTuple):
    """phi(W) = (1/N) sum_i [1/2 tr(W^T B_i W C_i) - tr(A_i^T W)], -grad phi = G.

    a: [N, m, n]; b: [N, m, m] positive definite; c: [N, n, n] positive definite.
    """

    a: jax.Array
    b: jax.Array
    c: jax.Array


def lsq_problem(key: jax.Array, m: int, n: int, num_terms: int = 3, *,
                floor: float = 0.1) -> LsqProblem:
    """Random problem with B_i = Z Z^T / m + floor I (likewise C_i) and Gaussian A_i."""
    if min(m, n, num_terms) < 1 or not floor > 0:
        raise ValueError(f"need m, n, num_terms >= 1 and floor > 0, got {m}, {n}, {num_terms}, "
                         f"{floor}")
    ka, kb, kc = jax.random.split(key, 3)
    zb = jax.random.normal(kb, (num_terms, m, m))
    zc = jax.random.normal(kc, (num_terms, n, n))
    b = zb @ jnp.swapaxes(zb, 1, 2) / m + floor * jnp.eye(m)
    c = zc @ jnp.swapaxes(zc, 1, 2) / n + floor * jnp.eye(n)
    return LsqProblem(jax.random.normal(ka, (num_terms, m, n)), b, c)


def lsq_grad(w: jax.Array, prob: LsqProblem) -> jax.Array:
    """G = (1/N) sum_i (A_i - B_i W C_i): [m, n]."""
    return jnp.mean(prob.a - prob.b @ w @ prob.c, axis=0)


def lsq_loss(w: jax.Array, prob: LsqProblem) -> jax.Array:
    """phi(W) = (1/N) sum_i [1/2 tr(W^T B_i W C_i) - tr(A_i^T W)]: []."""
    quad = jnp.einsum("mn,kmp,pq,knq->k", w, prob.b, w, prob.c)
    lin = jnp.einsum("kmn,mn->k", prob.a, w)
    return jnp.mean(0.5 * quad - lin)


def top_left_subspace(g: jax.Array, rank: int) -> jax.Array:
    """P: [m, rank] the top left singular vectors of g."""
    u, _, _ = jnp.linalg.svd(g, full_matrices=False)
    return u[:, :rank]


def galore_kappa(p: jax.Array, prob: LsqProblem) -> jax.Array:
    """kappa = (1/N) sum_i lambda_min(P^T B_i P) lambda_min(C_i) (one-sided projection)."""
    pbp = jnp.swapaxes(p, 0, 1)[None] @ prob.b @ p[None]
    return jnp.mean(jnp.linalg.eigvalsh(pbp)[:, 0] * jnp.linalg.eigvalsh(prob.c)[:, 0])


class ProjectedLog(NamedTuple):
    """Per-step record of projected SGD.

    loss: [steps + 1] phi(W_t), t = 0..steps.
    r_norm: [steps + 1] ||P_t^T G_t||_F with the projection in force at step t.
    g_norm: [steps + 1] ||G_t||_F.
    kappa: [steps + 1] kappa of the projection in force at step t.
    """

    loss: jax.Array
    r_norm: jax.Array
    g_norm: jax.Array
    kappa: jax.Array


def projected_sgd(w0: jax.Array, prob: LsqProblem, *, rank: int, lr: float, steps: int,
                  update_proj_gap: int) -> tuple[jax.Array, ProjectedLog]:
    """W <- W + lr P P^T G with P the top-`rank` left singular vectors of G, refreshed
    every `update_proj_gap` steps (at t = 0, T, 2T, ...; T >= steps keeps P fixed).

    Args:
      w0: [m, n] initial weights (m <= n: GaLore projects the shorter side).
      prob: the problem.
      rank: projection rank r in [1, m].
      lr: step size (> 0); the R_t bound needs lr * lambda_max(S) <= 1.
      steps: number of steps.
      update_proj_gap: T >= 1.

    Returns:
      (W_steps, ProjectedLog).
    """
    m, n = w0.shape
    if not 1 <= rank <= m:
        raise ValueError(f"rank={rank} must be in [1, {m}] for a [{m}, {n}] weight")
    if m > n:
        raise ValueError(f"w0 is [{m}, {n}]; pass the transpose problem so that m <= n")
    if not lr > 0 or steps < 1 or update_proj_gap < 1:
        raise ValueError(f"need lr > 0, steps >= 1, update_proj_gap >= 1; got {lr}, {steps}, "
                         f"{update_proj_gap}")
    return _projected_sgd(w0, prob, int(rank), float(lr), int(steps), int(update_proj_gap))


@functools.partial(jax.jit, static_argnums=(2, 4, 5))  # rank, steps, gap; lr traced
def _projected_sgd(w0, prob, rank, lr, steps, gap):
    def record(w, p):
        g = lsq_grad(w, prob)
        return g, (lsq_loss(w, prob), jnp.linalg.norm(p.T @ g), jnp.linalg.norm(g),
                   galore_kappa(p, prob))

    def step(carry, t):
        w, p = carry
        g = lsq_grad(w, prob)
        p = jax.lax.cond(t % gap == 0, lambda: top_left_subspace(g, rank), lambda: p)
        _, rec = record(w, p)
        w = w + lr * p @ (p.T @ g)
        return (w, p), rec

    p0 = jnp.zeros((w0.shape[0], rank), w0.dtype)
    (w, p), recs = jax.lax.scan(step, (w0, p0), jnp.arange(steps))
    p_last = top_left_subspace(lsq_grad(w, prob), rank) if steps % gap == 0 else p
    _, last = record(w, p_last)
    log = ProjectedLog(*(jnp.concatenate([r, x[None]]) for r, x in zip(recs, last)))
    return w, log
