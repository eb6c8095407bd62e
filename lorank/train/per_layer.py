"""The GaLore paper's per-layer weight update as a train step over a model family's stages.

    config.optim.update_schedule = "per_layer"   # "joint": the standard step (loop.make_train_step)
    config.optim.update_chunk = 2**24            # unprojected matrices updated in row chunks (0: whole leaves)
    config.optim.clip_scope = "per_leaf"         # each leaf clipped by its own norm (or clip_norm = 0)

The standard step computes every gradient, then every update, so all gradients
are alive at once (and global-norm clipping needs them all). The per-layer step
walks the model as a list of stages (`lorank.models.family.Stage`: for LLaMA the
embedding, each block, the head) and back-propagates stage by stage from the
last (`layer_groups`), updating each stage's weights before the next stage's
backward, so at most one stage's gradient exists at a time (docs/memory.md has
the measured memory). With per-leaf clipping (or none) it computes exactly what
the standard step computes; it takes no gradient accumulation and trains the
model's own parameters (full-rank methods, GaLore included; not lowrank, lora,
relora).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lorank import checks, optim
from lorank.models.family import ModelFamily, Stage
from lorank.optim import quantize
from lorank.train import loop, methods, optimizers
from lorank.train import mesh as mesh_lib

UPDATE_SCHEDULES = ("joint", "per_layer")
# Update rules that act elementwise on the leaves outside GaLore's mask (LLaMA's embedding and LM
# head), so that updating those in row chunks gives exactly the whole leaf's update.
ELEMENTWISE = ("adamw", "adamw8bit", "sgd", "galore", "galore8bit")


# --------------------------------------------------------------------------- the plan


def layer_groups(stages: list[Stage]) -> list[tuple[str, ...]]:
    """The stages' top-level parameter groups in the order the backward pass reaches them (last stage
    first; for LLaMA: the head, blocks L-1 .. 0, the embedding)."""
    return [stage.keys for stage in reversed(stages)]


@dataclasses.dataclass(frozen=True)
class Piece:
    """One update region of the per-layer step: a group's whole leaves, or rows of one leaf.

    `leaf` None: every leaf of `group` except `chunked`; else rows [start, stop) of the leaf at
    path `leaf` (a [rows, cols] matrix)."""

    group: tuple[str, ...]
    leaf: tuple[str, ...] | None = None
    start: int = 0
    stop: int = 0
    chunked: tuple[tuple[str, ...], ...] = ()

    @property
    def name(self) -> str:
        base = "+".join(self.group)
        return base if self.leaf is None else f"{'/'.join(self.leaf)}[{self.start}:{self.stop}]"


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _nest(path: tuple[str, ...], value: Any) -> dict:
    for k in reversed(path):
        value = {k: value}
    return value


def _without(tree: dict, paths: tuple[tuple[str, ...], ...]) -> dict:
    """A copy of nested dict `tree` without the leaves at `paths` (emptied dicts dropped)."""
    out = {}
    for k, v in tree.items():
        inner = tuple(p[1:] for p in paths if p[0] == k)
        if () in inner:
            continue
        v = _without(v, inner) if inner and isinstance(v, dict) else v
        if not (isinstance(v, dict) and not v):
            out[k] = v
    return out


def _merge(a: dict, b: dict) -> dict:
    """Nested dicts `a` and `b` merged (b's leaves win)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _rows(leaf: Any, start: int, stop: int) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((stop - start, *leaf.shape[1:]), leaf.dtype)
    return leaf[start:stop]


def piece_tree(group_tree: dict, piece: Piece) -> dict:
    """The part of a group's tree (parameters, gradients or their ShapeDtypeStructs) that `piece`
    updates; chunks keep their leaf's path, so path-based masks select them as they select the leaf."""
    if piece.leaf is None:
        return _without(group_tree, piece.chunked)
    return _nest(piece.leaf, _rows(_get(group_tree, piece.leaf), piece.start, piece.stop))


def row_chunks(rows: int, cols: int, max_values: int, block_size: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most `max_values` values each (at least one aligned row group),
    each a multiple of `block_size` values when rows allow, so 8-bit blocks fall as in the whole leaf."""
    align = block_size // math.gcd(cols, block_size)
    step = max(align, (max_values // cols) // align * align)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def update_plan(params: dict, groups: list[tuple[str, ...]], *, chunk_values: int, block_size: int,
                chunkable: Callable[[tuple[str, ...], tuple[int, ...]], bool]) -> list[list[Piece]]:
    """Per group of `groups` (`layer_groups` order), the pieces its update runs as: matrices with
    more than `chunk_values` values that `chunkable(path, shape)` allows are updated in row chunks
    (`row_chunks`), the group's other leaves in one piece. `chunk_values` 0: no chunks."""
    plan = []
    for group in groups:
        sub = {k: params[k] for k in group}
        chunked = []
        for path, leaf in jax.tree_util.tree_flatten_with_path(sub)[0]:
            keys = tuple(str(k.key) for k in path)
            if chunk_values and leaf.ndim == 2 and leaf.size > chunk_values and chunkable(keys, leaf.shape):
                chunked.append((keys, leaf.shape))
        paths = tuple(k for k, _ in chunked)
        pieces = [Piece(group, chunked=paths)] if _without(sub, paths) else []
        for keys, (rows, cols) in chunked:
            pieces += [Piece(group, keys, a, b) for a, b in row_chunks(rows, cols, chunk_values, block_size)]
        plan.append(pieces)
    return plan


def _pieces(plan: list[list[Piece]]) -> list[Piece]:
    return [piece for pieces in plan for piece in pieces]


def init_fn(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
            plan: list[list[Piece]]) -> Callable[[jax.Array], loop.TrainState]:
    """key -> TrainState whose opt_state holds one independent `tx` state per piece of `plan`
    ({piece.name: tx.init(piece_tree(group params, piece))})."""

    def init(key):
        params = nn.unbox(init_params(key))
        states = {piece.name: tx.init(piece_tree({k: params[k] for k in piece.group}, piece))
                  for piece in _pieces(plan)}
        return loop.TrainState(jnp.zeros((), jnp.int32), params, states, {}, jnp.zeros((), jnp.int32))

    return init


# --------------------------------------------------------------------------- the step


def train_step(stages: list[Stage], tx: optax.GradientTransformation, plan: list[list[Piece]], *,
               clip_norm: float) -> Callable:
    """A train step that updates each stage's weights as soon as their gradient exists.

    Forward: the stages in order, keeping only each stage's input. Backward, stage by stage from
    the last (`layer_groups`): one `jax.lax.cond` region recomputes the stage under `jax.vjp`
    (full remat) and returns its weight gradient, clipped leaf by leaf at `clip_norm` (0: none),
    and its input cotangent; then one region per piece of `plan` updates those weights (or rows)
    with the piece's own `tx` state. Each region takes the cotangent from the previous one and
    hands it on, so XLA cannot defer an update past the next stage's backward, and no two
    stages' gradients are alive at once. (`optimization_barrier` does not give this order:
    XLA's CPU pipeline drops barriers before scheduling.) The regions' predicate is a finite
    loss; with a non-finite loss no weight or state changes.

    Args:
      stages: the model in forward order (`ModelFamily.stages`); the last returns the loss.
      tx: the update rule without clipping; row chunks (`update_plan`) need one that acts
        elementwise on the chunked leaves, so that chunks update exactly as the whole leaf.
      plan: `update_plan` of the parameters over `layer_groups(stages)`.
      clip_norm: per-leaf clipping threshold (the chunked leaf's own norm, not the chunk's).
    Returns:
      step(state, batch with leaves [1, B, ...]) -> (state, {"loss", "grad_norm", "finite"}),
      with state from `init_fn(..., plan)`.
    """

    def backward(forward: Callable, finite, params, x, cotangent):
        """(clipped gradient of params, cotangent of x or None, squared gradient norm).

        forward(params, x) is the stage's output; x None: no differentiable input."""

        def run(operands):
            params, x, cotangent = operands
            if x is None:
                _, vjp = jax.vjp(lambda p: forward(p, None), params)
                (grads,), x_cotangent = vjp(cotangent), None
            else:
                _, vjp = jax.vjp(forward, params, x)
                grads, x_cotangent = vjp(cotangent)
            sq_norm = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads))
            if clip_norm:
                grads = optimizers.clip_by_leaf_norm(clip_norm).update(grads, optax.EmptyState())[0]
            return grads, x_cotangent, sq_norm

        def skip(operands):
            params, x, _ = operands
            return (jax.tree.map(jnp.zeros_like, params), None if x is None else jnp.zeros_like(x),
                    jnp.zeros((), jnp.float32))

        return jax.lax.cond(finite, run, skip, (params, x, cotangent))

    def update(finite, params, opt_state, grads, cotangent):
        """(new params, new state, cotangent) of one piece; the cotangent passes through."""

        def run(operands):
            params, opt_state, grads, cotangent = operands
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, cotangent

        def skip(operands):
            params, opt_state, _, cotangent = operands
            return params, opt_state, jax.tree.map(jnp.zeros_like, cotangent)

        return jax.lax.cond(finite, run, skip, (params, opt_state, grads, cotangent))

    def step(state: loop.TrainState, batch):
        accum = jax.tree.leaves(batch)[0].shape[0]
        if accum != 1:
            raise ValueError(f"the per-layer step takes no gradient accumulation, got {accum} micro-batches")
        batch = jax.tree.map(lambda x: x[0], batch)
        params = state.params

        def group(keys):
            return {k: params[k] for k in keys}

        inputs = [None]  # inputs[k]: the input of stage k
        for stage in stages[:-1]:
            inputs.append(stage.apply(group(stage.keys), inputs[-1], batch))
        loss = stages[-1].apply(group(stages[-1].keys), inputs[-1], batch)
        finite = jnp.isfinite(loss)

        new_params, new_states, sq_norms = {}, {}, []
        cotangent = jnp.ones((), jnp.float32)
        for k, pieces in zip(reversed(range(len(stages))), plan):
            stage = stages[k]
            group_params = group(stage.keys)
            forward = lambda p, x, stage=stage: stage.apply(p, x, batch)  # noqa: E731
            grads, x_cotangent, sq_norm = backward(forward, finite, group_params, inputs[k], cotangent)
            sq_norms.append(sq_norm)
            carry = jnp.zeros((), jnp.float32) if x_cotangent is None else x_cotangent
            new_group, chunks = {}, {}
            for piece in pieces:
                new, new_states[piece.name], carry = update(
                    finite, piece_tree(group_params, piece), state.opt_state[piece.name],
                    piece_tree(grads, piece), carry)
                if piece.leaf is None:
                    new_group.update(new)
                else:
                    chunks.setdefault(piece.leaf, []).append(_get(new, piece.leaf))
            for path, parts in chunks.items():
                new_group = _merge(new_group, _nest(path, jnp.concatenate(parts, axis=0)))
            new_params.update(new_group)
            cotangent = carry
        metrics = {"loss": loss, "grad_norm": jnp.sqrt(sum(sq_norms)), "finite": finite}
        skipped = state.skipped + (~finite).astype(jnp.int32)
        return loop.TrainState(state.step + 1, new_params, new_states, state.extra, skipped), metrics

    return step


# --------------------------------------------------------------------------- from a config


def check_config(config) -> None:
    """Checks `optim.update_schedule` and what the per-layer step needs, before anything runs.

    Raises:
      ValueError: an unknown schedule; for "per_layer": a factored method, gradient
        accumulation, global-norm clipping, or an `update_chunk` that is not 0 or at least
        `quantize.MIN_SIZE` (smaller chunks would keep 8-bit moments unquantized).
    """
    c = config.optim
    schedule = c.get("update_schedule", "joint")
    if schedule not in UPDATE_SCHEDULES:
        raise ValueError(f"unknown optim.update_schedule={schedule!r}; expected one of {UPDATE_SCHEDULES}")
    if schedule == "joint":
        return
    if c.name in methods.FACTORED:
        raise ValueError(f"optim.update_schedule='per_layer' trains the model's own parameters; "
                         f"optim.name={c.name!r} factors them: use a full-rank method {optimizers.OPTIMIZERS}")
    if int(config.train.grad_accum) != 1:
        raise ValueError(f"optim.update_schedule='per_layer' updates each layer from one backward pass; "
                         f"train.grad_accum={config.train.grad_accum} must be 1")
    if c.clip_norm and c.get("clip_scope", "global") != "per_leaf":
        raise ValueError(f"optim.update_schedule='per_layer' clips each leaf by its own norm; "
                         f"optim.clip_scope={c.get('clip_scope', 'global')!r} must be 'per_leaf' "
                         f"(or optim.clip_norm=0)")
    chunk = checks.integer("optim.update_chunk", c.get("update_chunk", 0), minimum=0)
    if 0 < chunk < quantize.MIN_SIZE:
        raise ValueError(f"optim.update_chunk={chunk!r} must be 0 (whole leaves) or an integer of at least "
                         f"{quantize.MIN_SIZE} values (smaller chunks would keep 8-bit moments unquantized)")


def _fit(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """`sharding` with the mesh axes dropped from every dimension of `shape` they do not divide."""
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    axes = []
    for dim, entry in zip(shape, spec):
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        size = math.prod(sharding.mesh.shape[n] for n in names)
        axes.append(entry if dim % size == 0 else None)
    return NamedSharding(sharding.mesh, PartitionSpec(*axes))


def step_plan(config, family: ModelFamily, stages: list[Stage], task: loop.Task, mesh: Mesh,
              key: jax.Array) -> loop.StepPlan:
    """The per-layer `loop.StepPlan` of training config `config` (a full-rank method) over `stages`.

    The update rule is `optim.name`'s without clipping (the step clips each leaf at
    `optim.clip_norm` itself). With `optim.update_chunk` > 0, matrices outside the family's
    GaLore mask (LLaMA's embedding and LM head) are updated in row chunks of at most that many
    values when the method acts elementwise on them (ELEMENTWISE). Each piece's optimizer state
    follows its parameters' sharding (`lorank.optim.optimizer_state_shardings`; a chunk keeps its
    leaf's sharding where the mesh divides the chunk).

    Args:
      config: the training config (`optim`, `train`).
      family: the model's family (GaLore mask, matrix axes).
      stages: the model in forward order, the last returning `task`'s loss (`family.stages(...)`).
      task: the full-rank task; its parameters are the state's.
      mesh, key: as for `loop.joint_step_plan`.
    Raises:
      ValueError: see `check_config`.
    """
    check_config(config)
    c = config.optim
    tx = optimizers.update_rule(c, c.name, optimizers.learning_rate_schedule(c, int(config.train.steps)), family)
    boxed = jax.eval_shape(task.init_params, key)
    params = nn.unbox(boxed)
    projected = {tuple(str(k.key) for k in path)
                 for path, chosen in jax.tree_util.tree_flatten_with_path(family.galore_mask(params))[0] if chosen}
    chunk = int(c.get("update_chunk", 0)) if c.name in ELEMENTWISE else 0
    plan = update_plan(params, layer_groups(stages), chunk_values=chunk, block_size=int(c.block_size),
                       chunkable=lambda path, shape: path not in projected)
    init = init_fn(task.init_params, tx, plan)
    param_shardings = mesh_lib.logical_shardings(boxed, mesh, task.axis_rules)
    state_shardings = {}
    for piece in _pieces(plan):
        group_shardings = {k: param_shardings[k] for k in piece.group}
        shapes = piece_tree({k: params[k] for k in piece.group}, piece)
        if piece.leaf is None:
            shardings = piece_tree(group_shardings, piece)
        else:
            leaf_sharding = _fit(_get(group_shardings, piece.leaf), _get(shapes, piece.leaf).shape)
            shardings = _nest(piece.leaf, leaf_sharding)
        state_shardings[piece.name] = optim.optimizer_state_shardings(tx, shapes, shardings, mesh=mesh)
    replicated = mesh_lib.replicated(mesh)
    shardings = loop.TrainState(replicated, param_shardings, state_shardings, {}, replicated)
    step = train_step(stages, tx, plan, clip_norm=float(c.clip_norm))
    return loop.StepPlan(init, jax.eval_shape(init, key), shardings, step)
