"""One generic, sharded, resumable training loop.

A `Task` says what is trained (initial parameters, a loss, batches as a pure
function of the step); an optax `GradientTransformation` says how. `run` builds
the train state on the mesh, restores the latest orbax checkpoint in the workdir
if there is one, and then repeats a single jitted step

    step(state, batch) -> (state, metrics),   batch: [grad_accum, micro_batch, ...]

with in/out shardings and the state donated, logging a progress line, JSON-lines
metrics and periodic evaluations, and checkpointing as it goes. Because batches
depend only on the step and the whole state (step, params, optimizer state) is
checkpointed, an interrupted run resumed from its workdir retraces an
uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from ml_collections import ConfigDict

from lorank.optim.sharding import optimizer_state_shardings
from lorank.train import mesh as mesh_lib

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
# Config sections that must match for a workdir's checkpoint to be resumed ...
RESUME_SECTIONS = ("model", "data", "train", "optim")
# ... except these fields, which change what is reported, not what is computed.
REPORTING_FIELDS = ("train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
                    "train.keep_checkpoints")


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes: one pytree, checkpointed whole."""

    step: jax.Array  # [] int32, optimizer steps taken
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Task:
    """What the loop needs to know about a model and its data.

    Attributes:
      init_params: key -> parameter pytree; leaves may be boxed with logical
        axes (`nn.with_logical_partitioning`), which decide their sharding.
      loss_fn: (params, micro_batch) -> scalar mean loss over the micro-batch.
      train_batch: step -> host array [global_batch, ...]; must be a pure
        function of the step so that resumed runs see the same data.
      eval_batches: () -> iterable of host arrays [global_batch, ...]; its mean
        loss is reported as `eval_loss`. None: no evaluation.
      items_per_step: items (e.g. tokens) in one global batch, for throughput.
      item_name: what an item is, for the progress line.
      probes: params -> {name: scalar}, measured at every evaluation (e.g.
        gradient stable ranks); jitted by the loop with the parameters' shardings.
    """

    init_params: Callable[[jax.Array], Any]
    loss_fn: Callable[[Any, Any], jax.Array]
    train_batch: Callable[[int], np.ndarray]
    eval_batches: Callable[[], Iterable[np.ndarray]] | None = None
    items_per_step: int = 0
    item_name: str = "tokens"
    probes: Callable[[Any], dict[str, jax.Array]] | None = None


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

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"train.{name} must be a positive integer, got {value!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.batch_size={self.batch_size} is not divisible by train.grad_accum={self.grad_accum}")

    @classmethod
    def from_config(cls, train_config) -> "LoopConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(train_config).items() if k in names})

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


def check_workdir_config(config: ConfigDict, workdir: str, sections=RESUME_SECTIONS) -> None:
    """Writes config.json to `workdir`, or refuses a workdir whose run computed something else.

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


def state_layout(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, mesh: Mesh,
                 key: jax.Array) -> tuple[Callable[[jax.Array], TrainState], TrainState, TrainState]:
    """How the train state is built and laid out on `mesh`, without allocating it.

    Parameters follow their logical axes; optimizer-state leaves follow the
    parameter they belong to, GaLore projectors and low-rank moments their
    parameter's row or column sharding, and the rest is replicated
    (`lorank.optim.optimizer_state_shardings`).

    Returns:
      (init_state: key -> TrainState, abstract state of ShapeDtypeStructs,
       TrainState of NamedShardings).
    """

    def init_state(key):
        params = nn.unbox(init_params(key))
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    boxed = jax.eval_shape(init_params, key)
    param_shardings = mesh_lib.logical_shardings(boxed, mesh)
    abstract_state = jax.eval_shape(init_state, key)
    shardings = TrainState(step=mesh_lib.replicated(mesh), params=param_shardings,
                           opt_state=optimizer_state_shardings(tx, nn.unbox(boxed), param_shardings, mesh=mesh))
    return init_state, abstract_state, shardings


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """How a run builds, lays out and advances its train state.

    Attributes:
      init_state: key -> TrainState.
      abstract_state: the TrainState of ShapeDtypeStructs `init_state` returns.
      shardings: the TrainState of NamedShardings it lives in.
      step: (state, batch [grad_accum, micro_batch, ...]) -> (state, {"loss", "grad_norm"}).
    """

    init_state: Callable[[jax.Array], TrainState]
    abstract_state: TrainState
    shardings: TrainState
    step: Callable


def joint_step_plan(task: Task, tx: optax.GradientTransformation, mesh: Mesh, key: jax.Array) -> StepPlan:
    """The standard plan: `state_layout` and `make_train_step` (every gradient, then every update)."""
    init_state, abstract_state, shardings = state_layout(task.init_params, tx, mesh, key)
    return StepPlan(init_state, abstract_state, shardings, make_train_step(task.loss_fn, tx))


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
    """(state, batch [accum, micro, ...]) -> (state, {loss, grad_norm}); gradients averaged over accum."""
    grad_fn = jax.value_and_grad(loss_fn)

    def step(state: TrainState, batch):
        accum = batch.shape[0]
        if accum == 1:
            loss, grads = grad_fn(state.params, batch[0])
        else:
            def micro(carry, micro_batch):
                loss, grads = grad_fn(state.params, micro_batch)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(micro, zeros, batch)
            loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def _restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, shardings: Any) -> Any:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    return manager.restore(step, args=ocp.args.StandardRestore(target))


def restore_latest(workdir: str, abstract_state: TrainState, shardings: Any) -> TrainState:
    """The newest checkpoint in `workdir`, laid out with `shardings` (e.g. for sampling or evaluation).

    Raises:
      FileNotFoundError: `workdir` holds no checkpoint (the path is named).
    """
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {directory}")
    with ocp.CheckpointManager(directory) as manager:
        latest = manager.latest_step()
        if latest is None:
            raise FileNotFoundError(f"no checkpoints in {directory}")
        return _restore(manager, latest, abstract_state, shardings)


def _to_global(host_batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a batch every host holds in full (works multi-host)."""
    return jax.make_array_from_callback(host_batch.shape, sharding, lambda idx: host_batch[idx])


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


class _Progress:
    """The progress line: step, loss, throughput, ETA (throughput excludes compile time)."""

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


def run(task: Task, tx: optax.GradientTransformation, loop: LoopConfig, mesh: Mesh, workdir: str, *,
        stop_at: int | None = None, log: Callable[[str], None] = print,
        scalars: Callable[[int], dict[str, float]] | None = None,
        step_plan: Callable[[Mesh, jax.Array], StepPlan] | None = None) -> tuple[TrainState, list[dict]]:
    """Trains `task` with `tx` for `loop.steps` steps (resuming from `workdir` if it holds a checkpoint).

    Args:
      task: model, loss and data.
      tx: the optimizer (any optax chain).
      loop: step counts and intervals.
      mesh: the device mesh (see `lorank.train.mesh.make_mesh`).
      workdir: where metrics.jsonl and checkpoints/ live.
      stop_at: stop (with a checkpoint) after this many steps, as an interruption
        would; the run continues when started again with the same workdir.
      log: where progress lines go.
      scalars: step -> extra scalars to log (e.g. the learning rate).
      step_plan: (mesh, key) -> the `StepPlan` to train with (e.g.
        `lorank.train.per_layer.step_plan`); None: `joint_step_plan(task, tx, ...)`.
    Returns:
      The final train state and the metrics records written during this call.
    """
    check_batch_divides_mesh(loop, mesh)
    if stop_at is not None and stop_at <= 0:
        raise ValueError(f"stop_at must be positive, got {stop_at}")
    os.makedirs(workdir, exist_ok=True)

    key = jax.random.key(loop.seed)
    plan = (step_plan or functools.partial(joint_step_plan, task, tx))(mesh, key)
    abstract_state, shardings = plan.abstract_state, plan.shardings
    param_shardings = shardings.params
    batch_sharding = mesh_lib.batch_sharding(mesh, leading_dims=1)

    options = ocp.CheckpointManagerOptions(max_to_keep=loop.keep_checkpoints, create=True)
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), options=options)
    metrics_path = os.path.join(workdir, METRICS_FILE)
    latest = manager.latest_step()
    if latest is not None:
        state = _restore(manager, latest, abstract_state, shardings)
        _rewrite_metrics(metrics_path, latest)
        log(f"resumed from {workdir} at step {latest}")
    else:
        state = jax.jit(plan.init_state, out_shardings=shardings)(key)
        if os.path.exists(metrics_path):
            os.remove(metrics_path)  # a workdir without checkpoints holds no run to continue

    train_step = jax.jit(plan.step, in_shardings=(shardings, batch_sharding),
                         out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
    eval_loss = jax.jit(task.loss_fn, in_shardings=(param_shardings, mesh_lib.batch_sharding(mesh)))

    probes = jax.jit(task.probes, in_shardings=(param_shardings,)) if task.probes else None

    def evaluate(params) -> dict[str, float]:
        losses = [eval_loss(params, _to_global(b, mesh_lib.batch_sharding(mesh))) for b in task.eval_batches()]
        results = {"eval_loss": float(np.mean(jax.device_get(losses)))}
        if probes is not None:
            results.update({k: float(v) for k, v in jax.device_get(probes(params)).items()})
        return results

    def record(entry: dict) -> None:
        history.append(entry)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    history: list[dict] = []
    progress = _Progress(loop, task.items_per_step, task.item_name, log)
    step = int(jax.device_get(state.step))
    end = loop.steps if stop_at is None else min(stop_at, loop.steps)
    if step == 0 and task.eval_batches is not None and end > 0:
        record({"step": 0, **evaluate(state.params)})
    while step < end:
        host = task.train_batch(step)
        host = host.reshape(loop.grad_accum, loop.micro_batch, *host.shape[1:])
        state, metrics = train_step(state, _to_global(host, batch_sharding))
        step += 1
        is_last = step == end
        do_eval = task.eval_batches is not None and (step % loop.eval_every == 0 or step == loop.steps)
        if step % loop.log_every == 0 or is_last or step == 1 or do_eval:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"loss became {metrics['loss']} at step {step}; last checkpoint is kept")
            entry = {"step": step, **metrics, **progress.update(step, metrics["loss"])}
            entry.update(scalars(step - 1) if scalars else {})
            if do_eval:
                entry.update(evaluate(state.params))
                log(f"step {step}/{loop.steps} | eval_loss {entry['eval_loss']:.4f}")
                progress.mark_time = time.perf_counter()  # throughput excludes evaluation
            record(entry)
        if step % loop.checkpoint_every == 0 or is_last:
            manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    manager.close()
    return state, history
