"""Scan&Snap: the (Y, Z) dynamics of a 1-layer transformer (Tian, Wang, Chen, Du, NeurIPS 2023).

The model (one-hot tokens, vocabulary M, reparameterized as in the paper):
  Y = U W_V^T U^T [M, M]: Y[l, j] is the logit of next token j from contextual token l.
  Z = U W_Q W_K^T U^T / sqrt(d) [M, M]: Z[m, l] is the attention logit of query m (row) to key l
    (column).
  A sequence of T tokens with query m (its last token) attends to its first T - 1 tokens (the
  query's attention to itself is masked) with softmax weights b_t ∝ exp(Z[m, x_t]). Tokens with
  the same id get the same weight, so the attention output is a function of the token counts w_l
  of the context: c~_l = w_l exp(z_ml), c = c~ / ||c~||_1 (the attention mass per token) and
  f = LN(c) = c / ||c||_2 (the paper's LN: l2 normalization, not a mean-subtracting LayerNorm).
  With the residual option (paper §7) the query's own one-hot is added before normalization.
  Logits Y^T f [M], cross-entropy against the next token.

The population mode (T -> infinity) takes w = P(l | n), the theorems' regime. Everything here
is pure JAX: a problem is three arrays (P(l | n) [K, M], query [K], next token [K]), as in
`lorank.data.synthetic.SeqWorld`; training is `lax.scan` over optax steps with separate learning
rates eta_Y and eta_Z, jit-able and vmappable over seeds and learning rates (`sweep`).

Closed forms checked against the simulation (docs/scan_snap.md has the derivations):
  `h_recursion` (Lemma 5), `h_continuous` (Lemma 6), `chi` and `relative_gain` (Theorem 3),
  `b_closed_form` (Theorem 4).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorank import checks

MODES = ("sampled", "population", "one_class")
OPTIMIZERS = ("sgd", "adam")
INITS = ("zero", "uniform")


class Problem(NamedTuple):
    """The data of a Scan&Snap run.

    probs: [K, M] P(l | n), rows summing to one.
    query: [K] int, the query token psi(n) of each class.
    next_token: [K] int, the token class n predicts.
    class_weight: [K] P(n), summing to one (zero for padding classes).
    vocab_mask: [M] bool, tokens of the vocabulary (False: padding, never a logit).

    `stack_problems` pads problems of different sizes to one shape, so that one vmapped program
    runs them all; a padded problem trains like the original (the same draws of classes and tokens;
    with uniform init, other draws of the same distribution).
    """

    probs: jax.Array
    query: jax.Array
    next_token: jax.Array
    class_weight: jax.Array
    vocab_mask: jax.Array


class Params(NamedTuple):
    """Y [M, M] (decoder: row = contextual token, column = next token), Z [M, M] (row = query)."""

    y: jax.Array
    z: jax.Array


class Batch(NamedTuple):
    """weights: [B, M] context token counts (or P(l | n)); query, target: [B] int; weight: [B] sums to one."""

    weights: jax.Array
    query: jax.Array
    target: jax.Array
    weight: jax.Array


class Record(NamedTuple):
    """What a run saves every `record_every` steps (S saves, step 0 included).

    steps: [S] step of each save.
    z_query: [S, K, M] the row Z[psi(n)] of each class's query.
    loss: [S] the population loss (exact expectation over classes, T -> infinity).
    b: [S, K] B_n = eta_Z * integral of xi_n, accumulated step by step (see `xi_increment`).
    xi_spread: [S, K] relative spread (std / |mean|) over n's distinct tokens of
      dz_ml / (eta_Z f_nl^2) in the last step (Theorem 2: zero when the claim holds).
    y: [S, M, M] Y at each save when `record_y`, else None.
    """

    steps: jax.Array
    z_query: jax.Array
    loss: jax.Array
    b: jax.Array
    xi_spread: jax.Array
    y: jax.Array | None


def as_problem(world: Any) -> Problem:
    """A `Problem` with P(n) = 1/K from any object with `probs`, `query`, `next_token` (e.g. a `SeqWorld`).

    Raises:
      ValueError: K >= M, or a row of probs that is not a probability vector.
    """
    probs = np.asarray(world.probs, np.float64)
    k, m = probs.shape
    if not k < m:
        raise ValueError(f"K={k} next tokens must be fewer than M={m} tokens")
    if np.any(probs < 0) or not np.allclose(probs.sum(1), 1.0, atol=1e-6):
        raise ValueError(f"each row of probs must be a probability vector; row sums {probs.sum(1)}")
    return Problem(jnp.asarray(probs, jnp.float32), jnp.asarray(world.query, jnp.int32),
                   jnp.asarray(world.next_token, jnp.int32), jnp.full((k,), 1.0 / k), jnp.ones((m,), bool))


def stack_problems(problems: list[Problem]) -> Problem:
    """Problems padded to the largest K and M and stacked on a leading axis [P, ...].

    Padding tokens get no contextual probability and are masked out of the logits; padding
    classes repeat class 0 with P(n) = 0, so they are never drawn and weigh nothing.
    """
    k_max = max(p.probs.shape[0] for p in problems)
    m_max = max(p.probs.shape[1] for p in problems)

    def pad(p: Problem) -> Problem:
        k, m = p.probs.shape
        probs = jnp.pad(p.probs, ((0, 0), (0, m_max - m)))
        rows = jnp.concatenate([jnp.arange(k), jnp.zeros(k_max - k, jnp.int32)])
        return Problem(probs[rows], p.query[rows], p.next_token[rows],
                       jnp.pad(p.class_weight, (0, k_max - k)), jnp.pad(p.vocab_mask, (0, m_max - m)))

    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *map(pad, problems))


def init_params(key: jax.Array, num_tokens: int, init: str = "zero", vocab_size: Any = None) -> Params:
    """Y(0) = Z(0) = 0 ("zero", the theory's start) or U(-1/sqrt(M), 1/sqrt(M)) entries ("uniform":
    PyTorch's nn.Linear default, the paper's Fig. 6), both [num_tokens, num_tokens].

    `vocab_size`: the M of the bound when the matrices are padded (default num_tokens; may be traced).
    """
    checks.one_of("init", init, INITS)
    checks.integer("num_tokens", num_tokens, minimum=2)
    shape = (num_tokens, num_tokens)
    if init == "zero":
        return Params(jnp.zeros(shape), jnp.zeros(shape))
    bound = 1.0 / jnp.sqrt(num_tokens if vocab_size is None else vocab_size)
    ky, kz = jax.random.split(key)
    return Params(jax.random.uniform(ky, shape, minval=-bound, maxval=bound),
                  jax.random.uniform(kz, shape, minval=-bound, maxval=bound))


def attention_mass(z_rows: jax.Array, weights: jax.Array) -> jax.Array:
    """c = c~ / ||c~||_1 with c~_l = w_l exp(z_l): the attention mass on each token id.

    Args:
      z_rows: [..., M] the query's row of Z.
      weights: [..., M] non-negative context counts or probabilities.
    Returns:
      [..., M] non-negative, summing to one over the last axis.
    """
    logits = jnp.where(weights > 0, z_rows, -jnp.inf)
    return jax.nn.softmax(logits + jnp.log(jnp.where(weights > 0, weights, 1.0)), axis=-1)


def normalized_output(c: jax.Array, query: jax.Array | None = None, residual: bool = False) -> jax.Array:
    """f = LN(c) = u / ||u||_2 with u = c (+ the query's one-hot when `residual`). [..., M] -> [..., M]."""
    u = c + jax.nn.one_hot(query, c.shape[-1], dtype=c.dtype) if residual else c
    return u / jnp.linalg.norm(u, axis=-1, keepdims=True)


def logits(params: Params, batch: Batch, residual: bool = False, vocab_mask: jax.Array | None = None
           ) -> jax.Array:
    """Y^T f for each sequence of the batch: [B, M]."""
    f = normalized_output(attention_mass(params.z[batch.query], batch.weights), batch.query, residual)
    out = f @ params.y
    return out if vocab_mask is None else jnp.where(vocab_mask, out, -jnp.inf)


def loss(params: Params, batch: Batch, residual: bool = False, vocab_mask: jax.Array | None = None
         ) -> jax.Array:
    """Weighted cross-entropy sum_b weight_b * CE(Y^T f_b, target_b): a scalar."""
    logp = jax.nn.log_softmax(logits(params, batch, residual, vocab_mask), axis=-1)
    return -jnp.sum(batch.weight * jnp.take_along_axis(logp, batch.target[:, None], axis=-1)[:, 0])


def population_batch(problem: Problem) -> Batch:
    """Every class once with weights P(l | n), weighted by P(n): the T -> infinity expectation."""
    return Batch(problem.probs, problem.query, problem.next_token, problem.class_weight)


def counts_from_tokens(tokens: jax.Array, num_tokens: int) -> jax.Array:
    """Context counts of sequences [B, T] (the last token, the query, excluded): [B, M] float."""
    return jax.vmap(lambda row: jnp.bincount(row[:-1], length=num_tokens))(tokens).astype(jnp.float32)


def batch_from_tokens(tokens: jax.Array, next_tokens: jax.Array, num_tokens: int) -> Batch:
    """A batch of explicit sequences [B, T] whose last token is the query, equally weighted."""
    b = tokens.shape[0]
    return Batch(counts_from_tokens(tokens, num_tokens), tokens[:, -1], next_tokens, jnp.full((b,), 1.0 / b))


def sampled_batch(key: jax.Array, problem: Problem, batch_size: int, seq_len: int) -> Batch:
    """`batch_size` sequences of T = `seq_len` tokens, classes uniform: counts of T - 1 i.i.d. draws."""
    k_class, k_tok = jax.random.split(key)
    k, m = problem.probs.shape
    # Inverse-CDF draws: padding (zero-probability classes and tokens at the end) leaves them unchanged.
    class_cdf = jnp.cumsum(problem.class_weight)
    classes = jnp.minimum(jnp.searchsorted(class_cdf, jax.random.uniform(k_class, (batch_size,)) * class_cdf[-1],
                                           side="right"), k - 1)
    cdf = jnp.cumsum(problem.probs, axis=1)[classes]
    u = jax.random.uniform(k_tok, (batch_size, seq_len - 1)) * cdf[:, -1:]
    draws = jnp.minimum(jax.vmap(lambda c, row: jnp.searchsorted(c, row, side="right"))(cdf, u), m - 1)
    counts = jax.vmap(lambda row: jnp.bincount(row, length=m))(draws).astype(jnp.float32)
    return Batch(counts, problem.query[classes], problem.next_token[classes],
                 jnp.full((batch_size,), 1.0 / batch_size))


def one_class_batch(step: jax.Array, problem: Problem) -> Batch:
    """Class `step mod K` alone in population mode: batch-1 SGD visiting classes in turn (no padding classes)."""
    n = jnp.mod(step, problem.probs.shape[0])
    return Batch(problem.probs[n][None], problem.query[n][None], problem.next_token[n][None], jnp.ones((1,)))


def optimizer(name: str, eta_y: Any, eta_z: Any, *, momentum: float = 0.0, b1: float = 0.9,
              b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """SGD (optional heavy-ball momentum, PyTorch's convention) or Adam with rate eta_Y on Y and eta_Z on Z.

    The rates may be traced (vmapped sweeps); concrete ones must be positive.
    """
    checks.one_of("optimizer", name, OPTIMIZERS)
    checks.number("eta_y", eta_y, low=0.0, low_open=True)
    checks.number("eta_z", eta_z, low=0.0, low_open=True)
    checks.number("momentum", momentum, low=0.0, high=1.0, high_open=True)

    def make(rate):
        if name == "sgd":
            return optax.sgd(rate, momentum=momentum or None)
        return optax.adam(rate, b1=b1, b2=b2, eps=eps)

    return optax.multi_transform({"y": make(eta_y), "z": make(eta_z)}, Params("y", "z"))


def class_outputs(z: jax.Array, problem: Problem, residual: bool = False) -> tuple[jax.Array, jax.Array]:
    """(c_n, f_n) of every class in population mode, from Z [M, M]: each [K, M]."""
    c = attention_mass(z[problem.query], problem.probs)
    return c, normalized_output(c, problem.query, residual)


def distinct_mask(probs: jax.Array, class_weight: jax.Array) -> jax.Array:
    """[..., K, M] True where token l has probability under class n only (a distinct token of n)."""
    support = (probs > 0) & (class_weight > 0)[..., None]
    return support & (jnp.sum(support, axis=-2, keepdims=True) == 1)


def xi_increment(z_before: jax.Array, z_after: jax.Array, problem: Problem, residual: bool = False
                 ) -> tuple[jax.Array, jax.Array]:
    """One step's eta_Z * xi_n and its spread over the distinct tokens of n.

    Theorem 2 writes dz_ml/dt = eta_Z xi_n(t) f_nl^2(t) for every distinct token l of n; one
    step's estimate is the mean over l of dz_ml / f_nl^2.

    Returns:
      (increment [K], spread [K] = std / |mean| of dz_ml / f_nl^2 over n's distinct tokens).
    """
    mask = distinct_mask(problem.probs, problem.class_weight)
    _, f = class_outputs(z_before, problem, residual)
    dz = z_after[problem.query] - z_before[problem.query]
    ratio = jnp.where(mask, dz / jnp.where(mask, f**2, 1.0), 0.0)
    count = jnp.maximum(jnp.sum(mask, axis=1), 1)
    mean = jnp.sum(ratio, axis=1) / count
    var = jnp.sum(jnp.where(mask, (ratio - mean[:, None]) ** 2, 0.0), axis=1) / count
    return mean, jnp.sqrt(var) / jnp.maximum(jnp.abs(mean), 1e-30)


class RunConfig(NamedTuple):
    """Static settings of a run (hashable: they fix shapes and control flow).

    steps: optimizer steps.
    mode: "sampled" (batch_size sequences of seq_len tokens per step), "population" (the exact
      expectation over classes with T -> infinity) or "one_class" (batch 1, population
      weights, classes in turn).
    batch_size, seq_len: of the sampled mode.
    optimizer: "sgd" or "adam"; momentum of SGD.
    init: "zero" or "uniform".
    residual: add the query's one-hot to the attention output (paper §7).
    record_every: steps between saves.
    record_y: also save Y (M x M per save).
    """

    steps: int
    mode: str = "population"
    batch_size: int = 128
    seq_len: int = 128
    optimizer: str = "sgd"
    momentum: float = 0.0
    init: str = "zero"
    residual: bool = False
    record_every: int = 1
    record_y: bool = False


def check_run(run: RunConfig) -> RunConfig:
    """Validates a `RunConfig` (ValueError naming the field); returns it."""
    checks.integer("steps", run.steps, minimum=1)
    checks.one_of("mode", run.mode, MODES)
    checks.integer("batch_size", run.batch_size, minimum=1)
    checks.integer("seq_len", run.seq_len, minimum=2)
    checks.one_of("optimizer", run.optimizer, OPTIMIZERS)
    checks.number("momentum", run.momentum, low=0.0, high=1.0, high_open=True)
    checks.one_of("init", run.init, INITS)
    checks.integer("record_every", run.record_every, minimum=1)
    if run.steps % run.record_every:
        raise ValueError(f"record_every={run.record_every} must divide steps={run.steps}")
    return run


def _batch_fn(run: RunConfig, problem: Problem) -> Callable[[jax.Array, jax.Array], Batch]:
    if run.mode == "population":
        full = population_batch(problem)
        return lambda step, key: full
    if run.mode == "one_class":
        return lambda step, key: one_class_batch(step, problem)
    return lambda step, key: sampled_batch(key, problem, run.batch_size, run.seq_len)


class Stepper(NamedTuple):
    """One run as a carry and pure functions of it (what `train` scans; a Python loop may call `step`).

    carry: (params, optimizer state, B_n [K], spread [K]) at step 0.
    step: (carry, i) -> carry after optimizer step i.
    snapshot: carry -> (z_query [K, M], population loss, B_n [K], spread [K], Y or None).
    """

    carry: Any
    step: Callable[[Any, jax.Array], Any]
    snapshot: Callable[[Any], tuple]


def stepper(problem: Problem, run: RunConfig, eta_y: Any, eta_z: Any, key: jax.Array) -> Stepper:
    """The initial state and the step of one run (see `train`)."""
    k, m = problem.probs.shape
    k_init, k_data = jax.random.split(key)
    params = init_params(k_init, m, run.init, jnp.sum(problem.vocab_mask))
    tx = optimizer(run.optimizer, eta_y, eta_z, momentum=run.momentum)
    batch_at = _batch_fn(run, problem)
    grad = jax.grad(loss)
    pop = population_batch(problem)

    def step(carry, i):
        params, opt_state, b, _ = carry
        g = grad(params, batch_at(i, jax.random.fold_in(k_data, i)), run.residual, problem.vocab_mask)
        updates, opt_state = tx.update(g, opt_state, params)
        new = optax.apply_updates(params, updates)
        inc, spread = xi_increment(params.z, new.z, problem, run.residual)
        return new, opt_state, b + inc, spread

    def snapshot(carry):
        params, _, b, spread = carry
        pop_loss = loss(params, pop, run.residual, problem.vocab_mask)
        return (params.z[problem.query], pop_loss, b, spread, params.y if run.record_y else None)

    return Stepper((params, tx.init(params), jnp.zeros(k), jnp.zeros(k)), step, snapshot)


def train(problem: Problem, run: RunConfig, eta_y: Any, eta_z: Any, key: jax.Array) -> tuple[Params, Record]:
    """Trains (Y, Z) from `run.init` for `run.steps` steps; jit-able, vmappable over eta_y, eta_z, key.

    Args:
      problem: the data (see `Problem`).
      run: static settings (see `RunConfig`).
      eta_y, eta_z: learning rates of Y and Z (scalars, may be traced).
      key: PRNG key of the initialization and the sampled batches.

    Returns:
      (final params, `Record` with run.steps / run.record_every + 1 saves).
    """
    one = stepper(problem, run, eta_y, eta_z, key)

    def block(carry, start):
        carry, _ = jax.lax.scan(lambda c, i: (one.step(c, i), None), carry, start + jnp.arange(run.record_every))
        return carry, one.snapshot(carry)

    first = one.snapshot(one.carry)
    starts = jnp.arange(0, run.steps, run.record_every)
    carry, saves = jax.lax.scan(block, one.carry, starts)
    saves = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, saves)
    z_query, pop_loss, b, spread, y = saves
    steps = jnp.concatenate([jnp.zeros(1, jnp.int32), starts.astype(jnp.int32) + run.record_every])
    return carry[0], Record(steps, z_query, pop_loss, b, spread, y)


def sweep(problem: Problem, run: RunConfig, eta_y: jax.Array, eta_z: jax.Array, keys: jax.Array, *,
          stacked: bool = False, chunk_size: int | None = None) -> tuple[Params, Record]:
    """`train` for R runs in one compiled program: eta_y, eta_z [R], keys [R] -> leaves with a leading [R].

    With `stacked`, `problem` carries a leading [R] axis too (see `stack_problems`): one problem per run.
    `chunk_size` runs are vmapped at a time and the chunks follow one another inside the program
    (`lax.map`), which bounds the working set (the runs' Y, Z and optimizer states); None: all at once.
    A last, partial chunk is padded with copies of run 0.
    """
    if chunk_size is not None:
        checks.integer("chunk_size", chunk_size, minimum=1)
        chunk_size = None if chunk_size >= jnp.shape(eta_y)[0] else chunk_size
    return _swept(check_run(run), stacked, chunk_size)(problem, eta_y, eta_z, keys)


@functools.lru_cache(maxsize=64)
def _swept(run: RunConfig, stacked: bool, chunk_size: int | None) -> Callable:
    """The jitted, vmapped `train` of one `RunConfig` (cached: repeated sweeps reuse its compilation)."""
    in_axes = (0 if stacked else None, 0, 0, 0)
    many = jax.vmap(lambda p, ey, ez, kk: train(p, run, ey, ez, kk), in_axes=in_axes)
    if chunk_size is None:
        return jax.jit(many)

    def chunked(problem, eta_y, eta_z, keys):
        runs = eta_y.shape[0]
        chunks = -(-runs // chunk_size)
        pad = chunks * chunk_size - runs

        def split(a):
            a = jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]) if pad else a
            return a.reshape((chunks, chunk_size) + a.shape[1:])

        per_run = (problem if stacked else None, eta_y, eta_z, keys)
        split_args = jax.tree.map(split, per_run)
        fixed = None if stacked else problem
        out = jax.lax.map(lambda args: many(fixed if args[0] is None else args[0], *args[1:]), split_args)
        return jax.tree.map(lambda a: a.reshape((chunks * chunk_size,) + a.shape[2:])[:runs], out)

    return jax.jit(chunked)


def run_one(problem: Problem, run: RunConfig, eta_y: float, eta_z: float, key: jax.Array) -> tuple[Params, Record]:
    """`train` for one run, checked and jitted."""
    check_run(run)
    checks.number("eta_y", eta_y, low=0.0, low_open=True)
    checks.number("eta_z", eta_z, low=0.0, low_open=True)
    return _train_jit(problem, run, eta_y, eta_z, key)


_train_jit = jax.jit(train, static_argnums=1)


# ----- derived quantities -------------------------------------------------------------------------

def class_trajectory(record: Record, problem: Problem, residual: bool = False) -> tuple[jax.Array, jax.Array]:
    """(c_n(t), f_n(t)) at every save: each [S, K, M] (population mode)."""
    c = attention_mass(record.z_query, problem.probs[None])
    return c, normalized_output(c, problem.query[None], residual)


def distinct_entropy(c: jax.Array, problem: Problem) -> jax.Array:
    """Entropy (nats) of c_n restricted to n's distinct tokens and renormalized: [..., K, M] -> [..., K]."""
    mask = distinct_mask(problem.probs, problem.class_weight)
    p = jnp.where(mask, c, 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


def chi(z_query: jax.Array) -> jax.Array:
    """chi_l(t) = exp(2 (z_ml(t) - z_ml(0))) from the query rows [S, ..., M] (save 0 = t = 0)."""
    return jnp.exp(2.0 * (z_query - z_query[0]))


def relative_gain(f: jax.Array, token: int, ref: int) -> jax.Array:
    """r_{l/l'|n}(t) = f_nl^2 / f_nl'^2 - 1 (l = token, l' = ref) from f [..., M]."""
    return f[..., token] ** 2 / f[..., ref] ** 2 - 1.0


# ----- closed forms -------------------------------------------------------------------------------

def h_recursion(steps: int, eta_y: float, num_tokens: int) -> np.ndarray:
    """Lemma 5: h*(s) = h*(s-1) + eta_Y / ((M - 1) + exp(M h*(s-1))), h*(0) = 0, in float64.

    With Y(0) = 0, Z fixed and orthonormal f_n, Y^T f_n = h*(s) (M e_n - 1) after s visits of class n.

    Returns:
      [steps + 1] h*(0), ..., h*(steps).
    """
    checks.integer("steps", steps, minimum=0)
    checks.number("eta_y", eta_y, low=0.0, low_open=True)
    checks.integer("num_tokens", num_tokens, minimum=2)
    out = np.zeros(steps + 1)
    for s in range(1, steps + 1):
        out[s] = out[s - 1] + eta_y / ((num_tokens - 1) + np.exp(num_tokens * out[s - 1]))
    return out


def h_continuous(t: Any, eta_y: float, num_tokens: int) -> np.ndarray:
    """Lemma 6: the h(t) solving exp(M h) + (M - 1) M h = M eta_Y t + 1 (the flow of Lemma 5), float64.

    Newton's method on the convex increasing u -> exp(u) + (M - 1) u - R (u = M h) from a
    start where it is non-negative, so the iterates decrease monotonically to the root.
    """
    checks.number("eta_y", eta_y, low=0.0, low_open=True)
    checks.integer("num_tokens", num_tokens, minimum=2)
    t = np.asarray(t, np.float64)
    if np.any(t < 0):
        raise ValueError(f"t must be >= 0, got min {t.min()}")
    m = num_tokens
    r = m * eta_y * t + 1.0
    u = np.minimum(np.log(r), (r - 1.0) / (m - 1))
    for _ in range(100):
        u = u - (np.exp(u) + (m - 1) * u - r) / (np.exp(u) + (m - 1))
    return u / m


def b_closed_form(t: Any, eta_y: float, eta_z: float, num_classes: int, num_tokens: int, c0: float) -> np.ndarray:
    """Theorem 4 as stated: B_n(t) = 1/4 ln(C0 + 2 (eta_Z / eta_Y) K (M - 1)^2 h^2(t / K)), float64."""
    checks.number("eta_z", eta_z, low=0.0, low_open=True)
    checks.number("c0", c0, low=0.0, low_open=True)
    checks.integer("num_classes", num_classes, minimum=1)
    h = h_continuous(np.asarray(t, np.float64) / num_classes, eta_y, num_tokens)
    return 0.25 * np.log(c0 + 2.0 * (eta_z / eta_y) * num_classes * (num_tokens - 1) ** 2 * h**2)
