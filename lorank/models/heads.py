"""Projector and predictor heads of self-supervised learning, in flax.linen.

`MLPHead(hidden, out, num_layers, batch_norm, last_bn)` is Linear-BN-ReLU repeated
num_layers - 1 times, then a final Linear (and a BatchNorm after it with `last_bn`):

    SimCLR projector (CIFAR)    MLPHead(512, 128)                  512-BN-ReLU-128 (the defaults)
    BYOL projector / predictor  MLPHead(4096, 256)                 4096-BN-ReLU-256
    SimSiam projector           MLPHead(2048, 2048, num_layers=3, last_bn=True)
    SimSiam predictor           MLPHead(512, 2048)                 (bottleneck 512)

A Linear followed by BatchNorm has no bias (the BatchNorm's shift replaces it); the
final Linear has one unless `last_bn`. The last BatchNorm has no learned scale or shift
unless `last_bn_affine` (SimSiam's `BatchNorm1d(affine=False)`). `LinearHead` is one
Linear map (DirectPred's linear predictor, a linear projector). Every head is called as
`head(x [N, D], *, train)` -> [N, out]; `train` picks batch or running statistics
(`batch_stats` collection), as in `lorank.models.resnet`. Kernels carry the logical axes
('head_in', 'head_out'), replicated by `AXIS_RULES`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lorank import checks

PROJECTORS = ("mlp2", "linear", "none")
AXIS_RULES = (("head_in", None), ("head_out", None), ("norm", None))
PRESETS = {  # MLPHead fields of the papers' heads
    "simclr_projector": dict(hidden=512, out=128),
    "byol_projector": dict(hidden=4096, out=256),
    "byol_predictor": dict(hidden=4096, out=256),
    "simsiam_projector": dict(hidden=2048, out=2048, num_layers=3, last_bn=True),
    "simsiam_predictor": dict(hidden=512, out=2048),
}


def _dense(features: int, use_bias: bool, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("head_in", "head_out")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("head_out",)))


def _bn(train: bool, dtype: Any, name: str, affine: bool = True) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        use_scale=affine, use_bias=affine, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def _check_input(x: Any, what: str) -> None:
    shape = tuple(jnp.shape(x))
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"{what} takes features [N, D], got shape {shape}")


class MLPHead(nn.Module):
    """Linear-BN-ReLU x (num_layers - 1), then Linear (then BN with `last_bn`).

    Attributes:
      hidden: width of the hidden layers.
      out: output width.
      num_layers: Linear layers (>= 1; 1 is a single Linear).
      batch_norm: BatchNorm after each hidden Linear (False: Linear-ReLU).
      last_bn: BatchNorm after the final Linear.
      last_bn_affine: give that BatchNorm a learned scale and shift.
      dtype: computation dtype (the output is float32).

    __call__(x [N, D], *, train) -> [N, out].
    """

    hidden: int = 512
    out: int = 128
    num_layers: int = 2
    batch_norm: bool = True
    last_bn: bool = False
    last_bn_affine: bool = False
    dtype: Any = jnp.float32

    def check(self) -> None:
        """ValueError naming a bad field."""
        checks.integer("hidden", self.hidden, minimum=1)
        checks.integer("out", self.out, minimum=1)
        checks.integer("num_layers", self.num_layers, minimum=1)
        for name in ("batch_norm", "last_bn", "last_bn_affine"):
            checks.boolean(name, getattr(self, name))

    @nn.compact
    def __call__(self, x, *, train: bool):
        self.check()
        _check_input(x, "MLPHead")
        x = jnp.asarray(x, self.dtype)
        for i in range(self.num_layers - 1):
            x = _dense(self.hidden, not self.batch_norm, self.dtype, f"dense{i}")(x)
            if self.batch_norm:
                x = _bn(train, self.dtype, f"bn{i}")(x)
            x = nn.relu(x)
        x = _dense(self.out, not self.last_bn, self.dtype, f"dense{self.num_layers - 1}")(x)
        if self.last_bn:
            x = _bn(train, self.dtype, f"bn{self.num_layers - 1}", self.last_bn_affine)(x)
        return x.astype(jnp.float32)


class LinearHead(nn.Module):
    """One Linear map x W (+ b with `use_bias`). __call__(x [N, D], *, train) -> [N, out]."""

    out: int
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        del train  # no batch statistics
        checks.integer("out", self.out, minimum=1)
        checks.boolean("use_bias", self.use_bias)
        _check_input(x, "LinearHead")
        return _dense(self.out, self.use_bias, self.dtype, "dense")(jnp.asarray(x, self.dtype)).astype(jnp.float32)


class Identity(nn.Module):
    """No head: __call__(x [N, D], *, train) -> x."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        del train
        _check_input(x, "Identity head")
        return x


def projector(name: str, *, hidden: int = 512, out: int = 128, num_layers: int = 2, batch_norm: bool = True,
              last_bn: bool = False, use_bias: bool = False, dtype: Any = jnp.float32) -> nn.Module:
    """A projector by name.

    Args:
      name: "mlp2" (`MLPHead(hidden, out, num_layers, batch_norm, last_bn)`; SimCLR's
        512-BN-ReLU-128 by default), "linear" (`LinearHead(out, use_bias)`) or "none" (identity).
      hidden, out, num_layers, batch_norm, last_bn: MLPHead's fields ("linear" uses `out` only).
      use_bias: LinearHead's field.
      dtype: computation dtype.

    Raises:
      ValueError: an unknown name or a bad field (named).
    """
    checks.one_of("projector", name, PROJECTORS)
    if name == "mlp2":
        head = MLPHead(hidden, out, num_layers, batch_norm, last_bn, dtype=dtype)
        head.check()
        return head
    if name == "linear":
        checks.integer("out", out, minimum=1)
        checks.boolean("use_bias", use_bias)
        return LinearHead(out, use_bias, dtype)
    return Identity()


def projector_dim(name: str, in_dim: int, *, out: int = 128) -> int:
    """Output width of `projector(name, out=out)` on [N, in_dim] features."""
    checks.one_of("projector", name, PROJECTORS)
    return in_dim if name == "none" else out
