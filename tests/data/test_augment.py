"""SimCLR augmentations: shapes and ranges, keys, identity and flip limits, torchvision's colour
semantics against NumPy references in float64, crops, blur, jit vs eager, field validation."""

import colorsys
import functools

import jax
import numpy as np
import pytest

from lorank.data import augment as A

IDENTITY = dict(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0, gray_prob=0.0)


@functools.lru_cache(maxsize=None)
def _jitted(cfg):
    return jax.jit(functools.partial(A.augment, cfg=cfg))


def images(n=4, h=16, w=16, c=3, seed=0):
    return np.random.default_rng(seed).random((n, h, w, c), dtype=np.float32)


def test_shape_dtype_range_kept():
    x = images()
    for cfg, size in ((A.SimCLRAugment(), (16, 16)), (A.SimCLRAugment(out_size=(8, 12), blur_prob=1.0), (8, 12))):
        v = np.asarray(_jitted(cfg)(jax.random.key(0), x))
        assert v.shape == (4, *size, 3) and v.dtype == np.float32
        assert v.min() >= 0.0 and v.max() <= 1.0
        assert not np.allclose(v[..., 0], v[..., 1]) or size != (16, 16)


def test_keys_decide_views():
    x = images()
    f = _jitted(A.SimCLRAugment())
    a, b, c = (np.asarray(f(jax.random.key(k), x)) for k in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    v1, v2 = jax.jit(A.two_views)(jax.random.key(0), x)
    assert v1.shape == v2.shape == x.shape and not np.allclose(v1, v2)
    # one key per example: identical images still get different views
    same = np.repeat(x[:1], 4, axis=0)
    views = np.asarray(f(jax.random.key(2), same))
    assert not np.allclose(views[0], views[1])


def test_all_off_is_identity():
    x = images()
    np.testing.assert_allclose(_jitted(A.SimCLRAugment(**IDENTITY))(jax.random.key(3), x), x, atol=1e-6)


def test_flip_prob_one_is_numpy_flip():
    x = images()
    cfg = A.SimCLRAugment(**{**IDENTITY, "flip_prob": 1.0})
    np.testing.assert_allclose(_jitted(cfg)(jax.random.key(4), x), x[:, :, ::-1], atol=1e-6)


def test_gray_prob_one_gives_equal_channels():
    x = images()
    v = np.asarray(_jitted(A.SimCLRAugment(**{**IDENTITY, "gray_prob": 1.0}))(jax.random.key(5), x))
    np.testing.assert_array_equal(v[..., 0], v[..., 1])
    np.testing.assert_array_equal(v[..., 0], v[..., 2])
    luma = x.astype(np.float64) @ np.array([0.2989, 0.587, 0.114])
    np.testing.assert_allclose(v[..., 0], luma, atol=1e-5)


def test_colour_adjustments_match_torchvision_formulas():
    x = images(1, 6, 5)[0]
    x64 = x.astype(np.float64)
    gray = x64 @ np.array([0.2989, 0.587, 0.114])
    np.testing.assert_allclose(A.adjust_brightness(x, 1.3), np.clip(1.3 * x64, 0, 1), atol=1e-6)
    np.testing.assert_allclose(A.adjust_contrast(x, 0.7), np.clip(0.7 * x64 + 0.3 * gray.mean(), 0, 1), atol=1e-6)
    np.testing.assert_allclose(A.adjust_saturation(x, 1.4), np.clip(1.4 * x64 - 0.4 * gray[..., None], 0, 1),
                               atol=1e-6)
    shift = 0.08
    ref = np.array([[colorsys.hsv_to_rgb((colorsys.rgb_to_hsv(*p)[0] + shift) % 1.0, *colorsys.rgb_to_hsv(*p)[1:])
                     for p in row] for row in x64])
    np.testing.assert_allclose(A.adjust_hue(x, shift), ref, atol=1e-5)


def test_jitter_factors_stay_in_their_ranges():
    """Brightness alone with strength b scales each image by one factor in [1 - b, 1 + b]."""
    x = np.full((64, 4, 4, 3), 0.5, np.float32)
    cfg = A.SimCLRAugment(**{**IDENTITY, "jitter_prob": 1.0}, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0)
    v = np.asarray(_jitted(cfg)(jax.random.key(6), x))
    factors = v[:, 0, 0, 0] / 0.5
    np.testing.assert_allclose(v, factors[:, None, None, None] * x, atol=1e-6)
    assert factors.min() >= 0.6 - 1e-6 and factors.max() <= 1.4 + 1e-6 and factors.std() > 0.1


def test_crop_boxes_follow_torchvision_sampling():
    keys = jax.random.split(jax.random.key(7), 2000)
    boxes = np.asarray(jax.jit(jax.vmap(lambda k: A.crop_box(k, 32, 24, (0.08, 1.0), (0.75, 4 / 3))))(keys))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 24).all()
    area = h * w / (32 * 24)
    assert area.min() >= 0.07 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() > 0.75 * 0.85 and ratio.max() < 4 / 3 * 1.15  # up to the rounding of the sides
    # no candidate of area 1 and aspect 2 fits a square: torchvision's center crop of the aspect-clipped box
    box = A.crop_box(jax.random.key(0), 32, 32, (1.0, 1.0), (2.0, 2.0))
    np.testing.assert_array_equal(box, [8, 0, 16, 32])


def test_resized_crop_at_scale_one_is_a_slice():
    x = images(1, 12, 10)[0]
    out = jax.jit(A.resized_crop, static_argnums=2)(x, np.array([3, 2, 7, 5]), (7, 5))
    np.testing.assert_allclose(out, x[3:10, 2:7], atol=1e-6)


def test_gaussian_blur_matches_numpy_reflect_convolution():
    x = images(1, 9, 8)[0].astype(np.float64)
    sigma, size = 1.3, 5
    r = size // 2
    t = np.arange(-r, r + 1)
    g = np.exp(-t**2 / (2 * sigma**2))
    g /= g.sum()
    p = np.pad(x, ((r, r), (r, r), (0, 0)), mode="reflect")
    rows = sum(g[i] * p[:, i:i + x.shape[1]] for i in range(size))
    ref = sum(g[i] * rows[i:i + x.shape[0]] for i in range(size))
    np.testing.assert_allclose(A.gaussian_blur(x.astype(np.float32), sigma, size), ref, atol=1e-5)


def test_jit_equals_eager():
    x = images(2, 8, 8)
    cfg = A.SimCLRAugment(out_size=6)
    np.testing.assert_allclose(_jitted(cfg)(jax.random.key(8), x), A.augment(jax.random.key(8), x, cfg), atol=1e-5)


@pytest.mark.parametrize("field,value", [
    ("crop_area", (0.5, 0.2)), ("crop_area", (0.0, 1.0)), ("crop_area", (0.1, 1.5)), ("crop_aspect", (1.0,)),
    ("crop_aspect", (-1.0, 1.0)), ("out_size", 0), ("out_size", (8, 8, 8)), ("flip_prob", 1.5),
    ("jitter_prob", -0.1), ("brightness", -0.4), ("contrast", float("nan")), ("saturation", "0.4"),
    ("hue", 0.6), ("jitter_random_order", 1), ("gray_prob", 2), ("blur_prob", None), ("blur_sigma", (2.0, 0.1)),
    ("blur_kernel_fraction", 0.0),
])
def test_bad_field_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        A.SimCLRAugment(**{field: value})


def test_bad_images_are_refused_before_compute():
    cfg = A.SimCLRAugment()
    with pytest.raises(ValueError, match=r"\(16, 16, 3\)"):
        A.augment(jax.random.key(0), images()[0], cfg)
    with pytest.raises(ValueError, match=r"\(4, 16, 16, 1\)"):
        A.augment(jax.random.key(0), images(c=1), cfg)
    with pytest.raises(ValueError, match="uint8"):
        A.augment(jax.random.key(0), (images() * 255).astype(np.uint8), cfg)
    gray_ok = A.SimCLRAugment(jitter_prob=0.0, gray_prob=0.0)
    assert _jitted(gray_ok)(jax.random.key(0), images(c=1)).shape == (4, 16, 16, 1)


def test_views_of_real_cifar10_images(shared_data):
    from lorank.data.images import CIFAR10_ARCHIVE, load_cifar10

    archive = shared_data / CIFAR10_ARCHIVE
    if not archive.is_file():
        pytest.skip(f"CIFAR-10 archive {archive} not found")
    x, _ = load_cifar10(archive, split="test", max_per_class=1)
    v1, v2 = (np.asarray(v) for v in jax.jit(A.two_views)(jax.random.key(9), x))
    assert v1.shape == v2.shape == (10, 32, 32, 3) and v1.dtype == np.float32
    assert 0.0 <= min(v1.min(), v2.min()) and max(v1.max(), v2.max()) <= 1.0
    assert not np.allclose(v1, v2) and not np.allclose(v1, x)
