"""JoMA: the joint dynamics of MLP and attention (Tian, Wang, Zhang, Chen, Du, ICLR 2024).

The model (one block, one query token, docs/joma.md has the derivations):
  U [d, M_C + 1]: orthonormal columns; U_C = U[:, :M_C] embeds the M_C contextual tokens and
    u_q = U[:, M_C] the query, orthogonal to them.
  x [N, M_C]: the token-frequency vector of each of N sequences (non-negative).
  z [M_C]: the attention logits of the query to the contextual tokens (a free parameter, as in
    the paper), divided by a temperature T.
  b = x ∘ a(z / T): attention over tokens, with a(s) = s ("linear"), e^s ("exp"), or e^s
    normalized so that b sums to one ("softmax").
  f = U_C b + u_q [N, d] (the residual keeps the query's embedding).
  h_k = phi(w_k^T f) [N, K]: an MLP of K nodes, W = [w_1 .. w_K] [d, K], phi linear or not.
  logits = h ("identity" classifier, K = number of classes, the paper's toy) or h C [N, classes];
  cross-entropy, weighted over sequences. Trained by autodiff (`train`: SGD or Adam steps,
  `flow`: the gradient flow through `lorank.dynamics.solve`) with rate eta_z on z, eta_w on W and
  eta_c on C; v_k = U_C^T w_k, V = U_C^T W [M_C, K].

Theorem 1 (`predicted_z`), with r = eta_z / eta_w, under gradient flow, for any phi, classifier
and loss:
  linear:  z^2 = r sum_k v_k^2 + c                         (the temperature cancels)
  exp:     z = r / (2T) sum_k v_k^2 + c
  softmax: z ≈ r / (2T) (sum_k v_k^2 - ||V||_F^2 b_bar) + c  (b_bar = E[b] treated as constant)
elementwise over tokens. Under plain SGD the first two hold exactly once the per-step squares are
added back (`discrete_residual`).

The ODEs of Theorems 2-4 and of K > 1 nodes (time rescaled, A the softmax normalizer):
  `linear_field`:    dv/dt = Delta ∘ exp(v^2 / s) / A           (Theorem 2, s = 2)
  `nonlinear_field`: dv/dt = (mu - v) ∘ exp(v^2 / s) / A        (Theorems 3-4; the public code: s = 3)
  `nodes_field`:     dV/dt = diag(exp(sum_k V_lk^2 / s)) Delta / A   (K > 1)
with A = sum_l xbar_l exp(e_l) over the same exponent e (or A = 1), integrated with
`lorank.dynamics.solve.solve_batch`, vmapped over initial conditions. Around them: the conserved
quantity erf(v_l / sqrt(s)) / Delta_l of the linear ODE, its finite limits, fitted convergence
rates, attention entropy and the stable rank of V(t).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.special as jsp
import numpy as np
import optax

from lorank import checks
from lorank.analysis.attention import row_entropy
from lorank.analysis.spectrum import stable_rank
from lorank.dynamics.solve import Trajectory, solve, solve_batch

ATTENTIONS = ("linear", "exp", "softmax")
ACTIVATIONS = ("linear", "relu", "tanh", "silu", "gelu", "sigmoid")
CLASSIFIERS = ("identity", "linear")
OPTIMIZERS = ("sgd", "adam")
NODE_EXPONENTS = ("sum", "sum_of_exp")

_PHI = {"linear": lambda s: s, "relu": jax.nn.relu, "tanh": jnp.tanh, "silu": jax.nn.silu,
        "gelu": jax.nn.gelu, "sigmoid": jax.nn.sigmoid}


# ----- the model ----------------------------------------------------------------------------------

class Model(NamedTuple):
    """Static settings of the block (hashable: they fix the program).

    attention: "linear", "exp" or "softmax" (the a(.) of b = x ∘ a(z / T)).
    temperature: T > 0, dividing the logits z.
    activation: phi of the MLP nodes, one of ACTIVATIONS.
    classifier: "identity" (logits = h, K = number of classes) or "linear" (logits = h C).
    """

    attention: str = "softmax"
    temperature: float = 1.0
    activation: str = "linear"
    classifier: str = "identity"


def check_model(model: Model) -> Model:
    """Validates a `Model` (ValueError naming the field); returns it."""
    checks.one_of("attention", model.attention, ATTENTIONS)
    checks.number("temperature", model.temperature, low=0.0, low_open=True)
    checks.one_of("activation", model.activation, ACTIVATIONS)
    checks.one_of("classifier", model.classifier, CLASSIFIERS)
    return model


class Params(NamedTuple):
    """z [M_C] attention logits; w [d, K] the MLP's lower layer; c [K, classes] the classifier ([K, 0]
    for the identity classifier)."""

    z: jax.Array
    w: jax.Array
    c: jax.Array


class Data(NamedTuple):
    """x [N, M_C] token frequencies (non-negative); labels [N] int; weight [N] sample weights summing to one."""

    x: jax.Array
    labels: jax.Array
    weight: jax.Array


def make_data(x: Any, labels: Any, weight: Any = None) -> Data:
    """A checked `Data` (uniform weights by default).

    Raises:
      ValueError: x not [N, M_C] with N, M_C >= 1, negative frequencies, a sequence without
        tokens, labels not [N] non-negative ints, or weights not [N] non-negative summing to one.
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"x must be [N, M_C] token frequencies, got shape {x.shape}")
    if np.any(x < 0) or np.any(x.sum(1) <= 0):
        raise ValueError("x must be non-negative with at least one token in every sequence")
    labels = np.asarray(labels)
    if labels.shape != (x.shape[0],) or not np.issubdtype(labels.dtype, np.integer) or np.any(labels < 0):
        raise ValueError(f"labels must be [{x.shape[0]}] non-negative ints, got {labels!r}")
    weight = np.full(x.shape[0], 1.0 / x.shape[0]) if weight is None else np.asarray(weight, np.float64)
    if weight.shape != (x.shape[0],) or np.any(weight < 0) or not np.isclose(weight.sum(), 1.0, atol=1e-6):
        raise ValueError(f"weight must be [{x.shape[0]}] non-negative and sum to one, got {weight!r}")
    return Data(jnp.asarray(x, jnp.float32), jnp.asarray(labels, jnp.int32), jnp.asarray(weight, jnp.float32))


def embeddings(num_context: int, d: int, key: jax.Array | None = None) -> jax.Array:
    """U [d, M_C + 1] with orthonormal columns: [I; 0] (key None, the paper's toy) or random (QR of a
    Gaussian matrix). Columns 0..M_C-1 are U_C, column M_C is u_q.

    Raises:
      ValueError: num_context < 1 or d < num_context + 1.
    """
    checks.integer("num_context", num_context, minimum=1)
    checks.integer("d", d, minimum=num_context + 1)
    if key is None:
        return jnp.eye(d, num_context + 1)
    q, _ = jnp.linalg.qr(jax.random.normal(key, (d, num_context + 1)))
    return q


def init_params(key: jax.Array, num_context: int, d: int, num_nodes: int, num_classes: int,
                model: Model, scale: float = 0.01) -> Params:
    """z, W (and C) with i.i.d. N(0, scale^2) entries (the public toy: scale 0.01; 0: zero init).

    Raises:
      ValueError: num_nodes (K) < 1, num_classes < 2, a negative scale, or K != num_classes
        with the identity classifier.
    """
    check_model(model)
    checks.integer("num_context", num_context, minimum=1)
    checks.integer("d", d, minimum=num_context + 1)
    checks.integer("K", num_nodes, minimum=1)
    checks.integer("num_classes", num_classes, minimum=2)
    checks.number("scale", scale, low=0.0)
    if model.classifier == "identity" and num_nodes != num_classes:
        raise ValueError(f"the identity classifier needs K = num_classes, got K={num_nodes}, "
                         f"num_classes={num_classes}")
    kz, kw, kc = jax.random.split(key, 3)
    c_shape = (num_nodes, 0) if model.classifier == "identity" else (num_nodes, num_classes)
    return Params(scale * jax.random.normal(kz, (num_context,)), scale * jax.random.normal(kw, (d, num_nodes)),
                  scale * jax.random.normal(kc, c_shape))


def attention_weights(z: jax.Array, x: jax.Array, attention: str, temperature: float = 1.0) -> jax.Array:
    """b = x ∘ a(z / T): [..., M_C] for z [..., M_C] (broadcast against x [..., M_C])."""
    s = z / temperature
    if attention == "linear":
        return x * s
    if attention == "exp":
        return x * jnp.exp(s)
    logits = jnp.where(x > 0, s + jnp.log(jnp.where(x > 0, x, 1.0)), -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


def forward(params: Params, u: jax.Array, x: jax.Array, model: Model) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logits [N, classes], hidden h [N, K], attention b [N, M_C]) for x [N, M_C] and U [d, M_C + 1]."""
    m = x.shape[-1]
    b = attention_weights(params.z, x, model.attention, model.temperature)
    f = b @ u[:, :m].T + u[:, m]
    h = _PHI[model.activation](f @ params.w)
    return (h if model.classifier == "identity" else h @ params.c), h, b


def loss(params: Params, u: jax.Array, data: Data, model: Model) -> jax.Array:
    """Weighted cross-entropy sum_n weight_n CE(logits_n, label_n): a scalar."""
    logits, _, _ = forward(params, u, data.x, model)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(data.weight * jnp.take_along_axis(logp, data.labels[:, None], axis=-1)[:, 0])


def contextual_weights(w: jax.Array, u: jax.Array) -> jax.Array:
    """V = U_C^T W: [..., M_C, K] for w [..., d, K] (row l of V: token l's weight in each node)."""
    return jnp.einsum("dm,...dk->...mk", u[:, :-1], w)


def mean_attention(z: jax.Array, data: Data, model: Model) -> jax.Array:
    """b_bar = E[b] = sum_n weight_n b_n: [..., M_C] for z [..., M_C]."""
    b = attention_weights(z[..., None, :], data.x, model.attention, model.temperature)
    return jnp.einsum("n,...nm->...m", data.weight, b)


# ----- training by autodiff -----------------------------------------------------------------------

class RunConfig(NamedTuple):
    """Static settings of an optimizer run.

    steps: optimizer steps (full batch).
    optimizer: "sgd" (the theory's; optional heavy-ball momentum) or "adam".
    momentum: SGD momentum (0: plain gradient descent, where `discrete_residual` is exact).
    record_every: steps between saves (must divide steps).
    """

    steps: int
    optimizer: str = "sgd"
    momentum: float = 0.0
    record_every: int = 1


def check_run(run: RunConfig) -> RunConfig:
    """Validates a `RunConfig` (ValueError naming the field); returns it."""
    checks.integer("steps", run.steps, minimum=1)
    checks.one_of("optimizer", run.optimizer, OPTIMIZERS)
    checks.number("momentum", run.momentum, low=0.0, high=1.0, high_open=True)
    checks.integer("record_every", run.record_every, minimum=1)
    if run.steps % run.record_every:
        raise ValueError(f"record_every={run.record_every} must divide steps={run.steps}")
    return run


class Record(NamedTuple):
    """What `train` saves every `record_every` steps (S saves, step 0 included).

    steps: [S] step of each save.
    z: [S, M_C] attention logits.
    v: [S, M_C, K] V = U_C^T W.
    v_query: [S, K] u_q^T W, the query part of each node (W's part outside U never moves).
    loss: [S] the loss.
    sum_sq_dz: [S, M_C] sum over the steps so far of (z(s+1) - z(s))^2.
    sum_sq_dv: [S, M_C] sum over the steps so far of sum_k (v_k(s+1) - v_k(s))^2.
    """

    steps: jax.Array
    z: jax.Array
    v: jax.Array
    v_query: jax.Array
    loss: jax.Array
    sum_sq_dz: jax.Array
    sum_sq_dv: jax.Array


def optimizer(name: str, eta_z: Any, eta_w: Any, eta_c: Any, *, momentum: float = 0.0
              ) -> optax.GradientTransformation:
    """SGD (optional momentum) or Adam with rate eta_z on z, eta_w on W and eta_c on C (rates may be traced)."""
    checks.one_of("optimizer", name, OPTIMIZERS)
    for rate_name, rate in (("eta_z", eta_z), ("eta_w", eta_w), ("eta_c", eta_c)):
        checks.number(rate_name, rate, low=0.0, low_open=True)
    checks.number("momentum", momentum, low=0.0, high=1.0, high_open=True)

    def make(rate):
        return optax.sgd(rate, momentum=momentum or None) if name == "sgd" else optax.adam(rate)

    return optax.multi_transform({"z": make(eta_z), "w": make(eta_w), "c": make(eta_c)}, Params("z", "w", "c"))


def _check_shapes(params: Params, u: jax.Array, data: Data, model: Model) -> None:
    m = data.x.shape[-1]
    if params.z.shape != (m,):
        raise ValueError(f"z must be [{m}] to match x [N, {m}], got {params.z.shape}")
    if u.shape[1] != m + 1 or params.w.shape[0] != u.shape[0]:
        raise ValueError(f"U must be [d, {m + 1}] with d = W's rows {params.w.shape[0]}, got {u.shape}")
    k = params.w.shape[1]
    if k < 1:
        raise ValueError(f"K must be >= 1 MLP nodes, got W of shape {params.w.shape}")
    classes = k if model.classifier == "identity" else params.c.shape[1]
    labels = np.asarray(data.labels)
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got range [{labels.min()}, {labels.max()}]")


def train(params: Params, u: jax.Array, data: Data, model: Model, run: RunConfig, eta_z: float,
          eta_w: float, eta_c: float | None = None) -> tuple[Params, Record]:
    """Trains the block by autodiff for `run.steps` full-batch optimizer steps (one `lax.scan`, jitted).

    Args:
      params: initial parameters (`init_params`).
      u: [d, M_C + 1] embeddings (`embeddings`).
      data: the sequences (`make_data`).
      model, run: static settings.
      eta_z, eta_w, eta_c: learning rates of z, W and C (eta_c defaults to eta_w).

    Returns:
      (final params, `Record` with run.steps / run.record_every + 1 saves).
    """
    check_model(model)
    check_run(run)
    _check_shapes(params, u, data, model)
    eta_c = eta_w if eta_c is None else eta_c
    optimizer(run.optimizer, eta_z, eta_w, eta_c, momentum=run.momentum)  # checks the rates
    return _train(params, u, data, model, run, eta_z, eta_w, eta_c)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _train(params, u, data, model, run, eta_z, eta_w, eta_c):
    tx = optimizer(run.optimizer, eta_z, eta_w, eta_c, momentum=run.momentum)
    grad = jax.value_and_grad(loss)
    m = data.x.shape[-1]

    def step(carry, _):
        p, opt_state, sq_dz, sq_dv = carry
        _, g = grad(p, u, data, model)
        updates, opt_state = tx.update(g, opt_state, p)
        new = optax.apply_updates(p, updates)
        dv = contextual_weights(new.w - p.w, u)
        return (new, opt_state, sq_dz + (new.z - p.z) ** 2, sq_dv + jnp.sum(dv**2, axis=-1)), None

    def block(carry, _):
        carry, _ = jax.lax.scan(step, carry, None, length=run.record_every)
        return carry, snapshot(carry)

    def snapshot(carry):
        p, _, sq_dz, sq_dv = carry
        return p.z, contextual_weights(p.w, u), u[:, m] @ p.w, loss(p, u, data, model), sq_dz, sq_dv

    zeros = jnp.zeros(m)
    carry = (params, tx.init(params), zeros, zeros)
    first = snapshot(carry)
    carry, saves = jax.lax.scan(block, carry, None, length=run.steps // run.record_every)
    z, v, v_query, losses, sq_dz, sq_dv = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, saves)
    steps = jnp.arange(run.steps // run.record_every + 1) * run.record_every
    return carry[0], Record(steps, z, v, v_query, losses, sq_dz, sq_dv)


def flow(params: Params, u: jax.Array, data: Data, model: Model, t1: float, eta_z: float, eta_w: float,
         eta_c: float | None = None, *, num_saves: int = 101, rtol: float = 1e-6, atol: float = 1e-8,
         solver: str = "tsit5", max_steps: int = 100_000) -> Trajectory:
    """The gradient flow d(z, W, C)/dt = -(eta_z dL/dz, eta_w dL/dW, eta_c dL/dC) of the block, by
    autodiff, integrated with `solve` (time t = steps x unit rate: SGD with rates eta is its Euler
    discretization with dt = 1).

    Returns:
      `Trajectory` with ts [num_saves] (evenly spaced in [0, t1]) and ys a `Params` with a leading
      [num_saves] axis.
    """
    check_model(model)
    _check_shapes(params, u, data, model)
    eta_c = eta_w if eta_c is None else eta_c
    for rate_name, rate in (("eta_z", eta_z), ("eta_w", eta_w), ("eta_c", eta_c)):
        checks.number(rate_name, rate, low=0.0, low_open=True)
    checks.integer("num_saves", num_saves, minimum=2)
    return _flow(params, u, data, model, float(t1), eta_z, eta_w, eta_c, num_saves, rtol, atol, solver,
                 max_steps)


@functools.partial(jax.jit, static_argnums=(3, 8, 11, 12))
def _flow(params, u, data, model, t1, eta_z, eta_w, eta_c, num_saves, rtol, atol, solver, max_steps):
    grad = jax.grad(loss)

    def field(t, p, args):
        g = grad(p, u, data, model)
        return Params(-eta_z * g.z, -eta_w * g.w, -eta_c * g.c)

    return solve(field, params, t1, ts=jnp.linspace(0.0, t1, num_saves), rtol=rtol, atol=atol, solver=solver,
                 max_steps=max_steps)


# ----- Theorem 1 ----------------------------------------------------------------------------------

class Prediction(NamedTuple):
    """Theorem 1's prediction from V, each [..., M_C].

    value: term1 + term2 + c, the predicted z (exp, softmax attention) or the predicted z^2 (linear
      attention, whose z may change sign: z_l = 0 stops v_l for an instant while z_l moves on);
      compare it with `theorem1_lhs(z, model)`.
    term1: r / (2T) sum_k v_k^2 (exp, softmax) or r sum_k v_k^2 (linear).
    term2: -r / (2T) ||V||_F^2 b_bar (softmax), else 0.
    c: the constant fixed at t = 0: theorem1_lhs(z(0)) minus the terms at t = 0.
    """

    value: jax.Array
    term1: jax.Array
    term2: jax.Array
    c: jax.Array


def theorem1_lhs(z: jax.Array, model: Model) -> jax.Array:
    """What Theorem 1 predicts: z^2 for linear attention, z otherwise ([..., M_C])."""
    return z**2 if model.attention == "linear" else z


def rate_ratio(eta_z: float, eta_w: float) -> float:
    """r = eta_z / eta_w, the ratio every constant of Theorem 1 carries."""
    checks.number("eta_z", eta_z, low=0.0, low_open=True)
    checks.number("eta_w", eta_w, low=0.0, low_open=True)
    return float(eta_z) / float(eta_w)


def theorem1_terms(v: jax.Array, model: Model, ratio: float, b_bar: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
    """(term1, term2) of `Prediction` for V [..., M_C, K] (b_bar [..., M_C], needed for softmax)."""
    check_model(model)
    sq = jnp.sum(v**2, axis=-1)
    if model.attention == "linear":
        return ratio * sq, jnp.zeros_like(sq)
    scale = ratio / (2.0 * model.temperature)
    if model.attention == "exp":
        return scale * sq, jnp.zeros_like(sq)
    if b_bar is None:
        raise ValueError("softmax attention needs b_bar = E[b] for Theorem 1's second term")
    fro = jnp.sum(v**2, axis=(-2, -1))
    return scale * sq, -scale * fro[..., None] * b_bar


def predicted_z(z0: jax.Array, v0: jax.Array, v: jax.Array, model: Model, ratio: float,
                b_bar: jax.Array | None = None, b_bar0: jax.Array | None = None) -> Prediction:
    """Theorem 1's z(t) (z(t)^2 for linear attention) from V(t), with its constant fixed by (z(0), V(0)).

    Args:
      z0: [M_C] z at t = 0.
      v0: [M_C, K] V at t = 0.
      v: [..., M_C, K] V at the times of interest.
      model: the block (attention variant and temperature).
      ratio: eta_z / eta_w (`rate_ratio`).
      b_bar: softmax only: [..., M_C] (or [M_C]) b_bar used at those times.
      b_bar0: softmax only: b_bar at t = 0 (default: b_bar, when it is one [M_C] vector).

    Returns:
      `Prediction`, each [..., M_C].
    """
    if model.attention == "softmax" and b_bar0 is None:
        if b_bar is None or jnp.ndim(b_bar) != 1:
            raise ValueError("give b_bar0 (b_bar at t = 0) when b_bar changes over time")
        b_bar0 = b_bar
    t1_0, t2_0 = theorem1_terms(v0, model, ratio, b_bar0)
    term1, term2 = theorem1_terms(v, model, ratio, b_bar)
    c = theorem1_lhs(z0, model) - t1_0 - t2_0
    return Prediction(term1 + term2 + c, term1, term2, jnp.broadcast_to(c, term1.shape))


def integrated_term2(v: jax.Array, b_bar: jax.Array, model: Model, ratio: float) -> jax.Array:
    """Theorem 1's softmax term with b_bar(t) left inside the integral: -r / T integral of b_bar d(||V||_F^2 / 2)
    along saves [S] (trapezoid rule; 0 at the first save). v [S, M_C, K], b_bar [S, M_C] -> [S, M_C].

    Differs from `Prediction.term2 - term2(0)` only by b_bar's change over time; the theorem takes b_bar
    constant.
    """
    check_model(model)
    fro = jnp.sum(v**2, axis=(-2, -1))
    mid = 0.5 * (b_bar[1:] + b_bar[:-1]) * jnp.diff(fro)[:, None]
    scale = -ratio / (2.0 * model.temperature)
    return jnp.concatenate([jnp.zeros_like(b_bar[:1]), scale * jnp.cumsum(mid, axis=0)])


def discrete_residual(record: Record, model: Model, ratio: float) -> jax.Array:
    """How far plain SGD is from the exact discrete form of Theorem 1: [S, M_C], zero to float
    rounding for linear and exp attention.

    One SGD step gives z ∘ dz = r sum_k v_k ∘ dv_k (linear) and dz = r / T sum_k v_k ∘ dv_k (exp)
    exactly, with dz, dv_k the step's changes; since v ∘ dv = (Delta(v^2) - dv^2) / 2:
      exp:    z(t) - z(0) - r / (2T) (sum_k v_k(t)^2 - v_k(0)^2 - sum_s sum_k dv_k(s)^2)
      linear: z(t)^2 - z(0)^2 - sum_s dz(s)^2 - r (sum_k v_k(t)^2 - v_k(0)^2 - sum_s sum_k dv_k(s)^2)
    (`record.sum_sq_dz`, `record.sum_sq_dv` hold the sums). Momentum and Adam break it.

    Raises:
      ValueError: softmax attention (whose Theorem 1 is an approximation).
    """
    check_model(model)
    if model.attention == "softmax":
        raise ValueError("discrete_residual is exact only for attention 'linear' or 'exp', got 'softmax'")
    dv2 = jnp.sum(record.v**2, axis=-1) - jnp.sum(record.v[0] ** 2, axis=-1) - record.sum_sq_dv
    if model.attention == "exp":
        return record.z - record.z[0] - ratio / (2.0 * model.temperature) * dv2
    return record.z**2 - record.z[0] ** 2 - record.sum_sq_dz - ratio * dv2


def softmax_exact_term(record: Record, model: Model, ratio: float) -> jax.Array:
    """The term Theorem 1 approximates for softmax attention, exactly, along a plain-SGD record: [S, M_C].

    One step changes z by dz = -eta_z / T E[(diag(b) - b b^T) g_b] (g_b = sum_k g_k phi'_k v_k) and each v_k by
    dv_k = -eta_w E[g_k phi'_k b], so dz - r / T sum_k v_k ∘ dv_k = eta_z / T E[b (b^T g_b)]. Summed over the
    steps (v ∘ dv = (Delta(v^2) - dv^2) / 2) this is
      z(t) - z(0) - r / (2T) (sum_k v_k(t)^2 - v_k(0)^2 - sum_s sum_k dv_k(s)^2),
    the exact counterpart of `Prediction.term2` - term2(0) = -r / (2T) (||V(t)||_F^2 - ||V(0)||_F^2) b_bar, which
    takes b_bar = E[b] out of E[b b^T g_b].
    """
    check_model(model)
    if model.attention != "softmax":
        raise ValueError(f"softmax_exact_term is for attention 'softmax', got {model.attention!r}")
    dv2 = jnp.sum(record.v**2, axis=-1) - jnp.sum(record.v[0] ** 2, axis=-1) - record.sum_sq_dv
    return record.z - record.z[0] - ratio / (2.0 * model.temperature) * dv2


def pearson(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pearson correlation over the last axis: [..., M] x [..., M] -> [...] (0 where either is constant)."""
    a = a - jnp.mean(a, axis=-1, keepdims=True)
    b = b - jnp.mean(b, axis=-1, keepdims=True)
    na, nb = jnp.linalg.norm(a, axis=-1), jnp.linalg.norm(b, axis=-1)
    ok = (na > 0) & (nb > 0)
    return jnp.where(ok, jnp.sum(a * b, axis=-1) / jnp.where(ok, na * nb, 1.0), 0.0)


# ----- the ODEs of Theorems 2-4 and of K > 1 nodes ------------------------------------------------

class OdeArgs(NamedTuple):
    """Arguments of the ODE fields.

    target: [M] Delta (Theorem 2), mu (Theorems 3-4) or [M, K] Delta (K > 1 nodes).
    log_xbar: [M] log of the token weights in A = sum_l xbar_l exp(e_l).
    scale: s of the exponent v^2 / s (2 in the theory, 3 in the public code's Fig. 4).
    normalize: 1.0 to divide by A, 0.0 for A = 1.
    """

    target: jax.Array
    log_xbar: jax.Array
    scale: Any
    normalize: Any


def _exponent(v: jax.Array, scale: Any, node_exponent: str = "sum") -> jax.Array:
    """e_l = v_l^2 / s ([M]) or, for V [M, K], sum_k V_lk^2 / s ("sum") or log sum_k exp(V_lk^2 / s)."""
    if v.ndim == 1:
        return v**2 / scale
    if node_exponent == "sum":
        return jnp.sum(v**2, axis=-1) / scale
    return jax.nn.logsumexp(v**2 / scale, axis=-1)


def _log_a(e: jax.Array, args: OdeArgs) -> jax.Array:
    return args.normalize * jax.nn.logsumexp(args.log_xbar + e)


def linear_field(t, y: tuple[jax.Array, jax.Array], args: OdeArgs) -> tuple[jax.Array, jax.Array]:
    """Theorem 2: dv/dt = Delta ∘ exp(v^2 / s) / A, and dtau/dt = 1 / A (the clock of the invariant).

    y: (v [M], tau []). Computed in log space, so exp(v^2 / s) may exceed the float range.
    """
    del t
    v, _ = y
    e = _exponent(v, args.scale)
    log_a = _log_a(e, args)
    return args.target * jnp.exp(e - log_a), jnp.exp(-log_a)


def nonlinear_field(t, y: tuple[jax.Array, jax.Array], args: OdeArgs) -> tuple[jax.Array, jax.Array]:
    """Theorems 3-4: dv/dt = (mu - v) ∘ exp(v^2 / s) / A, and dtau/dt = 1 / A.

    y: (v [M], tau []). In the clock tau, dv_j/dtau = (mu_j - v_j) exp(v_j^2 / s) involves token j alone.
    """
    del t
    v, _ = y
    e = _exponent(v, args.scale)
    log_a = _log_a(e, args)
    return (args.target - v) * jnp.exp(e - log_a), jnp.exp(-log_a)


def nodes_field(t, v: jax.Array, args: OdeArgs, node_exponent: str = "sum") -> jax.Array:
    """K > 1 nodes: dV/dt = diag(exp(e)) Delta / A with e_l = sum_k V_lk^2 / s. V [M, K] -> [M, K].

    e_l = sum_k V_lk^2 / s is the exponent Theorem 1 gives with K nodes (z_l = sum_k v_lk^2 / 2); the
    alternative `node_exponent="sum_of_exp"` reads diag(exp(V∘V / 2) 1) literally, e_l =
    log sum_k exp(V_lk^2 / s).
    """
    del t
    e = _exponent(v, args.scale, node_exponent)
    return args.target * jnp.exp(e - _log_a(e, args))[:, None]


def ode_args(target: Any, xbar: Any = None, scale: float = 2.0, normalize: bool = True) -> OdeArgs:
    """Checked `OdeArgs`: xbar [M] positive weights of A (default ones, the public code's softmax).

    Raises:
      ValueError: xbar of the wrong shape or not positive, scale <= 0, normalize not a bool.
    """
    target = jnp.asarray(target, jnp.float32)
    m = target.shape[0]
    xbar = np.ones(m) if xbar is None else np.asarray(xbar, np.float64)
    if xbar.shape != (m,) or np.any(xbar <= 0):
        raise ValueError(f"xbar must be [{m}] positive weights, got {xbar!r}")
    checks.number("scale", scale, low=0.0, low_open=True)
    checks.boolean("normalize", normalize)
    return OdeArgs(target, jnp.asarray(np.log(xbar), jnp.float32), jnp.float32(scale), jnp.float32(normalize))


def _save_times(t1: float, num_saves: int, log_times: bool) -> jax.Array:
    """[num_saves] save times in [0, t1]: evenly spaced, or 0 then geometric from t1 / 10^4 (`log_times`).
    The last is exactly t1 in float32."""
    checks.number("t1", t1, low=0.0, low_open=True)
    checks.integer("num_saves", num_saves, minimum=2)
    if log_times:
        ts = np.concatenate([np.zeros(1), np.geomspace(t1 * 1e-4, t1, num_saves - 1)])
    else:
        ts = np.linspace(0.0, t1, num_saves)
    ts = ts.astype(np.float32)
    ts[-1] = np.float32(t1)
    return jnp.asarray(np.minimum(ts, ts[-1]))


def _batched(v0: Any, ndim: int, name: str) -> jax.Array:
    v0 = jnp.asarray(v0, jnp.float32)
    if v0.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} axes (a leading batch of initial conditions), got {v0.shape}")
    return v0


def _simulate_tokens(field, v0: Any, args: OdeArgs, t1: float, num_saves: int, log_times: bool, rtol: float,
                     atol: float, max_steps: int) -> Trajectory:
    """A per-token ODE (state (v [B, M], tau [B]) from tau = 0) from B initial conditions v0 [B, M]."""
    v0 = _batched(v0, 2, "v0")
    if v0.shape[1] != args.target.shape[0]:
        raise ValueError(f"v0 must be [B, {args.target.shape[0]}], got {v0.shape}")
    ts = _save_times(t1, num_saves, log_times)
    return _simulate(field, (v0, jnp.zeros(v0.shape[0])), args, float(ts[-1]), ts, rtol, atol, max_steps)


def simulate_linear(v0: Any, args: OdeArgs, t1: float, *, num_saves: int = 201, log_times: bool = False,
                    rtol: float = 1e-7, atol: float = 1e-9, max_steps: int = 200_000) -> Trajectory:
    """Theorem 2's ODE from B initial conditions v0 [B, M] (vmapped, jitted).

    Returns:
      Trajectory with ts [T] and ys (v [B, T, M], tau [B, T]).
    """
    return _simulate_tokens(linear_field, v0, args, t1, num_saves, log_times, rtol, atol, max_steps)


def simulate_nonlinear(v0: Any, args: OdeArgs, t1: float, *, num_saves: int = 201, log_times: bool = False,
                       rtol: float = 1e-7, atol: float = 1e-9, max_steps: int = 200_000) -> Trajectory:
    """Theorems 3-4's ODE from v0 [B, M] (vmapped, jitted).

    Returns:
      Trajectory with ts [T] and ys (v [B, T, M], tau [B, T]).
    """
    return _simulate_tokens(nonlinear_field, v0, args, t1, num_saves, log_times, rtol, atol, max_steps)


def simulate_nodes(v0: Any, args: OdeArgs, t1: float, *, node_exponent: str = "sum", num_saves: int = 201,
                   log_times: bool = False, rtol: float = 1e-7, atol: float = 1e-9,
                   max_steps: int = 200_000) -> Trajectory:
    """The K > 1 ODE from V0 [B, M, K] (args.target = Delta [M, K]). Returns Trajectory with ys [B, T, M, K].

    Raises:
      ValueError: K < 1, shapes that do not match Delta, an unknown node_exponent.
    """
    checks.one_of("node_exponent", node_exponent, NODE_EXPONENTS)
    v0 = _batched(v0, 3, "v0")
    if args.target.ndim != 2 or args.target.shape[1] < 1:
        raise ValueError(f"Delta must be [M, K] with K >= 1, got {args.target.shape}")
    if v0.shape[1:] != args.target.shape:
        raise ValueError(f"v0 must be [B, {args.target.shape[0]}, {args.target.shape[1]}], got {v0.shape}")
    ts = _save_times(t1, num_saves, log_times)
    return _simulate(_NODE_FIELDS[node_exponent], v0, args, float(ts[-1]), ts, rtol, atol, max_steps)


# one field object per exponent, so that the jitted solve below is compiled once per exponent and shape
_NODE_FIELDS = {name: functools.partial(nodes_field, node_exponent=name) for name in NODE_EXPONENTS}


@functools.partial(jax.jit, static_argnums=(0, 7))
def _simulate(field, y0, args, t1, ts, rtol, atol, max_steps) -> Trajectory:
    return solve_batch(field, y0, t1, args=args, ts=ts, rtol=rtol, atol=atol, max_steps=max_steps)


# ----- quantities of the ODEs ---------------------------------------------------------------------

def linear_invariant(v: jax.Array, delta: jax.Array, scale: float = 2.0) -> jax.Array:
    """erf(v_l / sqrt(s)) / Delta_l: [..., M]. Along Theorem 2's ODE it moves by the same amount
    2 / sqrt(pi s) tau(t) for every token l (tau = integral of 1 / A): so its differences over tokens,
    and its change minus 2 tau / sqrt(pi s), are conserved."""
    return jsp.erf(v / jnp.sqrt(scale)) / delta


def linear_limit(v0: Any, delta: Any, scale: float = 2.0) -> tuple[int, np.ndarray, float]:
    """Where Theorem 2's ODE goes, from the conserved quantity (float64, NumPy).

    Token l would reach +-infinity when tau = sqrt(pi s) / 2 (sign(Delta_l) - erf(v_l(0) / sqrt(s))) / Delta_l;
    the first one, l* (the most salient token: the largest |Delta| when v(0) = 0), does, and every other
    token stops at erf(v_l / sqrt(s)) = erf(v_l(0) / sqrt(s)) + Delta_l / Delta_l* (sign(Delta_l*) -
    erf(v_l*(0) / sqrt(s))).

    Args:
      v0: [M] initial v.
      delta: [M] non-zero Delta.

    Returns:
      (l*, limits [M] with +-inf at l*, tau* the blow-up time in tau).
    """
    v0, delta = np.asarray(v0, np.float64), np.asarray(delta, np.float64)
    if v0.shape != delta.shape or v0.ndim != 1:
        raise ValueError(f"v0 and delta must both be [M], got {v0.shape} and {delta.shape}")
    if np.any(delta == 0):
        raise ValueError("delta must be non-zero for every token")
    e0 = _erf(v0 / np.sqrt(scale))
    tau = np.sqrt(np.pi * scale) / 2.0 * (np.sign(delta) - e0) / delta
    star = int(np.argmin(tau))
    e_limit = e0 + delta / delta[star] * (np.sign(delta[star]) - e0[star])
    limits = np.sqrt(scale) * _erfinv(e_limit)
    limits[star] = np.sign(delta[star]) * np.inf
    return star, limits, float(tau[star])


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _erfinv(y: np.ndarray) -> np.ndarray:
    """erf^-1 in float64 by Newton's method on math.erf (|y| < 1; +-inf at +-1)."""
    y = np.asarray(y, np.float64)
    inside = np.abs(y) < 1
    yc = np.where(inside, y, 0.0)
    x = np.sqrt(np.maximum(-np.log((1.0 - yc) * (1.0 + yc)), 0.0)) * np.sign(yc)  # a start above |root|
    for _ in range(100):
        x = x - (_erf(x) - yc) / (2.0 / np.sqrt(np.pi) * np.exp(-x * x))
    return np.where(inside, x, np.copysign(np.inf, y))


def ode_attention(v: jax.Array, args: OdeArgs, node_exponent: str = "sum") -> jax.Array:
    """The ODE's attention p_l = xbar_l exp(e_l) / A over tokens: [..., M] for v [..., M] (Theorems 2-4)
    or V [..., M, K] (K > 1 nodes, when args.target is [M, K])."""
    if args.target.ndim == 2:
        sq = v**2 / args.scale
        e = jnp.sum(sq, axis=-1) if node_exponent == "sum" else jax.nn.logsumexp(sq, axis=-1)
    else:
        e = v**2 / args.scale
    return jax.nn.softmax(args.log_xbar + e, axis=-1)


def attention_entropy(probs: jax.Array) -> jax.Array:
    """Entropy in nats of attention over the last axis: [..., M] -> [...] (`lorank.analysis.attention`)."""
    return row_entropy(probs)


def node_stable_rank(v: jax.Array) -> jax.Array:
    """Stable rank ||V||_F^2 / ||V||_2^2 of V [..., M, K] -> [...] (`lorank.analysis.spectrum`)."""
    return stable_rank(v)


def nonlinear_rates(mu: Any, xbar: Any = None, scale: float = 2.0, normalize: bool = True,
                    clock: str = "tau") -> np.ndarray:
    """Predicted convergence rates of Theorems 3-4's ODE near v = mu [M] (float64).

    Linearizing dv_j/dt = (mu_j - v_j) exp(v_j^2 / s) / A at v_j = mu_j gives |mu_j - v_j| ~ exp(-lambda_j t):
    in the clock tau (dtau = dt / A) lambda_j = exp(mu_j^2 / s) for each token alone; in t ("t"),
    lambda_j = exp(mu_j^2 / s) / A(mu) once every token is near mu. Either way the rates are in the ratio
    exp(mu_j^2 / s) / exp(mu_k^2 / s).
    """
    checks.one_of("clock", clock, ("tau", "t"))
    mu = np.asarray(mu, np.float64)
    e = mu**2 / scale
    if clock == "tau" or not normalize:
        return np.exp(e)
    xbar = np.ones_like(mu) if xbar is None else np.asarray(xbar, np.float64)
    log_a = np.log(np.sum(xbar * np.exp(e - e.max()))) + e.max()
    return np.exp(e - log_a)


def fit_rates(ts: Any, v: Any, mu: Any, window: tuple[float, float] = (1e-5, 1e-3), min_points: int = 4
              ) -> np.ndarray:
    """Fitted exponential convergence rates: -slope of log|mu_j - v_j| against the clock (least squares) over the
    saves where window[0] < |mu_j - v_j| / |mu_j| < window[1]. [M] (NaN where fewer than min_points saves lie
    in the window).

    Args:
      ts: [T] the clock at each save (t, or tau for rates independent of the other tokens).
      v: [T, M] one trajectory.
      mu: [M] its fixed point.
    """
    ts, v, mu = np.asarray(ts, np.float64), np.asarray(v, np.float64), np.asarray(mu, np.float64)
    gap = np.abs(mu[None] - v) / np.abs(mu)[None]
    rates = np.full(mu.shape, np.nan)
    for j in range(mu.shape[0]):
        keep = (gap[:, j] > window[0]) & (gap[:, j] < window[1])
        if keep.sum() >= min_points:
            slope = np.polyfit(ts[keep], np.log(gap[keep, j]), 1)[0]
            rates[j] = -slope
    return rates


def bounce(entropy: Any) -> dict[str, float]:
    """The "bouncing back" of an entropy curve [T]: its start, minimum, end, and how far it fell and rose."""
    h = np.asarray(entropy, np.float64)
    low = int(np.argmin(h))
    return {"start": float(h[0]), "min": float(h[low]), "end": float(h[-1]), "argmin": low,
            "fall": float(h[0] - h[low]), "rise": float(h[-1] - h[low])}
