"""Low-rank baselines as parameter-space transformations: low-rank factorization, LoRA, ReLoRA.

Nothing here changes a model. Selected 2-D kernels of a parameter tree (chosen
by a path pattern, e.g. a model family's `projected` kernels: the attention and
MLP projections of `lorank.models.llama.Llama`) are replaced by small dicts of
factors, and `materialize` turns such a tree back
into the full tree the unchanged module applies:

    loss(params, batch) = base_loss(materialize(params, scale=...), batch)

so autodiff gives exact gradients with respect to the factors.

Convention. A flax `nn.Dense` kernel K is [m, n] with y = x K (m inputs, n
outputs), the transpose of the papers' W [n, m] with y = W x. We store the
factors in kernel layout:

    "a": [m, r]   (= A^T, the input-side factor, applied first: x a)
    "b": [r, n]   (= B^T, the output-side factor)

so K = a b is W = B A transposed, and LoRA's "B starts at zero" is b = 0.

Nodes (each replaces one kernel leaf `.../kernel`):

    low-rank factorization   {"lowrank_a": [m, r], "lowrank_b": [r, n]}                K = a b
    LoRA                     {"lora_base": [m, n], "lora_a": [m, r], "lora_b": [r, n]}  K = base + (alpha/r) a b

LoRA's base is frozen: `materialize` stops its gradient, and `freeze_base`
(an `optax.multi_transform`) gives it no update, not even weight decay.
ReLoRA (Lialin et al., 2023) is LoRA with a merge every `reset_every` steps:
`relora_merge_and_reinit` folds (alpha/r) a b into the base and restarts the
factors, `prune_opt_state` keeps only the largest Adam moments of the factors,
`jagged_cosine_schedule` re-warms the learning rate after each merge, and
`relora` packages the periodic merge as an optax wrapper for the generic loop.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lorank import checks

LOWRANK_KEYS = ("lowrank_a", "lowrank_b")
LORA_KEYS = ("lora_base", "lora_a", "lora_b")
TRAINABLE, FROZEN = "trainable", "frozen"


# ----------------------------------------------------------------------------- tree plumbing


def _node_kind(tree: Mapping) -> str | None:
    keys = set(tree.keys())
    if keys == set(LOWRANK_KEYS):
        return "lowrank"
    if keys == set(LORA_KEYS):
        return "lora"
    return None


def _map_nodes(tree: Any, fn: Callable[[str, Mapping], Any], leaf_fn: Callable[[Any], Any] = lambda x: x) -> Any:
    """Rebuilds nested dicts, calling fn(kind, node) on factor nodes and leaf_fn on other leaves."""
    if isinstance(tree, Mapping):
        kind = _node_kind(tree)
        if kind is not None:
            return fn(kind, tree)
        return {k: _map_nodes(v, fn, leaf_fn) for k, v in tree.items()}
    return leaf_fn(tree)


def _map_selected(tree: Any, pattern: str, fn: Callable[[str, Any, int], Any]) -> Any:
    """Rebuilds nested dicts, replacing leaves whose 'a/b/c' path fully matches `pattern` by fn(path, leaf, i).

    i counts the selected leaves in traversal order (for per-leaf keys).
    Raises ValueError, naming the pattern, if nothing matches.
    """
    regex = re.compile(pattern)
    counter = [0]

    def walk(node, prefix):
        if isinstance(node, Mapping):
            return {k: walk(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in node.items()}
        if regex.fullmatch(prefix):
            counter[0] += 1
            return fn(prefix, node, counter[0] - 1)
        return node

    out = walk(tree, "")
    if counter[0] == 0:
        raise ValueError(f"pattern {pattern!r} matches no parameter path")
    return out


def _unboxed(leaf: Any, path: str) -> tuple[jax.Array, Callable[[jax.Array, tuple], Any]]:
    """(value, rebox) for a plain or `nn.LogicallyPartitioned` 2-D leaf; rebox(x, names) boxes x like the leaf."""
    if isinstance(leaf, nn.LogicallyPartitioned):
        value, names = leaf.value, tuple(leaf.names)
        rebox = lambda x, axes: leaf.replace(value=x, names=axes)  # noqa: E731
    else:
        value, names = leaf, (None, None)
        rebox = lambda x, axes: x  # noqa: E731
    if value.ndim != 2:
        raise ValueError(f"{path} has shape {tuple(value.shape)}; only 2-D kernels can be factored")
    return value, lambda x, which: rebox(x, (names[0], None) if which == "a" else (None, names[1]))


def _check_rank(rank: Any, shape: tuple[int, int], path: str) -> None:
    checks.integer("rank", rank, minimum=1)
    if rank > min(shape):
        raise ValueError(f"rank={rank} exceeds min{tuple(shape)}={min(shape)} of {path}")


def _leaf_key(key: jax.Array, index: int) -> jax.Array:
    return jax.random.fold_in(key, index)


# ----------------------------------------------------------------------------- low-rank factorization


def lowrank_factor_std(init_std: float, rank: int) -> float:
    """Std s of both factors so that (a b)_ij = sum_k a_ik b_kj has variance r s^4 = init_std^2."""
    return math.sqrt(init_std / math.sqrt(rank))


def lowrank_init(params: Any, key: jax.Array, *, rank: int, init_std: float, pattern: str) -> Any:
    """Replaces each selected kernel [m, n] by {"lowrank_a": [m, r], "lowrank_b": [r, n]}, trained from scratch.

    Both factors are i.i.d. normal with std sqrt(init_std / sqrt(r)), so the
    product a b has the entry variance init_std^2 of the full-rank init it
    replaces (the balanced choice: neither factor dominates the gradients).
    The full kernel's value is discarded. Boxed leaves
    (`nn.LogicallyPartitioned`) give boxed factors: a keeps the kernel's input
    axis name, b its output axis name; the rank axis is replicated (None).

    Args:
      params: parameter tree (plain or boxed leaves), e.g. Llama's "params".
      key: PRNG key; factor i uses fold_in(key, i).
      rank: r, at most min(m, n) of every selected kernel.
      init_std: std of the full-rank init being replaced (LlamaConfig.init_std).
      pattern: regex over 'a/b/c' leaf paths selecting the kernels.
    Returns:
      The tree with the selected leaves replaced by factor dicts.
    """
    checks.number("init_std", init_std, low=0.0, low_open=True)

    def factor(path, leaf, i):
        value, rebox = _unboxed(leaf, path)
        _check_rank(rank, value.shape, path)
        std = lowrank_factor_std(init_std, rank)
        ka, kb = jax.random.split(_leaf_key(key, i))
        m, n = value.shape
        a = std * jax.random.normal(ka, (m, rank), value.dtype)
        b = std * jax.random.normal(kb, (rank, n), value.dtype)
        return {"lowrank_a": rebox(a, "a"), "lowrank_b": rebox(b, "b")}

    return _map_selected(params, pattern, factor)


# ----------------------------------------------------------------------------- LoRA


def lora_scale(alpha: float, rank: int) -> float:
    """The LoRA multiplier alpha / r."""
    return checks.number("alpha", alpha) / checks.integer("rank", rank, minimum=1)


def _lora_a(key: jax.Array, m: int, rank: int, dtype) -> jax.Array:
    """LoRA's input-side factor: N(0, 1/m) entries, so x a keeps the scale of x (fan-in m)."""
    return jax.random.normal(key, (m, rank), dtype) / math.sqrt(m)


def lora_init(params: Any, key: jax.Array, *, rank: int, pattern: str) -> Any:
    """Wraps each selected kernel [m, n] as {"lora_base": kernel, "lora_a": [m, r] ~ N(0, 1/m), "lora_b": 0 [r, n]}.

    With b = 0 the LoRA model computes exactly the base model at init. Boxed
    leaves give boxed factors (see `lowrank_init`); the base keeps its box.
    """

    def wrap(path, leaf, i):
        value, rebox = _unboxed(leaf, path)
        _check_rank(rank, value.shape, path)
        m, n = value.shape
        a = _lora_a(_leaf_key(key, i), m, rank, value.dtype)
        b = jnp.zeros((rank, n), value.dtype)
        return {"lora_base": leaf, "lora_a": rebox(a, "a"), "lora_b": rebox(b, "b")}

    return _map_selected(params, pattern, wrap)


def _product(a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(dtype)


def materialize(params: Any, *, scale: float = 1.0, freeze_base: bool = True) -> Any:
    """The full parameter tree the unchanged model applies (unboxed input).

    Low-rank nodes become a b; LoRA nodes become base + scale * a b, with the
    base under `stop_gradient` when `freeze_base` (no gradient, and no backward
    compute, flows into it). Other leaves pass through unchanged.

    Args:
      params: tree holding factor nodes; leaves are arrays [m, r], [r, n], [m, n].
      scale: LoRA's alpha / r (ignored by low-rank nodes).
      freeze_base: stop the gradient into LoRA bases.
    """

    def full(kind, node):
        if kind == "lowrank":
            a, b = node["lowrank_a"], node["lowrank_b"]
            return _product(a, b, a.dtype)
        base = node["lora_base"]
        base = jax.lax.stop_gradient(base) if freeze_base else base
        return base + scale * _product(node["lora_a"], node["lora_b"], base.dtype)

    return _map_nodes(params, full)


def merge_lora(params: Any, *, scale: float) -> Any:
    """Folds every LoRA node into a plain kernel base + scale * a b: the full tree for evaluation and export."""
    return materialize(params, scale=scale, freeze_base=False)


def factored_loss(base_loss: Callable[..., Any], *, scale: float = 1.0) -> Callable:
    """(params, *args) -> base_loss(materialize(params, scale=scale), *args), for any loss taking the
    parameters first ((params, batch) or the training loop's (params, extra, batch, rng))."""
    return lambda params, *args: base_loss(materialize(params, scale=scale), *args)


def lora_labels(params: Any, *, train_others: bool = True) -> Any:
    """"frozen" at LoRA bases, "trainable" at LoRA factors; other leaves "trainable" iff `train_others`.

    ReLoRA and the GaLore paper's baselines train embeddings, norms and the LM
    head full-rank (train_others=True); classic LoRA fine-tuning freezes them.
    """
    other = TRAINABLE if train_others else FROZEN

    def node_labels(kind, node):
        return {k: (FROZEN if k == "lora_base" else TRAINABLE) for k in node}

    return _map_nodes(params, node_labels, lambda _: other)


def lora_factor_mask(params: Any) -> Any:
    """True at LoRA factors (lora_a, lora_b), False elsewhere: what a ReLoRA reset prunes."""
    return _map_nodes(params, lambda kind, node: {k: kind == "lora" and k != "lora_base" for k in node},
                      lambda _: False)


def freeze_base(tx: optax.GradientTransformation, *, train_others: bool = True) -> optax.GradientTransformation:
    """`tx` on trainable leaves, zero updates (and no optimizer state) on frozen ones (see `lora_labels`)."""
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()},
                                 lambda params: lora_labels(params, train_others=train_others))


# ----------------------------------------------------------------------------- ReLoRA


def relora_merge_and_reinit(params: Any, key: jax.Array, *, scale: float) -> Any:
    """ReLoRA reset: base <- base + scale a b, a <- fresh N(0, 1/m), b <- 0 at every LoRA node.

    The function computed is unchanged (b = 0 after the reset). LoRA node i
    draws its new a from fold_in(key, i), in traversal order. Pure; jit-able.
    """
    counter = [0]

    def reset(kind, node):
        if kind != "lora":
            return dict(node)
        base, a, b = node["lora_base"], node["lora_a"], node["lora_b"]
        counter[0] += 1
        new_a = _lora_a(_leaf_key(key, counter[0] - 1), a.shape[0], a.shape[1], a.dtype)
        return {"lora_base": base + scale * _product(a, b, base.dtype), "lora_a": new_a,
                "lora_b": jnp.zeros_like(b)}

    return _map_nodes(params, reset)


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def keep_count(size: int, keep_fraction: float) -> int:
    """Entries a pruned tensor of `size` entries keeps: round-half-up(keep_fraction * size)."""
    return int(math.floor(keep_fraction * size + 0.5))


def magnitude_prune(x: jax.Array, keep_fraction: float) -> jax.Array:
    """x with all but its keep_count(x.size) largest-magnitude entries set to zero (ties: exactly that many kept)."""
    k = keep_count(x.size, keep_fraction)
    if k == 0:
        return jnp.zeros_like(x)
    if k >= x.size:
        return x
    flat = x.reshape(-1)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    keep = jnp.zeros(flat.shape, bool).at[idx].set(True)
    return jnp.where(keep, flat, 0).reshape(x.shape)


def prune_opt_state(opt_state: Any, params_mask: Any, keep_fraction: float) -> Any:
    """ReLoRA's partial optimizer reset: magnitude-prune the state leaves that mirror masked parameters.

    A state leaf mirrors a parameter when the tail of its tree path is that
    parameter's path and the shapes agree (Adam's mu and nu, also inside
    `optax.chain` / `multi_transform`); each such leaf keeps its
    round(keep_fraction * size) largest-magnitude entries, independently (as
    ReLoRA prunes exp_avg and exp_avg_sq). keep_fraction 0 zeroes them
    (a full reset); counts and other leaves are untouched.

    Args:
      opt_state: any optax state pytree.
      params_mask: bool tree with the parameters' structure (e.g. `lora_factor_mask(params)`);
        leaves may be Python bools or arrays (shapes are taken from the state leaf).
      keep_fraction: in [0, 1]; ReLoRA uses 0.01 (prune 99%).
    """
    checks.number("keep_fraction", keep_fraction, low=0.0, high=1.0)
    masked = {tuple(_key_str(k) for k in path)
              for path, flag in jax.tree_util.tree_flatten_with_path(params_mask)[0] if bool(flag)}

    def prune(path, leaf):
        names = tuple(_key_str(k) for k in path)
        if getattr(leaf, "ndim", 0) >= 1 and any(names[i:] in masked for i in range(len(names))):
            return magnitude_prune(leaf, keep_fraction)
        return leaf

    return jax.tree_util.tree_map_with_path(prune, opt_state)


def jagged_cosine_schedule(peak_value: float, total_steps: int, warmup_steps: int, reset_every: int,
                           restart_warmup_steps: int, end_value: float = 0.0) -> optax.Schedule:
    """Cosine envelope with a short linear re-warmup after each ReLoRA reset.

    envelope(t): linear 0 -> peak over `warmup_steps`, then cosine to
    `end_value` at `total_steps` (optax.warmup_cosine_decay_schedule).
    For t = k R + j with k >= 1 and 0 <= j < W (R = reset_every,
    W = restart_warmup_steps): lr(t) = (j / W) envelope(k R + W); else
    lr(t) = envelope(t). So lr is 0 at every reset step k R and climbs back
    to the envelope at k R + W.
    """
    for name, value in (("total_steps", total_steps), ("reset_every", reset_every),
                        ("restart_warmup_steps", restart_warmup_steps)):
        checks.integer(name, value, minimum=1)
    checks.integer("warmup_steps", warmup_steps, minimum=0, maximum=total_steps - 1)
    if restart_warmup_steps >= reset_every:
        raise ValueError(f"restart_warmup_steps={restart_warmup_steps} must be below reset_every={reset_every}")
    checks.number("peak_value", peak_value, low=0.0, low_open=True)
    checks.number("end_value", end_value, low=0.0)
    envelope = optax.warmup_cosine_decay_schedule(0.0, peak_value, warmup_steps, total_steps, end_value)

    def schedule(count):
        count = jnp.asarray(count)
        k, j = count // reset_every, count % reset_every
        ramp = j / restart_warmup_steps * envelope(k * reset_every + restart_warmup_steps)
        return jnp.where((k >= 1) & (j < restart_warmup_steps), ramp, envelope(count))

    return schedule


class ReloraState(NamedTuple):
    count: jax.Array  # [] int32, updates applied so far
    inner: optax.OptState  # the wrapped transformation's state


def relora(tx: optax.GradientTransformation, *, reset_every: int, scale: float, keep_fraction: float = 0.0,
           seed: int = 0) -> optax.GradientTransformation:
    """ReLoRA as an optax wrapper: `tx`, then a merge-and-reinit after every `reset_every`-th update.

    After update c (1-based) with c % reset_every == 0 the returned updates
    carry the parameters to `relora_merge_and_reinit(params + u, fold_in(key(seed), c // reset_every))`
    and the inner state is pruned by `prune_opt_state(..., lora_factor_mask, keep_fraction)`.
    Wrap the frozen-base optimizer: `relora(freeze_base(adamw), ...)`; the base
    changes only through merges. Needs `params` in `update`.
    """
    checks.integer("reset_every", reset_every, minimum=1)
    checks.number("keep_fraction", keep_fraction, low=0.0, high=1.0)

    def init(params):
        return ReloraState(jnp.zeros([], jnp.int32), tx.init(params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("relora needs the parameters: call update(grads, state, params)")
        updates, inner = tx.update(grads, state.inner, params)
        count = state.count + 1
        stepped = optax.apply_updates(params, updates)

        def reset(args):
            new_params, inner_state = args
            key = jax.random.fold_in(jax.random.key(seed), count // reset_every)
            merged = relora_merge_and_reinit(new_params, key, scale=scale)
            return merged, prune_opt_state(inner_state, lora_factor_mask(new_params), keep_fraction)

        stepped, inner = jax.lax.cond(count % reset_every == 0, reset, lambda args: args, (stepped, inner))
        updates = jax.tree.map(lambda new, old: new - old, stepped, params)
        return updates, ReloraState(count, inner)

    return optax.GradientTransformation(init, update)
