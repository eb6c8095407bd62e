"""Optimizers built on `scale_by_galore`: AdamW, 8-bit AdamW and Adafactor with low-rank states.

Each is `chain(scale_by_galore(inner=...), add_decayed_weights(weight_decay,
mask), scale_by_learning_rate(learning_rate))`: the inner transformation sees
the projected gradients ([r, n], [m, r] or [r, r] for a projected [m, n]
matrix, full shape elsewhere), weight decay is decoupled and applied in full
parameter space, and `learning_rate` may be a schedule. The GaLore keyword
options (`galore_mask`, `matrix_axes`, `svd`, ...) are `scale_by_galore`'s.
"""

from __future__ import annotations

from typing import Any, Optional

import optax

from lorank import checks
from lorank.optim import quantize as q8
from lorank.optim.galore import scale_by_galore

# Keyword options every optimizer factory passes through to `scale_by_galore` unchanged.
_GALORE_OPTIONS = ("galore_mask", "matrix_axes", "svd", "oversample", "power_iters", "seed", "align_signs",
                   "reproject_moments", "lazy_threshold", "lazy_patience", "max_update_proj_gap",
                   "projector_dtype", "precision")


def _galore_options(factory_locals: dict) -> dict:
    """The `scale_by_galore` keyword options among a factory's arguments."""
    return {name: factory_locals[name] for name in _GALORE_OPTIONS}


def _with_decay_and_lr(galore: optax.GradientTransformation, learning_rate: Any, weight_decay: Any,
                       mask: Any) -> optax.GradientTransformation:
    """galore -> decoupled weight decay in full parameter space -> -learning_rate."""
    checks.number("weight_decay", weight_decay, low=0)
    if not callable(learning_rate):
        checks.number("learning_rate", learning_rate)
    return optax.chain(galore, optax.add_decayed_weights(weight_decay, mask),
                       optax.scale_by_learning_rate(learning_rate))


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    galore_mask: Any = None,
    matrix_axes: Any = None,
    svd: str = "exact",
    oversample: Optional[int] = None,
    power_iters: Optional[int] = None,
    seed: int = 0,
    align_signs: bool = False,
    reproject_moments: bool = False,
    lazy_threshold: Optional[float] = None,
    lazy_patience: int = 2,
    max_update_proj_gap: Optional[int] = None,
    projector_dtype: Any = None,
    precision: Any = None,
) -> optax.GradientTransformation:
    """AdamW whose moments live in GaLore's rank-`rank` subspaces.

    chain(scale_by_galore(inner=scale_by_adam(b1, b2, eps)), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate)): weight decay is decoupled and applied in
    full parameter space, to every leaf `mask` selects (optax's meaning: a pytree
    of bools or a callable on params; None decays all). Leaves outside
    `galore_mask` get plain AdamW. `learning_rate` may be a schedule; under
    `optax.inject_hyperparams` pass static_args=("rank", "galore_mask", "mask",
    "matrix_axes") for the ones given as callables. Other arguments: see
    `scale_by_galore`.
    """
    q8.check_adam_hyperparameters(b1, b2, eps)
    inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    galore = scale_by_galore(rank, update_proj_gap, scale, proj_type, inner, **_galore_options(locals()))
    return _with_decay_and_lr(galore, learning_rate, weight_decay, mask)


def galore_adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    block_size: int = 256,
    min_size: int = q8.MIN_SIZE,
    galore_mask: Any = None,
    matrix_axes: Any = None,
    svd: str = "exact",
    oversample: Optional[int] = None,
    power_iters: Optional[int] = None,
    seed: int = 0,
    align_signs: bool = False,
    reproject_moments: bool = False,
    lazy_threshold: Optional[float] = None,
    lazy_patience: int = 2,
    max_update_proj_gap: Optional[int] = None,
    projector_dtype: Any = None,
    precision: Any = None,
) -> optax.GradientTransformation:
    """`galore_adamw` with both Adam moments in blockwise dynamic 8-bit (`scale_by_adam_8bit`).

    Low-rank and full-rank moments with at least `min_size` values are stored as
    uint8 codes plus one float32 scale per `block_size` values.
    """
    inner = q8.scale_by_adam_8bit(b1=b1, b2=b2, eps=eps, block_size=block_size, min_size=min_size)
    galore = scale_by_galore(rank, update_proj_gap, scale, proj_type, inner, **_galore_options(locals()))
    return _with_decay_and_lr(galore, learning_rate, weight_decay, mask)


def _shapes_as_params(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Calls `tx.update` with the updates as `params`, for transformations that read only the
    params' shapes and dtypes (optax.scale_by_factored_rms), which GaLore's inner never receives."""
    return optax.GradientTransformation(tx.init, lambda updates, state, params=None: tx.update(
        updates, state, updates))


def galore_adafactor(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    decay_rate: float = 0.8,
    clipping_threshold: Optional[float] = 1.0,
    momentum: Optional[float] = None,
    eps: float = 1e-30,
    min_dim_size_to_factor: int = 128,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    galore_mask: Any = None,
    matrix_axes: Any = None,
    svd: str = "exact",
    oversample: Optional[int] = None,
    power_iters: Optional[int] = None,
    seed: int = 0,
    align_signs: bool = False,
    reproject_moments: bool = False,
    lazy_threshold: Optional[float] = None,
    lazy_patience: int = 2,
    max_update_proj_gap: Optional[int] = None,
    projector_dtype: Any = None,
    precision: Any = None,
) -> optax.GradientTransformation:
    """Adafactor (factored second moment) on GaLore's projected gradients.

    inner = scale_by_factored_rms(decay_rate, eps, min_dim_size_to_factor), then
    update clipping by block RMS (`clipping_threshold`, None to skip), then an
    optional momentum trace (`momentum`; the field `trace` is what
    `reproject_moments` maps). A [r, n] projected gradient keeps r + n second-moment
    values instead of r n. Adafactor's parameter-scale and relative step size are
    not applied (the inner transformation never sees parameters); pass a
    schedule as `learning_rate`.
    """
    checks.number("decay_rate", decay_rate, low=0, high=1)
    checks.number("eps", eps, low=0)
    if momentum is not None:
        checks.number("momentum", momentum, low=0, high=1, high_open=True)
    if clipping_threshold is not None:
        checks.number("clipping_threshold", clipping_threshold, low=0)
    parts = [_shapes_as_params(optax.scale_by_factored_rms(
        decay_rate=decay_rate, epsilon=eps, min_dim_size_to_factor=min_dim_size_to_factor))]
    if clipping_threshold is not None:
        parts.append(optax.clip_by_block_rms(clipping_threshold))
    if momentum is not None:
        parts.append(optax.trace(decay=momentum))
    galore = scale_by_galore(rank, update_proj_gap, scale, proj_type, optax.chain(*parts),
                             **_galore_options(locals()))
    return _with_decay_and_lr(galore, learning_rate, weight_decay, mask)
