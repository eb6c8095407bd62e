"""Augmented views of image batches.

`augment_views` is the light NumPy augmentation of the theory experiments (deep
linear contrastive learning on CIFAR-10): a random translation with reflect
padding, a horizontal flip and a brightness scale per image.

`SimCLRAugment`, `augment` and `two_views` are the SimCLR augmentations of the
self-supervised trainers, in jit-able JAX with one PRNG key per example: random
resized crop, horizontal flip, colour jitter, grayscale and Gaussian blur with
torchvision's sampling and semantics (dm-pix where it has the operation).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from lorank import checks


def augment_views(rng: np.random.Generator, images: np.ndarray, shift: int, brightness: float) -> np.ndarray:
    """One augmented view per image: random translation by up to `shift` pixels (reflect padding),
    horizontal flip with probability 1/2, brightness scaled by a factor in [1 - brightness,
    1 + brightness]. [N, H, W, C] -> [N, H, W, C]."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="reflect")
    out = np.empty_like(images)
    dy, dx = rng.integers(0, 2 * shift + 1, size=(2, n))
    flip = rng.random(n) < 0.5
    scale = 1.0 + rng.uniform(-brightness, brightness, size=n)
    for i in range(n):
        crop = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = (crop[:, ::-1] if flip[i] else crop) * scale[i]
    return out


# ----------------------------------------------------------------------------------------------
# SimCLR augmentations in JAX.


def _pair(name: str, value: Any, *, low: float, high: float | None = None, low_open: bool = True) -> tuple:
    """(lo, hi) floats with low (<) lo <= hi (<=) high."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (lo, hi), got {value!r}")
    lo = checks.number(f"{name}[0]", value[0], low=low, high=high, low_open=low_open)
    hi = checks.number(f"{name}[1]", value[1], low=low, high=high, low_open=low_open)
    if lo > hi:
        raise ValueError(f"{name} must be a pair (lo, hi) with lo <= hi, got {value!r}")
    return lo, hi


@dataclasses.dataclass(frozen=True)
class SimCLRAugment:
    """The SimCLR augmentation pipeline (Chen et al., 2020), in torchvision's semantics.

    Per example, in order: a random resized crop (`crop_area` of the image's area, aspect
    ratio log-uniform in `crop_aspect`, resized bilinearly to `out_size`), a horizontal flip
    with probability `flip_prob`, colour jitter with probability `jitter_prob`, grayscale with
    probability `gray_prob`, a Gaussian blur with probability `blur_prob`. The output is
    clipped to [0, 1]. Hashable, so it can be a static argument of `jax.jit`.

    Attributes:
      crop_area: (lo, hi), 0 < lo <= hi <= 1: the crop's fraction of the image area.
      crop_aspect: (lo, hi), 0 < lo <= hi: range of the crop's width / height (sampled log-uniformly).
      out_size: output (height, width), an int for a square, or None: the input's size.
      flip_prob: probability of a horizontal flip.
      jitter_prob: probability of colour jitter (all four adjustments below, or none).
      brightness: brightness factor uniform in [max(0, 1 - b), 1 + b] (image * factor).
      contrast: contrast factor in [max(0, 1 - c), 1 + c], blended with the mean of the grayscale image.
      saturation: saturation factor in [max(0, 1 - s), 1 + s], blended with the grayscale image.
      hue: hue shift uniform in [-h, h] (fraction of the colour circle), h in [0, 0.5].
      jitter_random_order: apply the four adjustments in a random order per example (torchvision);
        False: brightness, contrast, saturation, hue.
      gray_prob: probability of converting to grayscale (Rec. 601 luma, kept as 3 channels).
      blur_prob: probability of a Gaussian blur (SimCLR: 0.5 on ImageNet / STL-10, off on CIFAR).
      blur_sigma: (lo, hi), 0 < lo <= hi: the blur's standard deviation in pixels, uniform.
      blur_kernel_fraction: the kernel size is int(fraction * output height), made odd (2 * (size // 2) + 1).
    """

    crop_area: tuple[float, float] = (0.08, 1.0)
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    out_size: int | tuple[int, int] | None = None
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_random_order: bool = True
    gray_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = 0.1

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("crop_area", _pair("crop_area", self.crop_area, low=0.0, high=1.0))
        set_("crop_aspect", _pair("crop_aspect", self.crop_aspect, low=0.0))
        if self.out_size is not None:
            size = (self.out_size, self.out_size) if isinstance(self.out_size, (int, np.integer)) else self.out_size
            if not isinstance(size, (tuple, list)) or len(size) != 2:
                raise ValueError(f"out_size must be None, an int or a pair (height, width), got {self.out_size!r}")
            set_("out_size", tuple(checks.integer(f"out_size[{i}]", s, minimum=1) for i, s in enumerate(size)))
        for name in ("flip_prob", "jitter_prob", "gray_prob", "blur_prob"):
            set_(name, checks.number(name, getattr(self, name), low=0.0, high=1.0))
        for name in ("brightness", "contrast", "saturation"):
            set_(name, checks.number(name, getattr(self, name), low=0.0))
        set_("hue", checks.number("hue", self.hue, low=0.0, high=0.5))
        set_("jitter_random_order", checks.boolean("jitter_random_order", self.jitter_random_order))
        set_("blur_sigma", _pair("blur_sigma", self.blur_sigma, low=0.0))
        set_("blur_kernel_fraction", checks.number("blur_kernel_fraction", self.blur_kernel_fraction, low=0.0,
                                                   high=1.0, low_open=True))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the views of [.., height, width, C] images."""
        return (height, width) if self.out_size is None else self.out_size

    @property
    def colour(self) -> bool:
        """Whether the pipeline changes colours (and so needs 3 channels)."""
        return self.jitter_prob > 0 or self.gray_prob > 0


CROP_TRIES = 10  # torchvision's RandomResizedCrop attempts before its center-crop fallback
CROP_UNIFORMS = 2 * CROP_TRIES + 2  # area and aspect of each try, then the position
JITTER_UNIFORMS = 8  # four factors, then four sort keys of the random order


def crop_box(key: jax.Array, height: int, width: int, area: tuple[float, float],
             aspect: tuple[float, float]) -> jax.Array:
    """A random resized crop box (top, left, box height, box width) as torchvision samples it.

    Up to CROP_TRIES candidates (target area uniform in `area` x height x width, aspect ratio
    log-uniform in `aspect`, sides rounded); the first that fits is placed uniformly; if none
    fits, the center crop of the largest box with an aspect ratio clipped to `aspect`. All
    candidates are drawn at once (no data-dependent loop). Returns int32 [4].
    """
    return _crop_box(jax.random.uniform(key, (CROP_UNIFORMS,)), height, width, area, aspect)


def _crop_box(u: jax.Array, height: int, width: int, area: tuple[float, float],
              aspect: tuple[float, float]) -> jax.Array:
    """`crop_box` from CROP_UNIFORMS uniforms in [0, 1)."""
    target = height * width * (area[0] + (area[1] - area[0]) * u[:CROP_TRIES])
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    ratio = jnp.exp(log_lo + (log_hi - log_lo) * u[CROP_TRIES:2 * CROP_TRIES])
    w = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(fits)
    in_ratio = width / height
    if in_ratio < aspect[0]:
        fb_w, fb_h = width, int(round(width / aspect[0]))
    elif in_ratio > aspect[1]:
        fb_w, fb_h = int(round(height * aspect[1])), height
    else:
        fb_w, fb_h = width, height
    bh, bw = h[first], w[first]
    pos = u[2 * CROP_TRIES:]
    top = jnp.minimum(jnp.floor(pos[0] * (height - bh + 1)).astype(jnp.int32), height - bh)
    left = jnp.minimum(jnp.floor(pos[1] * (width - bw + 1)).astype(jnp.int32), width - bw)
    return jnp.where(fits[first], jnp.stack([top, left, bh, bw]),
                     jnp.array([(height - fb_h) // 2, (width - fb_w) // 2, fb_h, fb_w], jnp.int32))


def resized_crop(image: jax.Array, box: jax.Array, size: tuple[int, int]) -> jax.Array:
    """The box (top, left, height, width) of `image` [H, W, C] resized bilinearly to `size`
    (antialiased when shrinking), without dynamic shapes: `jax.image.scale_and_translate` maps the
    box onto the output. At the box's border the bilinear kernel may read the pixel just outside
    it, where torchvision (crop, then resize) repeats the border pixel. -> [size[0], size[1], C]."""
    box = box.astype(jnp.float32)
    scale = jnp.array([size[0], size[1]], jnp.float32) / box[2:]
    translation = -box[:2] * scale
    return jax.image.scale_and_translate(image, (size[0], size[1], image.shape[-1]), (0, 1), scale, translation,
                                         method="linear", antialias=True)


def _gray(image: jax.Array) -> jax.Array:
    """Rec. 601 luma 0.2989 R + 0.587 G + 0.114 B (torchvision's and dm-pix's), kept as 3 channels."""
    return pix.rgb_to_grayscale(image, keep_dims=True)


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision's brightness: image * factor, clipped to [0, 1]. [..., H, W, 3] -> same."""
    return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision's contrast of one image [H, W, 3]: factor * image + (1 - factor) * (the mean of its
    grayscale), clipped to [0, 1] (dm-pix blends with each channel's own mean instead)."""
    mean = jnp.mean(_gray(image))
    return jnp.clip(factor * image + (1 - factor) * mean, 0.0, 1.0)


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision's saturation: factor * image + (1 - factor) * grayscale(image), clipped to [0, 1]
    (dm-pix scales the HSV saturation instead). [..., H, W, 3] -> same."""
    return jnp.clip(factor * image + (1 - factor) * _gray(image), 0.0, 1.0)


def adjust_hue(image: jax.Array, shift: jax.Array) -> jax.Array:
    """torchvision's hue: the HSV hue shifted by `shift` (a fraction of the circle) mod 1, as dm-pix
    does; clipped to [0, 1]. [..., H, W, 3] -> same."""
    return jnp.clip(pix.adjust_hue(image, shift), 0.0, 1.0)


def colour_jitter(key: jax.Array, image: jax.Array, cfg: SimCLRAugment) -> jax.Array:
    """torchvision's ColorJitter(brightness, contrast, saturation, hue) of one image [H, W, 3] in [0, 1]:
    factors drawn uniformly from their ranges, the four applied in a random order (or in that
    order without `cfg.jitter_random_order`), each clipping to [0, 1]."""
    return _colour_jitter(jax.random.uniform(key, (JITTER_UNIFORMS,)), image, cfg)


def _colour_jitter(u: jax.Array, image: jax.Array, cfg: SimCLRAugment) -> jax.Array:
    """`colour_jitter` from JITTER_UNIFORMS uniforms in [0, 1)."""
    ops, args = [], []
    for i, (strength, fn) in enumerate(((cfg.brightness, adjust_brightness), (cfg.contrast, adjust_contrast),
                                        (cfg.saturation, adjust_saturation), (cfg.hue, adjust_hue))):
        if strength == 0:  # no adjustment (torchvision leaves it out)
            continue
        lo, hi = (-strength, strength) if fn is adjust_hue else (max(0.0, 1 - strength), 1 + strength)
        ops.append(fn)
        args.append(lo + (hi - lo) * u[i])
    if not ops:
        return image
    if not cfg.jitter_random_order:
        for fn, a in zip(ops, args):
            image = fn(image, a)
        return image
    args = jnp.stack(args)
    order = jnp.argsort(u[4:4 + len(ops)])  # a uniformly random permutation
    branches = [functools.partial(lambda i, fn, x, a: fn(x, a[i]), i, fn) for i, fn in enumerate(ops)]
    # One loop body holding each adjustment once (a smaller program than unrolling the four steps).
    return jax.lax.fori_loop(0, len(ops), lambda i, x: jax.lax.switch(order[i], branches, x, args), image)


def gaussian_blur(image: jax.Array, sigma: jax.Array, kernel_size: int) -> jax.Array:
    """Gaussian blur of one image [H, W, C] with a (2 * (kernel_size // 2) + 1)-tap separable
    kernel of standard deviation `sigma`, reflect padding (as torchvision's GaussianBlur)."""
    radius = kernel_size // 2
    if radius == 0:
        return image
    padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    return pix.gaussian_blur(padded, sigma, 2 * radius + 1, padding="VALID")


def _augment_one(key: jax.Array, image: jax.Array, cfg: SimCLRAugment, size: tuple[int, int]) -> jax.Array:
    # every random number of the example from one draw: a much smaller program than one draw per use
    u = jax.random.uniform(key, (CROP_UNIFORMS + JITTER_UNIFORMS + 5,))
    u_crop, u_jit, (u_flip, u_jit_on, u_gray, u_blur, u_blur_on) = (
        u[:CROP_UNIFORMS], u[CROP_UNIFORMS:CROP_UNIFORMS + JITTER_UNIFORMS], u[CROP_UNIFORMS + JITTER_UNIFORMS:])
    height, width = image.shape[:2]
    x = resized_crop(image, _crop_box(u_crop, height, width, cfg.crop_area, cfg.crop_aspect), size)
    x = jnp.clip(x, 0.0, 1.0)
    if cfg.flip_prob > 0:
        x = jnp.where(u_flip < cfg.flip_prob, pix.flip_left_right(x), x)
    if cfg.jitter_prob > 0:
        x = jnp.where(u_jit_on < cfg.jitter_prob, _colour_jitter(u_jit, x, cfg), x)
    if cfg.gray_prob > 0:
        x = jnp.where(u_gray < cfg.gray_prob, _gray(x), x)
    if cfg.blur_prob > 0:
        sigma = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * u_blur
        blurred = gaussian_blur(x, sigma, int(cfg.blur_kernel_fraction * size[0]))
        x = jnp.where(u_blur_on < cfg.blur_prob, blurred, x)
    return jnp.clip(x, 0.0, 1.0)


def check_images(images: Any, cfg: SimCLRAugment) -> None:
    """ValueError naming the shape or dtype of a batch `augment` cannot take."""
    shape = tuple(jnp.shape(images))
    if len(shape) != 4 or min(shape, default=0) < 1:
        raise ValueError(f"images must be a non-empty batch [N, H, W, C], got shape {shape}")
    if cfg.colour and shape[-1] != 3:
        raise ValueError(f"images of shape {shape} have {shape[-1]} channels; colour jitter and grayscale "
                         "need 3 (RGB); set jitter_prob=0 and gray_prob=0 for other channel counts")
    dtype = images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"images must be floating point in [0, 1], got dtype {dtype}")


def augment(key: jax.Array, images: jax.Array, cfg: SimCLRAugment = SimCLRAugment()) -> jax.Array:
    """One SimCLR view of each image, each with its own key split from `key` (vmapped; jit-able,
    with `cfg` static, e.g. `jax.jit(augment, static_argnames="cfg")`).

    Args:
      key: a PRNG key.
      images: float [N, H, W, C] in [0, 1] (C = 3 unless jitter_prob = gray_prob = 0).
      cfg: the pipeline.

    Returns:
      [N, h, w, C] of the images' dtype, in [0, 1]; (h, w) = cfg.output_size(H, W).
    """
    check_images(images, cfg)
    images = jnp.asarray(images)
    n, height, width, _ = images.shape
    size = cfg.output_size(height, width)
    keys = jax.random.split(key, n)
    out = jax.vmap(lambda k, x: _augment_one(k, x.astype(jnp.float32), cfg, size))(keys, images)
    return out.astype(images.dtype)


def two_views(key: jax.Array, images: jax.Array,
              cfg: SimCLRAugment = SimCLRAugment()) -> tuple[jax.Array, jax.Array]:
    """Two independent views (v1, v2) of each image, each [N, h, w, C] (`augment` with two keys)."""
    k1, k2 = jax.random.split(key)
    return augment(k1, images, cfg), augment(k2, images, cfg)
