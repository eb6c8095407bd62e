"""One generic, sharded, resumable training loop for every workload.

A `Task` says what is trained: initial parameters and non-gradient state
(BatchNorm statistics, an EMA target network, a running correlation matrix), a loss

    loss_fn(params, extra, batch, rng) -> (loss, aux)

an optional update of the non-gradient state after each optimizer step, batches
as pytrees that are a pure function of the step, and evaluators with their own
period. An optax `GradientTransformation` says how. `run` builds the `TrainState`
on the mesh, restores the newest intact checkpoint of the workdir if there is one
(`lorank.train.checkpoints`), and then repeats a single jitted step

    step(state, batch) -> (state, metrics),   batch leaves: [grad_accum, micro_batch, ...]

with in/out shardings and the state donated, logging a progress line, JSON-lines
metrics and evaluations, and checkpointing as it goes. Batches depend only on the
step, the step's PRNG key only on (seed, step), and the whole state is
checkpointed, so an interrupted run resumed from its workdir retraces an
uninterrupted one exactly.

A step whose loss or gradient norm is not finite changes nothing but the step
count: its update is not applied (the state keeps its previous values and
`skipped` counts it). The flag leaves the jitted step every step; with
`on_nonfinite="stop"` (the default) the run then stops, naming the step, before
anything after it is checkpointed; with "skip" it goes on. A state holding a
non-finite value is never written to a checkpoint.

Multi-process runs (`jax.distributed.initialize`): every process feeds only its
own rows of each batch (`Task.train_batch(step, rows)`,
`mesh.global_batch`), checkpoints go through orbax's multi-process path, and only
process 0 writes metrics, config.json and progress lines.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from lorank import checks, optim
from lorank.train import checkpoints
from lorank.train import mesh as mesh_lib

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
# Config sections that must match for a workdir's checkpoint to be resumed, unless the task says otherwise ...
RESUME_SECTIONS = ("model", "data", "train", "optim")
# ... except these fields, which change what is reported or what happens after a failure, not what is computed.
REPORTING_FIELDS = ("train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
                    "train.keep_checkpoints", "train.on_nonfinite")
NONFINITE_POLICIES = ("stop", "skip")
_STEP_KEYS, _EXTRA_KEYS = 1, 2  # fold-in streams of the run's key: per-step keys, non-gradient state init


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes: one pytree, checkpointed whole."""

    step: jax.Array  # [] int32, steps taken (updates applied or skipped)
    params: Any
    opt_state: Any
    extra: Any  # non-gradient state (BatchNorm statistics, EMA targets, running statistics); {} if none
    skipped: jax.Array  # [] int32, steps whose update was not applied (non-finite loss or gradient)


LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, dict]]


def plain_loss(loss: Callable[[Any, Any], jax.Array]) -> LossFn:
    """`loss(params, batch) -> scalar` as a loop loss: no non-gradient state, no key, no aux."""
    return lambda params, extra, batch, rng: (loss(params, batch), {})


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """Scalars measured on the train state every `every` steps, at step 0 of a fresh run and at the end.

    Attributes:
      every: period in steps.
      make: mesh -> evaluate(state) -> {name: float}; called once per run, so `evaluate` may
        jit and cache. Inputs arrive laid out on the mesh (a state of the run).
    """

    every: int
    make: Callable[[Mesh], Callable[[TrainState], dict[str, float]]]

    def viewed(self, view: Callable[[Any], Any]) -> "Evaluator":
        """This evaluator applied to `view(params)` (e.g. LoRA factors merged into full kernels)."""

        def make(mesh):
            evaluate, view_fn = self.make(mesh), jax.jit(view)
            return lambda state: evaluate(state.replace(params=view_fn(state.params)))

        return Evaluator(self.every, make)


@dataclasses.dataclass(frozen=True)
class Task:
    """What the loop needs to know about a model, its data and its evaluation.

    Attributes:
      init_params: key -> parameter pytree; leaves may be boxed with logical
        axes (`nn.with_logical_partitioning`), which decide their sharding.
      loss_fn: (params, extra, micro_batch, rng) -> (scalar mean loss, aux). `aux` is a
        dict: aux["extra"], when present, is the new non-gradient state (e.g. updated
        BatchNorm statistics); aux["metrics"], when present, a dict of scalars logged with
        the loss; every entry is averaged over micro-batches and handed to `update_extra`.
        `plain_loss` lifts a (params, batch) -> scalar loss.
      train_batch: (step, rows) -> pytree of host arrays [len(rows), ...]: rows `rows` (int
        indices into the step's global batch) of the global batch of step `step`. A pure
        function of the step, so resumed runs see the same data; each process asks only
        for its own rows. `rows` None means every row.
      init_extra: (key, boxed params) -> the initial non-gradient state (None: {}). Leaves
        boxed with logical axes (a copy of the boxed params, say) are laid out by them; a
        subtree shaped like the parameters follows their sharding; the rest is replicated.
      update_extra: (step, params, extra, aux) -> (params, extra), run inside the jitted
        step after the optimizer update (`step` counts steps including this one): an EMA
        target, a running statistic, parameters set from it (DirectPred's predictor).
      evaluators: what is measured besides the training loss (`Evaluator`).
      items_per_step: items (tokens, images) in one global batch, for throughput.
      item_name: what an item is, for the progress line.
      axis_rules: logical axis -> mesh axis rules for the boxes of parameters and non-gradient
        state (the model family's `axis_rules`); logical axes without a rule are replicated.
      resume_sections: config sections that must match a workdir's saved config to resume it.
    """

    init_params: Callable[[jax.Array], Any]
    loss_fn: LossFn
    train_batch: Callable[[int, np.ndarray | None], Any]
    init_extra: Callable[[jax.Array, Any], Any] | None = None
    update_extra: Callable[[jax.Array, Any, Any, dict], tuple[Any, Any]] | None = None
    evaluators: tuple[Evaluator, ...] = ()
    items_per_step: int = 0
    item_name: str = "tokens"
    axis_rules: tuple = ()
    resume_sections: tuple[str, ...] = RESUME_SECTIONS


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Schedule of one run. Built from `config.train` by `LoopConfig.from_config`."""

    steps: int
    batch_size: int  # global batch (sequences) per optimizer step
    grad_accum: int = 1  # micro-batches per optimizer step
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    on_nonfinite: str = "stop"  # a non-finite loss or gradient: "stop" the run, or "skip" the step

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints"):
            checks.integer(f"train.{name}", getattr(self, name), minimum=1)
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.batch_size={self.batch_size} is not divisible by train.grad_accum={self.grad_accum}")
        checks.one_of("train.on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        checks.integer("train.seed", self.seed, minimum=0)

    @classmethod
    def from_config(cls, train_config) -> "LoopConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(train_config).items() if k in names})

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def check_workdir_config(config: ConfigDict, workdir: str, sections=RESUME_SECTIONS) -> None:
    """Refuses a workdir whose saved run computed something else; process 0 then writes config.json.

    Fields of `sections` must match the saved run's, except REPORTING_FIELDS.

    Raises:
      ValueError: naming the first section that differs from the saved run's.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    current = json.loads(config.to_json())

    def computed(cfg: dict, section: str) -> dict:
        fields = dict(cfg.get(section) or {})
        return {k: v for k, v in fields.items() if f"{section}.{k}" not in REPORTING_FIELDS}

    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        for section in sections:
            if computed(saved, section) != computed(current, section):
                raise ValueError(
                    f"{workdir} holds a run with a different `{section}` config ({computed(saved, section)} vs "
                    f"{computed(current, section)}); use a new --workdir")
    if not is_primary():
        return
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(current, f, indent=2)
    os.replace(tmp, path)


def load_workdir_config(workdir: str) -> ConfigDict:
    """The config a run in `workdir` was started with."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir} is not the workdir of a lorank run")
    with open(path) as f:
        return ConfigDict(json.load(f))


def check_batch_divides_mesh(loop: LoopConfig, mesh: Mesh) -> None:
    """The micro-batch must split evenly over the data-parallel devices."""
    dp = mesh_lib.data_parallel_size(mesh)
    if loop.micro_batch % dp:
        raise ValueError(
            f"micro-batch {loop.micro_batch} (train.batch_size={loop.batch_size} / "
            f"train.grad_accum={loop.grad_accum}) is not divisible by the data-parallel size {dp} "
            f"(mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _init_extra(task: Task, key: jax.Array, boxed_params: Any) -> Any:
    return {} if task.init_extra is None else task.init_extra(jax.random.fold_in(key, _EXTRA_KEYS), boxed_params)


def extra_shardings(task: Task, mesh: Mesh, key: jax.Array, boxed_params: Any, param_shardings: Any) -> Any:
    """NamedShardings of the task's non-gradient state: boxed leaves by their logical axes,
    subtrees shaped like the parameters like them, everything else replicated."""
    boxed = jax.eval_shape(lambda k: _init_extra(task, k, task.init_params(k)), key)
    logical = mesh_lib.logical_shardings(boxed, mesh, task.axis_rules)
    mirrored = optim.tree_shardings(nn.unbox(boxed), nn.unbox(boxed_params), param_shardings, mesh=mesh)
    boxed_mask = jax.tree.map(_is_box, boxed, is_leaf=_is_box)
    return jax.tree.map(lambda is_boxed, by_axes, by_params: by_axes if is_boxed else by_params,
                        boxed_mask, logical, mirrored)


def state_layout(task: Task, tx: optax.GradientTransformation, mesh: Mesh,
                 key: jax.Array) -> tuple[Callable[[jax.Array], TrainState], TrainState, TrainState]:
    """How the train state is built and laid out on `mesh`, without allocating it.

    Parameters follow their logical axes (`task.axis_rules`); optimizer-state leaves follow
    the parameter they belong to, GaLore projectors and low-rank moments their parameter's
    row or column sharding, and the rest is replicated (`lorank.optim.optimizer_state_shardings`);
    the non-gradient state as `extra_shardings` says.

    Returns:
      (init_state: key -> TrainState, abstract state of ShapeDtypeStructs,
       TrainState of NamedShardings).
    """

    def init_state(key):
        boxed = task.init_params(key)
        params = nn.unbox(boxed)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), nn.unbox(_init_extra(task, key, boxed)),
                          jnp.zeros((), jnp.int32))

    boxed = jax.eval_shape(task.init_params, key)
    params = nn.unbox(boxed)
    param_shardings = mesh_lib.logical_shardings(boxed, mesh, task.axis_rules)
    replicated = mesh_lib.replicated(mesh)
    shardings = TrainState(step=replicated, params=param_shardings,
                           opt_state=optim.optimizer_state_shardings(tx, params, param_shardings, mesh=mesh),
                           extra=extra_shardings(task, mesh, key, boxed, param_shardings), skipped=replicated)
    return init_state, jax.eval_shape(init_state, key), shardings


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """How a run builds, lays out and advances its train state.

    Attributes:
      init_state: key -> TrainState.
      abstract_state: the TrainState of ShapeDtypeStructs `init_state` returns.
      shardings: the TrainState of NamedShardings it lives in.
      step: (state, batch with leaves [grad_accum, micro_batch, ...]) -> (state, metrics), metrics
        holding at least "loss", "grad_norm" and "finite" (whether the update was applied).
    """

    init_state: Callable[[jax.Array], TrainState]
    abstract_state: TrainState
    shardings: TrainState
    step: Callable


def joint_step_plan(task: Task, tx: optax.GradientTransformation, mesh: Mesh, key: jax.Array) -> StepPlan:
    """The standard plan: `state_layout` and `make_train_step` (every gradient, then every update)."""
    init_state, abstract_state, shardings = state_layout(task, tx, mesh, key)
    step = make_train_step(task.loss_fn, tx, update_extra=task.update_extra, key=key)
    return StepPlan(init_state, abstract_state, shardings, step)


def hoist_constants(fn: Callable, *args) -> tuple[Callable, list]:
    """(fn', consts) with fn'(*args, consts) == fn(*args), where consts are the arrays `fn` closes over.

    Jitting fn' instead of fn hands those arrays (e.g. pretrained weights) to the program as
    arguments; a jitted fn would copy them into the program as constants.
    """
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    structure = jax.tree.structure(out_shape)

    def hoisted(*args_and_consts):
        *fn_args, consts = args_and_consts
        flat = jax.tree.leaves(fn_args)
        return jax.tree.unflatten(structure, jax.core.eval_jaxpr(closed.jaxpr, consts, *flat))

    return hoisted, list(closed.consts)


def init_on_mesh(init_state: Callable[[jax.Array], TrainState], shardings: TrainState, key: jax.Array) -> TrainState:
    """`jax.jit(init_state, out_shardings=shardings)(key)` with the arrays `init_state` closes over
    (the pretrained weights a fine-tuning run starts from) as arguments (`hoist_constants`)."""
    hoisted, consts = hoist_constants(init_state, key)
    return jax.jit(hoisted, out_shardings=shardings)(key, consts)


def step_key(key: jax.Array, step: jax.Array) -> jax.Array:
    """The PRNG key of step `step` of a run whose key is `key` (augmentation, dropout)."""
    return jax.random.fold_in(jax.random.fold_in(key, _STEP_KEYS), step)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *,
                    update_extra: Callable | None = None, key: jax.Array | None = None) -> Callable:
    """(state, batch) -> (state, {loss, grad_norm, finite, **aux metrics}); gradients averaged over accum.

    Batch leaves are [accum, micro, ...]; micro-batch i of step s gets the key
    fold_in(step_key(key, s), i) and the non-gradient state the previous micro-batch left.
    When the loss or the gradient norm is not finite, params, optimizer and non-gradient
    state keep their values and `skipped` grows by one.
    """
    key = jax.random.key(0) if key is None else key
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_step(params, extra, micro_batch, rng):
        (loss, aux), grads = grad_fn(params, extra, micro_batch, rng)
        aux = dict(aux)
        return loss, grads, aux.pop("extra", extra), aux

    def step(state: TrainState, batch):
        rng = step_key(key, state.step)
        accum = jax.tree.leaves(batch)[0].shape[0]
        if accum == 1:
            loss, grads, extra, aux = micro_step(state.params, state.extra, jax.tree.map(lambda x: x[0], batch),
                                                 jax.random.fold_in(rng, 0))
        else:
            def body(carry, xs):
                extra, sums = carry
                micro_batch, i = xs
                loss, grads, extra, aux = micro_step(state.params, extra, micro_batch, jax.random.fold_in(rng, i))
                return (extra, jax.tree.map(jnp.add, sums, (loss, grads, aux))), None

            first = jax.tree.map(lambda x: x[0], batch)
            shapes = jax.eval_shape(lambda: micro_step(state.params, state.extra, first, rng))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)),
                                 (shapes[0], shapes[1], shapes[3]))
            (extra, sums), _ = jax.lax.scan(body, (state.extra, zeros), (batch, jnp.arange(accum)))
            loss, grads, aux = jax.tree.map(lambda x: x / accum, sums)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if update_extra is not None:
            params, extra = update_extra(state.step + 1, params, extra, aux)
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state, extra),
                            (state.params, state.opt_state, state.extra))
        new_state = TrainState(state.step + 1, *kept, state.skipped + (~finite).astype(jnp.int32))
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **aux.get("metrics", {})}
        return new_state, metrics

    return step


def mean_loss_evaluator(loss_fn: Callable[[Any, Any, Any], jax.Array], batches: Any, batch_size: int, every: int,
                        name: str = "eval_loss") -> Evaluator:
    """The mean of `loss_fn(params, extra, batch)` over consecutive batches of `batch_size` rows.

    Args:
      loss_fn: (params, extra, batch) -> scalar mean over the batch.
      batches: pytree of host arrays [M, ...] with M a positive multiple of `batch_size`;
        every process holds all of it and feeds its own rows.
      batch_size: rows per evaluated batch (divisible by the data-parallel size).
      every: period in steps.
    """
    m = len(jax.tree.leaves(batches)[0])
    if batch_size <= 0 or m == 0 or m % batch_size:
        raise ValueError(f"{m} evaluation rows are not a positive multiple of the batch size {batch_size}")

    def make(mesh):
        rows = mesh_lib.process_rows(mesh, (batch_size,))
        fn = jax.jit(loss_fn)

        def evaluate(state):
            losses = []
            for start in range(0, m, batch_size):
                local = jax.tree.map(lambda x, start=start: np.asarray(x[start:start + batch_size])[rows], batches)
                losses.append(fn(state.params, state.extra, mesh_lib.global_batch(mesh, local, (batch_size,))))
            return {name: float(np.mean(jax.device_get(losses)))}

        return evaluate

    return Evaluator(every, make)


def params_evaluator(fn: Callable[[Any], dict[str, jax.Array]], every: int) -> Evaluator:
    """Scalars `fn(params) -> {name: scalar}` (e.g. gradient stable ranks on a fixed batch), jitted."""

    def make(mesh):
        jitted = jax.jit(fn)
        return lambda state: {k: float(v) for k, v in jax.device_get(jitted(state.params)).items()}

    return Evaluator(every, make)


def _rewrite_metrics(path: str, keep_through_step: int) -> None:
    """Drops metrics logged after the restored step (work lost with the interruption), atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= keep_through_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _format_value(value: float) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class _Progress:
    """The progress line: step, loss, throughput, ETA (throughput excludes compile and evaluation time)."""

    def __init__(self, loop: LoopConfig, items_per_step: int, item_name: str, log: Callable[[str], None]):
        self.loop, self.items, self.name, self.log = loop, items_per_step, item_name, log
        self.mark_step, self.mark_time, self.rate = None, None, None

    def update(self, step: int, loss: float) -> dict[str, float]:
        now = time.perf_counter()
        extra = {}
        if self.mark_step is not None and step > self.mark_step:
            steps_per_s = (step - self.mark_step) / (now - self.mark_time)
            self.rate = steps_per_s
            extra = {"steps_per_s": steps_per_s, f"{self.name}_per_s": steps_per_s * self.items}
        self.mark_step, self.mark_time = step, now
        line = f"step {step}/{self.loop.steps} | loss {loss:.4f}"
        if self.rate:
            line += (f" | {self.rate * self.items / 1e3:.1f}k {self.name}/s"
                     f" | ETA {_format_eta((self.loop.steps - step) / self.rate)}")
        self.log(line)
        return extra

    def evaluated(self, step: int, results: dict[str, float]) -> None:
        values = " | ".join(f"{k} {_format_value(v)}" for k, v in results.items())
        self.log(f"step {step}/{self.loop.steps} | {values}")
        self.mark_time = time.perf_counter()


def _nonfinite_error(step: int, loss: float, last_checkpoint: int | None, directory: str) -> FloatingPointError:
    kept = (f"the newest checkpoint, step {last_checkpoint} in {directory}, is intact" if last_checkpoint
            else "no checkpoint was written")
    return FloatingPointError(
        f"the loss or gradient became non-finite at step {step} (loss {loss}); the update was not applied and "
        f"nothing after it was checkpointed ({kept}). Lower the learning rate, or set "
        f"train.on_nonfinite=skip to skip such steps")


def run(task: Task, tx: optax.GradientTransformation, loop: LoopConfig, mesh: Mesh, workdir: str, *,
        config: ConfigDict | None = None, stop_at: int | None = None, log: Callable[[str], None] = print,
        scalars: Callable[[int], dict[str, float]] | None = None,
        step_plan: Callable[[Mesh, jax.Array], StepPlan] | None = None) -> tuple[TrainState, list[dict]]:
    """Trains `task` with `tx` for `loop.steps` steps (resuming from `workdir` if it holds a checkpoint).

    Args:
      task: model, loss, data and evaluators.
      tx: the optimizer (any optax chain).
      loop: step counts, intervals, seed and the non-finite policy.
      mesh: the device mesh (see `lorank.train.mesh.make_mesh`).
      workdir: where config.json, metrics.jsonl and checkpoints/ live.
      config: the run's config; its `task.resume_sections` must match the workdir's saved
        config.json (checked before anything runs), and it is saved there.
      stop_at: stop (with a checkpoint) after this many steps, as an interruption
        would; the run continues when started again with the same workdir.
      log: where progress lines go (process 0 only).
      scalars: step -> extra scalars to log (e.g. the learning rate).
      step_plan: (mesh, key) -> the `StepPlan` to train with (e.g.
        `lorank.train.per_layer.step_plan`); None: `joint_step_plan(task, tx, ...)`.
    Returns:
      The final train state and the metrics records of this call (every process).
    Raises:
      FloatingPointError: a non-finite loss or gradient with `loop.on_nonfinite="stop"`
        (the step is named; nothing after the last good checkpoint is written).
      checkpoints.NoIntactCheckpoint: the workdir holds checkpoints and none is intact.
    """
    check_batch_divides_mesh(loop, mesh)
    if stop_at is not None:
        checks.integer("stop_at", stop_at, minimum=1)
    primary = is_primary()
    say = log if primary else (lambda _: None)
    if config is not None:
        check_workdir_config(config, workdir, task.resume_sections)
    os.makedirs(workdir, exist_ok=True)

    key = jax.random.key(loop.seed)
    plan = (step_plan or functools.partial(joint_step_plan, task, tx))(mesh, key)
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    manager = checkpoints.open_manager(directory, keep=loop.keep_checkpoints)
    metrics_path = os.path.join(workdir, METRICS_FILE)
    state, latest = checkpoints.restore_newest_intact(
        manager, plan.abstract_state, plan.shardings, warn=lambda m: say(f"warning: {m}"),
        corrupt_root=os.path.join(workdir, checkpoints.CORRUPT_DIR))
    if state is not None:
        if primary:
            _rewrite_metrics(metrics_path, latest)
        say(f"resumed from {workdir} at step {latest}")
    else:
        state = init_on_mesh(plan.init_state, plan.shardings, key)
        if primary and os.path.exists(metrics_path):
            os.remove(metrics_path)  # a workdir without checkpoints holds no run to continue

    batch_shape = (loop.grad_accum, loop.micro_batch)
    rows = mesh_lib.process_rows(mesh, batch_shape)
    train_step = jax.jit(plan.step, in_shardings=(plan.shardings, mesh_lib.batch_sharding(mesh, leading_dims=1)),
                         out_shardings=(plan.shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
    evaluators = [(ev, ev.make(mesh)) for ev in task.evaluators]

    def evaluate(state, step, *, force: bool) -> dict[str, float]:
        results = {}
        for ev, fn in evaluators:
            if force or step % ev.every == 0:
                results.update(fn(state))
        return results

    history: list[dict] = []

    def record(entry: dict) -> None:
        history.append(entry)
        if primary:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    progress = _Progress(loop, task.items_per_step, task.item_name, say)
    step = int(jax.device_get(state.step))
    last_checkpoint = latest
    end = loop.steps if stop_at is None else min(stop_at, loop.steps)
    if step == 0 and evaluators and end > 0:
        results = evaluate(state, 0, force=True)
        progress.evaluated(0, results)
        record({"step": 0, **results})

    pending = None  # (step, metrics) whose finite flag has not been read yet

    def check(pending) -> None:
        if pending is None:
            return
        at, metrics = pending
        if not bool(jax.device_get(metrics["finite"])):
            loss = float(jax.device_get(metrics["loss"]))
            if loop.on_nonfinite == "stop":
                raise _nonfinite_error(at, loss, last_checkpoint, directory)
            say(f"warning: step {at} skipped: non-finite loss or gradient (loss {loss})")

    try:
        while step < end:
            state, metrics = train_step(state, mesh_lib.global_batch(mesh, task.train_batch(step, rows), batch_shape))
            step += 1
            check(pending)  # the previous step's flag: reading it does not wait for this step
            pending = (step, metrics)
            is_last = step == end
            eval_due = bool(evaluators) and (step == loop.steps or any(step % ev.every == 0 for ev, _ in evaluators))
            if step % loop.log_every == 0 or is_last or step == 1 or eval_due:
                check(pending)
                pending = None
                values = {k: v.item() for k, v in jax.device_get(metrics).items()}
                values.pop("finite")
                entry = {"step": step, **values, "skipped": int(jax.device_get(state.skipped)),
                         **progress.update(step, values["loss"])}
                entry.update(scalars(step - 1) if scalars else {})
                if eval_due:
                    results = evaluate(state, step, force=step == loop.steps)
                    progress.evaluated(step, results)
                    entry.update(results)
                record(entry)
            if step % loop.checkpoint_every == 0 or is_last:
                check(pending)
                pending = None
                checkpoints.seal_finished(manager)
                checkpoints.assert_finite(state, f"the train state at step {step}")
                checkpoints.save(manager, step, state)
                last_checkpoint = step
        check(pending)
    finally:  # saves in flight land and are sealed, also when the run stops on an error
        checkpoints.seal_finished(manager)
        manager.close()
    return state, history


def restore_latest(workdir: str, abstract_state: TrainState, shardings: Any, *,
                   warn: Callable[[str], None] = print) -> TrainState:
    """The newest intact checkpoint in `workdir`, laid out with `shardings` (e.g. for sampling);
    corrupt newer ones are named through `warn` and left in place.

    Raises:
      FileNotFoundError: `workdir` holds no checkpoint (the path is named).
      checkpoints.NoIntactCheckpoint: it holds checkpoints and none is intact.
    """
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {directory}")
    manager = checkpoints.open_manager(directory)
    try:
        state, _ = checkpoints.restore_newest_intact(manager, abstract_state, shardings, warn=warn)
    finally:
        manager.close()
    if state is None:
        raise FileNotFoundError(f"no checkpoints in {directory}")
    return state

