"""Training methods of the GaLore paper's comparisons, selected by `config.optim.name`.

A method is an update rule plus a shape for the trained parameters:

    adamw, adamw8bit, sgd          full-rank parameters, (8-bit) AdamW or SGD
    galore, galore8bit,            full-rank parameters; the attention and MLP
    galore_adafactor               kernels' optimizer states live in rank-r subspaces
    lowrank                        every attention/MLP kernel replaced by trainable factors a b
    lora                           frozen full-rank kernels plus trainable (alpha / r) a b
    relora                         lora, merged into the base every `relora_reset_every` steps,
                                   with fresh factors, pruned moments and a jagged schedule

`build_method` turns a full-rank `Task` (the model's own parameters and loss)
into the method's task: the same loss applied to `lora.materialize(params)`,
so every method trains the unchanged model. Embeddings, norms and the LM head
are trained full-rank with AdamW by every method, as in the paper.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
import optax

from lorank import checks
from lorank.models import lora
from lorank.models.family import ModelFamily
from lorank.optim import labels, quantize
from lorank.train import optimizers
from lorank.train.loop import Task

FACTORED = ("lowrank", "lora", "relora")
METHODS = optimizers.OPTIMIZERS + FACTORED
RANKED = optimizers.GALORE_OPTIMIZERS + FACTORED  # methods that read optim.rank


@dataclasses.dataclass(frozen=True)
class Method:
    """A training method bound to one task.

    Attributes:
      name: one of METHODS.
      task: the task on this method's parameter tree.
      tx: the optimizer (clipping included).
      schedule: step -> learning rate, for logging.
      export: method parameters -> the full parameter tree the unchanged model applies
        (LoRA merged, factors multiplied out); identity for full-rank methods.
    """

    name: str
    task: Task
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    export: Callable[[Any], Any]


def lora_scale(optim_config) -> float:
    """LoRA's multiplier alpha / r from `optim.lora_alpha` and `optim.rank`."""
    return lora.lora_scale(float(optim_config.lora_alpha), int(optim_config.rank))


def check_method(optim_config, params: Any, family: ModelFamily) -> None:
    """Checks the method name and that `optim.rank` fits every projected kernel of `params`.

    Args:
      optim_config: config.optim.
      params: the full-rank parameters (arrays, ShapeDtypeStructs, boxed or not).
      family: the model's family (which kernels are projected or factored).
    Raises:
      ValueError: unknown method, or a rank that is not a positive integer or exceeds
        min(m, n) of a projected kernel (the kernel's path and shape are named).
    """
    name = optim_config.name
    if name not in METHODS:
        raise ValueError(f"unknown optim.name={name!r}; expected one of {METHODS}")
    if name not in RANKED:
        return
    rank = checks.integer("optim.rank", optim_config.rank, minimum=1)
    plain = nn.unbox(params)
    selected = family.galore_mask(plain)
    for (path, leaf), chosen in zip(jax.tree_util.tree_flatten_with_path(plain)[0], jax.tree.leaves(selected)):
        if chosen and rank > min(leaf.shape):
            raise ValueError(f"optim.rank={rank} exceeds min{tuple(leaf.shape)}={min(leaf.shape)} of "
                             f"{labels.path_str(path)}: use a rank at most the smaller kernel dimension")


def _factored_task(task: Task, init: Callable[[Any, jax.Array], Any], scale: float) -> Task:
    """`task` on factored parameters: init(full_params, key) factors them; the loss and the
    evaluators see materialize(.)."""

    def init_params(key):
        return init(task.init_params(key), jax.random.fold_in(key, 1))

    def full(params):
        return lora.materialize(params, scale=scale, freeze_base=False)

    return dataclasses.replace(task, init_params=init_params, loss_fn=lora.factored_loss(task.loss_fn, scale=scale),
                               evaluators=tuple(ev.viewed(full) for ev in task.evaluators))


def build_method(config, task: Task, family: ModelFamily) -> Method:
    """The method `config.optim.name` for a full-rank `task` of a model of `family`.

    Args:
      config: the experiment config (reads `optim`, `train.steps`, `model.init_std` if present).
      task: the full-rank task (e.g. `lorank.train.lm.make_lm_task`).
      family: the model's family: GaLore projects, and lowrank / LoRA / ReLoRA factor, its
        `projected` kernels.
    Returns:
      A `Method`.
    Raises:
      ValueError: see `check_method` and `optimizers.learning_rate_schedule`.
    """
    c = config.optim
    steps = int(config.train.steps)
    check_method(c, jax.eval_shape(task.init_params, jax.random.key(0)), family)
    name = c.name
    if name in optimizers.OPTIMIZERS:
        tx, schedule = optimizers.build_optimizer(c, steps, family)
        return Method(name, task, tx, schedule, export=lambda params: params)

    rank = int(c.rank)
    schedule = optimizers.learning_rate_schedule(c, steps)
    if name == "lowrank":
        init_std = float(config.model.get("init_std", 0.02))
        init = lambda params, key: lora.lowrank_init(params, key, rank=rank, init_std=init_std,  # noqa: E731
                                                     pattern=family.projected)
        tx = optimizers.update_rule(c, "adamw", schedule, family)
        scale = 1.0
    else:
        scale = lora_scale(c)
        init = lambda params, key: lora.lora_init(params, key, rank=rank, pattern=family.projected)  # noqa: E731
        if name == "relora":
            schedule = lora.jagged_cosine_schedule(
                optimizers.peak_lr(c), steps, int(c.warmup_steps), int(c.relora_reset_every),
                int(c.relora_restart_warmup), end_value=optimizers.peak_lr(c) * float(c.min_lr_ratio))
        tx = lora.freeze_base(optimizers.update_rule(c, "adamw", schedule, family))
        if name == "relora":
            tx = lora.relora(tx, reset_every=int(c.relora_reset_every), scale=scale,
                             keep_fraction=float(c.relora_keep_fraction), seed=int(config.train.seed))
    tx = optimizers.with_clipping(c, tx)
    return Method(name, _factored_task(task, init, scale), tx, schedule,
                  export=lambda params: lora.merge_lora(params, scale=scale))


def _frozen_mask(params: Any) -> list[bool]:
    return [label == lora.FROZEN for label in jax.tree.leaves(lora.lora_labels(params))]


def parameter_report(method: Method, key: jax.Array | None = None) -> dict[str, int]:
    """Sizes of a method's training state, from shapes only (nothing is allocated).

    Returns:
      {"total": parameters stored, "trainable": parameters the optimizer updates,
       "param_bytes": bytes of the parameters, "optimizer_state_bytes": bytes of the optimizer state}.
    """
    key = jax.random.key(0) if key is None else key
    params = nn.unbox(jax.eval_shape(method.task.init_params, key))
    leaves = jax.tree.leaves(params)
    frozen = _frozen_mask(params)
    sizes = [int(np.prod(x.shape)) for x in leaves]
    state = jax.eval_shape(method.tx.init, params)
    return {
        "total": sum(sizes),
        "trainable": sum(s for s, f in zip(sizes, frozen) if not f),
        "param_bytes": quantize.tree_nbytes(params),
        "optimizer_state_bytes": quantize.tree_nbytes(state),
    }


def describe(method: Method, report: dict[str, int]) -> str:
    """One line for the run's log: method, parameter counts and state bytes."""
    return (f"method {method.name}: {report['total']:,} parameters ({report['trainable']:,} trainable) | "
            f"parameters {report['param_bytes'] / 2**20:.2f} MiB, optimizer state "
            f"{report['optimizer_state_bytes'] / 2**20:.2f} MiB")
