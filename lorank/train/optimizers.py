"""Optimizers built from `config.optim`: learning-rate schedule, clipping, method."""

from __future__ import annotations

from typing import Callable

import jax
import optax

OPTIMIZERS = ("adamw", "sgd")


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine to `lr * min_lr_ratio` at `total_steps`."""
    lr, warmup = float(optim_config.lr), int(optim_config.warmup_steps)
    if lr <= 0:
        raise ValueError(f"optim.lr must be positive, got {lr}")
    if not 0 <= warmup < total_steps:
        raise ValueError(f"optim.warmup_steps={warmup} must lie in [0, train.steps={total_steps})")
    if not 0.0 <= optim_config.min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio must lie in [0, 1], got {optim_config.min_lr_ratio}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total_steps,
        end_value=lr * float(optim_config.min_lr_ratio))


def decay_mask(params) -> dict:
    """Weight decay on matrices only (kernels, embeddings), not on norm scales or biases."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def build_optimizer(optim_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain named by `optim_config.name`, with global-norm clipping first if `clip_norm` > 0.

    Returns:
      (transformation, learning-rate schedule) — the schedule is returned for logging.
    """
    name = optim_config.name
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optim.name={name!r}; expected one of {OPTIMIZERS}")
    schedule = learning_rate_schedule(optim_config, total_steps)
    if name == "adamw":
        method = optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                             weight_decay=optim_config.weight_decay, mask=decay_mask)
    else:
        method = optax.sgd(schedule, momentum=optim_config.b1 or None)
    parts: list[optax.GradientTransformation] = []
    if optim_config.clip_norm:
        if optim_config.clip_norm < 0:
            raise ValueError(f"optim.clip_norm must be >= 0 (0 disables clipping), got {optim_config.clip_norm}")
        parts.append(optax.clip_by_global_norm(optim_config.clip_norm))
    return optax.chain(*parts, method), schedule


def lr_scalars(schedule: Callable[[int], float]) -> Callable[[int], dict[str, float]]:
    """step -> {"lr": schedule(step)}, for the loop's metrics."""
    return lambda step: {"lr": float(schedule(step))}
