"""Optimizers built from `config.optim`: learning-rate schedule, clipping, and the update rule.

The update rules (`OPTIMIZERS`) act on whatever parameter tree they are given;
how the parameters themselves are shaped (full-rank, low-rank factors, LoRA)
is the method's business (`lorank.train.methods`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from lorank import checks, optim
from lorank.models.family import ModelFamily

OPTIMIZERS = ("adamw", "adamw8bit", "sgd", "sgdw", "lars", "galore", "galore8bit", "galore_adafactor")
GALORE_OPTIMIZERS = ("galore", "galore8bit", "galore_adafactor")


def peak_lr(optim_config, name: str | None = None) -> float:
    """`optim.galore_lr` for the GaLore optimizers, `optim.lr` for everything else."""
    name = optim_config.name if name is None else name
    return float(optim_config.galore_lr if name in GALORE_OPTIMIZERS else optim_config.lr)


def learning_rate_schedule(optim_config, total_steps: int, lr: float | None = None) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine to `lr * min_lr_ratio` at `total_steps`.

    `lr` defaults to `peak_lr(optim_config)`.
    """
    lr = checks.number("the peak learning rate (optim.lr / optim.galore_lr)",
                       peak_lr(optim_config) if lr is None else lr, low=0.0, low_open=True)
    warmup = checks.integer("optim.warmup_steps", optim_config.warmup_steps, minimum=0, maximum=total_steps - 1)
    checks.number("optim.min_lr_ratio", optim_config.min_lr_ratio, low=0.0, high=1.0)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total_steps,
        end_value=lr * float(optim_config.min_lr_ratio))


def decay_mask(params) -> dict:
    """Weight decay on matrices only (kernels, embeddings, factors), not on norm scales or biases."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _galore_kwargs(c, family: ModelFamily) -> dict:
    return dict(rank=int(c.rank), update_proj_gap=int(c.update_proj_gap), scale=float(c.galore_scale),
                proj_type=c.proj_type, weight_decay=c.weight_decay, mask=decay_mask,
                galore_mask=family.galore_mask, matrix_axes=family.matrix_axes, svd=c.svd)


def update_rule(c, name: str, schedule: optax.ScalarOrSchedule, family: ModelFamily) -> optax.GradientTransformation:
    """The update rule `name` of OPTIMIZERS with the hyperparameters of `c` (= config.optim), no clipping;
    GaLore projects the kernels of `family` (its `galore_mask` and `matrix_axes`)."""
    adam = dict(b1=c.b1, b2=c.b2, eps=c.eps)
    if name == "adamw":
        return optax.adamw(schedule, **adam, weight_decay=c.weight_decay, mask=decay_mask)
    if name == "adamw8bit":
        return optax.chain(optim.scale_by_adam_8bit(**adam, block_size=int(c.block_size)),
                           optax.add_decayed_weights(c.weight_decay, decay_mask),
                           optax.scale_by_learning_rate(schedule))
    if name == "sgd":
        return optax.sgd(schedule, momentum=c.b1 or None)
    if name == "sgdw":  # SGD with momentum b1 and weight decay on matrices (torch.optim.SGD's, which adds it to g)
        return optax.chain(optax.add_decayed_weights(c.weight_decay, decay_mask),
                           optax.sgd(schedule, momentum=c.b1 or None))
    if name == "lars":  # SimCLR's LARS: no weight decay or trust ratio on BatchNorm parameters and biases
        return optax.lars(schedule, weight_decay=c.weight_decay, weight_decay_mask=decay_mask,
                          trust_coefficient=c.get("trust_coefficient", 0.001), trust_ratio_mask=decay_mask,
                          momentum=c.b1)
    if name == "galore":
        return optim.galore_adamw(schedule, **adam, **_galore_kwargs(c, family))
    if name == "galore8bit":
        return optim.galore_adamw_8bit(schedule, **adam, **_galore_kwargs(c, family), block_size=int(c.block_size))
    if name == "galore_adafactor":
        return optim.galore_adafactor(schedule, **_galore_kwargs(c, family))
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def clip_by_leaf_norm(max_norm: float) -> optax.GradientTransformation:
    """Each leaf g [*shape] becomes g * min(1, max_norm / ||g||), its norm taken in float32, its dtype kept.

    Nothing couples leaves, so each weight's update can run as soon as its gradient exists.
    """

    def clip_leaf(g):
        g32 = g.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(g32 * g32))
        return jnp.where(norm < max_norm, g32, g32 / norm * max_norm).astype(g.dtype)

    return optax.GradientTransformation(
        optax.init_empty_state, lambda updates, state, params=None: (jax.tree.map(clip_leaf, updates), state))


def with_clipping(optim_config, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Gradient clipping at `optim.clip_norm` (0 disables it) before `tx`, over `optim.clip_scope`.

    "global" (the default when the field is absent): `optax.clip_by_global_norm`, one norm
    over all leaves, so no leaf's update can start before every gradient exists. "per_leaf":
    `clip_by_leaf_norm`, each leaf by its own norm, as the GaLore paper's per-layer update
    needs (see docs/memory.md).
    """
    clip = checks.number("optim.clip_norm (0 disables clipping)", optim_config.clip_norm, low=0.0)
    scope = checks.one_of("optim.clip_scope", optim_config.get("clip_scope", "global"), ("global", "per_leaf"))
    if not clip:
        return tx
    clipping = optax.clip_by_global_norm(clip) if scope == "global" else clip_by_leaf_norm(clip)
    return optax.chain(clipping, tx)


def build_optimizer(optim_config, total_steps: int, family: ModelFamily
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain named by `optim_config.name` (one of OPTIMIZERS) for a model of `family`,
    clipped per `clip_norm`.

    Returns:
      (transformation, learning-rate schedule) — the schedule is returned for logging.
    """
    name = optim_config.name
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optim.name={name!r}; expected one of {OPTIMIZERS}")
    schedule = learning_rate_schedule(optim_config, total_steps)
    return with_clipping(optim_config, update_rule(optim_config, name, schedule, family)), schedule


def lr_scalars(schedule: Callable[[int], float]) -> Callable[[int], dict[str, float]]:
    """step -> {"lr": schedule(step)}, for the loop's metrics."""
    return lambda step: {"lr": float(schedule(step))}
