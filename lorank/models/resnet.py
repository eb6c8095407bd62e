"""ResNet-18 / ResNet-50 backbones and a small conv net, in flax.linen, for self-supervised learning.

The backbones return globally average-pooled features (no classifier): [N, 512] for
ResNet-18, [N, 2048] for ResNet-50 (at the default width 64; 8 x width and 32 x width
in general), [N, width * widths[-1]] for `SmallConvNet`. The layout and numerics
follow torchvision's resnet18 / resnet50 (v1.5: the stride of a bottleneck is on its
3x3 convolution; explicit PyTorch padding; BatchNorm momentum 0.1, epsilon 1e-5;
Kaiming-normal fan-out convolution init), so the parameter counts are torchvision's
without the fc layer: 11,176,512 and 23,508,032 with the ImageNet stem.

Stems: `stem="cifar"` is a 3x3 convolution with stride 1 and no max-pool (32 px
CIFAR images; total downsampling 8), `stem="imagenet"` the 7x7 stride-2 convolution
and 3x3 stride-2 max-pool (ImageNet, STL-10 at 96 px; total downsampling 32).

BatchNorm: every module takes `train` (keyword). With train=True the batch statistics
normalize and the running averages in the `batch_stats` collection are updated
(apply with mutable=["batch_stats"]); with train=False the running averages are used:

    variables = model.init(key, x, train=False)
    feats, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    feats = model.apply({**variables, **updates}, x, train=False)

Parameter paths mirror torchvision's state dict (L stage, B block):

    conv1/kernel, bn1/{scale,bias}                    stem
    layerL_B/conv{1,2[,3]}/kernel                     [kh, kw, in, out] ('conv_height', 'conv_width',
                                                      'conv_in', 'conv_out')
    layerL_B/bn{1,2[,3]}/{scale,bias}                 [C] ('norm',)
    layerL_B/downsample_conv/kernel, downsample_bn    the projection shortcut, where the shape changes

`FAMILY` describes the backbones to the generic layers: replicated parameters (a
ResNet is data-parallel; a rules table naming mesh axes for 'conv_out' shards it),
GaLore on the blocks' convolution kernels seen as [kh * kw * in, out] matrices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorank import checks
from lorank.models.family import ModelFamily
from lorank.optim.projection import MatrixAxes

STEMS = ("cifar", "imagenet")
BLOCKS = ("basic", "bottleneck")
EXPANSION = {"basic": 1, "bottleneck": 4}
CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
# logical axis -> mesh axis (`lorank.train.mesh`): every axis replicated.
AXIS_RULES = (("conv_height", None), ("conv_width", None), ("conv_in", None), ("conv_out", None), ("norm", None))
# The blocks' convolution kernels (not the stem's nor the shortcuts'), as [kh * kw * in, out] matrices.
GALORE_PATTERN = r"(^|.*/)layer\d+_\d+/conv\d+/kernel"
SMALL_CONVNET_GALORE_PATTERN = r"(^|.*/)conv([2-9]|\d\d+)/kernel"  # SmallConvNet's convolutions after the first

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's kaiming_normal_(fan_out)


def _conv(features: int, size: int, strides: int, dtype: Any, name: str) -> nn.Conv:
    pad = (size - 1) // 2  # PyTorch's padding: 1 for 3x3, 3 for 7x7, 0 for 1x1
    return nn.Conv(features, (size, size), strides=(strides, strides), padding=((pad, pad), (pad, pad)),
                   use_bias=False, dtype=dtype, kernel_init=nn.with_logical_partitioning(_conv_init, CONV_AXES),
                   name=name)


def _bn(train: bool, dtype: Any, name: str, zero_scale: bool = False) -> nn.BatchNorm:
    scale = nn.initializers.zeros if zero_scale else nn.initializers.ones
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        scale_init=nn.with_logical_partitioning(scale, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), name=name)


def check_images(shape: tuple[int, ...], in_channels: int, min_size: int, what: str) -> None:
    """ValueError naming `shape` unless it is [N, H, W, in_channels] with H, W >= min_size and N >= 1."""
    shape = tuple(shape)
    if len(shape) != 4:
        raise ValueError(f"{what} takes images [N, H, W, C], got shape {shape}")
    if shape[-1] != in_channels:
        raise ValueError(f"{what} takes {in_channels}-channel images, got shape {shape}")
    if shape[0] < 1 or min(shape[1:3]) < min_size:
        raise ValueError(f"{what} downsamples by {min_size}: images of shape {shape} are too small "
                         f"(height and width must be >= {min_size})")


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and the residual (projected by a 1x1 conv-BN where the shape changes).
    [N, H, W, C] -> [N, H / strides, W / strides, features]."""

    features: int
    strides: int = 1
    zero_init_residual: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        y = nn.relu(_bn(train, self.dtype, "bn1")(_conv(self.features, 3, self.strides, self.dtype, "conv1")(x)))
        y = _bn(train, self.dtype, "bn2", self.zero_init_residual)(_conv(self.features, 3, 1, self.dtype, "conv2")(y))
        return nn.relu(y + _shortcut(x, self.features, self.strides, train, self.dtype))


class Bottleneck(nn.Module):
    """1x1 (features), 3x3 (features, the stride), 1x1 (4 x features) conv-BN layers and the residual.
    [N, H, W, C] -> [N, H / strides, W / strides, 4 * features]."""

    features: int
    strides: int = 1
    zero_init_residual: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        y = nn.relu(_bn(train, self.dtype, "bn1")(_conv(self.features, 1, 1, self.dtype, "conv1")(x)))
        y = nn.relu(_bn(train, self.dtype, "bn2")(_conv(self.features, 3, self.strides, self.dtype, "conv2")(y)))
        out = 4 * self.features
        y = _bn(train, self.dtype, "bn3", self.zero_init_residual)(_conv(out, 1, 1, self.dtype, "conv3")(y))
        return nn.relu(y + _shortcut(x, out, self.strides, train, self.dtype))


def _shortcut(x, features: int, strides: int, train: bool, dtype: Any):
    if strides == 1 and x.shape[-1] == features:
        return x
    return _bn(train, dtype, "downsample_bn")(_conv(features, 1, strides, dtype, "downsample_conv")(x))


class ResNet(nn.Module):
    """A ResNet backbone: stem, four stages of residual blocks (widths width x 1, 2, 4, 8 x expansion,
    stride 2 at the start of stages 2-4), global average pooling.

    Attributes:
      stage_sizes: blocks per stage, (2, 2, 2, 2) for ResNet-18, (3, 4, 6, 3) for ResNet-50.
      block: "basic" (ResNet-18/34) or "bottleneck" (ResNet-50 and deeper).
      stem: "cifar" (3x3 stride 1, no max-pool) or "imagenet" (7x7 stride 2, 3x3 stride-2 max-pool).
      width: channels of the stem and the first stage (64 in the papers).
      in_channels: channels of the input images.
      zero_init_residual: start the last BatchNorm scale of each block at 0 (torchvision's option).
      dtype: computation dtype (parameters stay float32; features are returned as float32).

    __call__(images [N, H, W, in_channels], *, train) -> features float32 [N, feature_dim].
    """

    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    block: str = "basic"
    stem: str = "cifar"
    width: int = 64
    in_channels: int = 3
    zero_init_residual: bool = False
    dtype: Any = jnp.float32

    @property
    def feature_dim(self) -> int:
        """Width of the pooled features: width x 2^(stages - 1) x expansion."""
        return self.width * 2 ** (len(self.stage_sizes) - 1) * EXPANSION[self.block]

    @property
    def min_size(self) -> int:
        """The total downsampling: the smallest height and width the backbone takes."""
        return 2 ** (len(self.stage_sizes) - 1) * (4 if self.stem == "imagenet" else 1)

    def check(self, shape: tuple[int, ...]) -> None:
        """ValueError naming a bad field, or `shape` where the backbone cannot take it."""
        checks.one_of("stem", self.stem, STEMS)
        checks.one_of("block", self.block, BLOCKS)
        checks.integer("width", self.width, minimum=1)
        checks.integer("in_channels", self.in_channels, minimum=1)
        if not self.stage_sizes or not all(isinstance(n, int) and n >= 1 for n in self.stage_sizes):
            raise ValueError(f"stage_sizes must be positive block counts, got {self.stage_sizes!r}")
        check_images(shape, self.in_channels, self.min_size, f"ResNet (stem={self.stem!r})")

    @nn.compact
    def __call__(self, x, *, train: bool):
        self.check(jnp.shape(x))
        x = jnp.asarray(x, self.dtype)
        if self.stem == "imagenet":
            x = nn.relu(_bn(train, self.dtype, "bn1")(_conv(self.width, 7, 2, self.dtype, "conv1")(x)))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = nn.relu(_bn(train, self.dtype, "bn1")(_conv(self.width, 3, 1, self.dtype, "conv1")(x)))
        block = BasicBlock if self.block == "basic" else Bottleneck
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = block(self.width * 2**i, strides, self.zero_init_residual, self.dtype,
                          name=f"layer{i + 1}_{j}")(x, train=train)
        return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block="basic")
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck")


class SmallConvNet(nn.Module):
    """A few conv3x3-BN-ReLU layers for CPU runs: layer i has width x widths[i] channels and stride 2
    for i > 0, then global average pooling.

    Attributes:
      width: the base channel count.
      widths: channel multipliers of the layers.
      in_channels: channels of the input images.
      dtype: computation dtype.

    __call__(images [N, H, W, in_channels], *, train) -> features float32 [N, width * widths[-1]].
    """

    width: int = 32
    widths: tuple[int, ...] = (1, 2, 4)
    in_channels: int = 3
    dtype: Any = jnp.float32

    @property
    def feature_dim(self) -> int:
        return self.width * self.widths[-1]

    @property
    def min_size(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def check(self, shape: tuple[int, ...]) -> None:
        """ValueError naming a bad field, or `shape` where the network cannot take it."""
        checks.integer("width", self.width, minimum=1)
        checks.integer("in_channels", self.in_channels, minimum=1)
        if not self.widths or not all(isinstance(n, int) and n >= 1 for n in self.widths):
            raise ValueError(f"widths must be positive channel multipliers, got {self.widths!r}")
        check_images(shape, self.in_channels, self.min_size, "SmallConvNet")

    @nn.compact
    def __call__(self, x, *, train: bool):
        self.check(jnp.shape(x))
        x = jnp.asarray(x, self.dtype)
        for i, mult in enumerate(self.widths):
            x = _conv(self.width * mult, 3, 2 if i else 1, self.dtype, f"conv{i + 1}")(x)
            x = nn.relu(_bn(train, self.dtype, f"bn{i + 1}")(x))
        return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)


BACKBONES = {"resnet18": ResNet18, "resnet50": ResNet50, "small_convnet": SmallConvNet}


def backbone(name: str, **kwargs) -> nn.Module:
    """The backbone `name` ("resnet18", "resnet50", "small_convnet") with its fields set by `kwargs`
    (e.g. stem="imagenet", width=8).

    Raises:
      ValueError: an unknown name or field, or a bad field value (named).
    """
    checks.one_of("backbone", name, tuple(BACKBONES))
    cls = SmallConvNet if name == "small_convnet" else ResNet
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"backbone {name!r} has no field(s) {unknown}; its fields are {sorted(fields)}")
    model = BACKBONES[name](**kwargs)
    _check_fields(model)
    return model


def _check_fields(model: nn.Module) -> None:
    """The field checks of `model.check` alone (a valid shape of the model's channel count)."""
    try:
        channels = checks.integer("in_channels", model.in_channels, minimum=1)
        model.check((1, 1 << 12, 1 << 12, channels))
    except TypeError as e:  # a field of a wrong type breaking the size arithmetic
        raise ValueError(f"bad backbone field: {e}") from None


def feature_dim(name: str, **kwargs) -> int:
    """Width D of the features [N, D] of `backbone(name, **kwargs)`."""
    return backbone(name, **kwargs).feature_dim


def param_count(params: Any) -> int:
    """Number of scalars in a parameter pytree (boxed or not; ShapeDtypeStructs included)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(params)))


def layer_kind(path: tuple) -> str | None:
    """Layer kind of a parameter path: "stem", "conv" (block convolutions), "shortcut", or None (BatchNorm)."""
    names = [str(getattr(k, "key", k)) for k in path]
    if not names or names[-1] != "kernel":
        return None
    if any(n.startswith("downsample") for n in names):
        return "shortcut"
    return "conv" if any(n.startswith("layer") for n in names) else "stem"


def conv_matrix_axes(params: Any) -> Any:
    """MatrixAxes of every 4-D convolution kernel [kh, kw, in, out] as the matrix [kh * kw * in, out]; None else."""
    return jax.tree.map(lambda x: MatrixAxes((0, 1, 2), 3) if len(x.shape) == 4 else None, params)


FAMILY = ModelFamily(name="resnet", axis_rules=AXIS_RULES, projected=GALORE_PATTERN, layer_kind=layer_kind,
                     matrix_axes=conv_matrix_axes)
SMALL_CONVNET_FAMILY = dataclasses.replace(FAMILY, name="small_convnet", projected=SMALL_CONVNET_GALORE_PATTERN)


def family(backbone_name: str) -> ModelFamily:
    """The ModelFamily of a backbone by name: which kernels GaLore projects, as [kh * kw * in, out]."""
    checks.one_of("backbone", backbone_name, tuple(BACKBONES))
    return SMALL_CONVNET_FAMILY if backbone_name == "small_convnet" else FAMILY
