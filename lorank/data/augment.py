"""Augmented views of image batches.

`augment_views` is the light NumPy augmentation of the theory experiments (deep
linear contrastive learning on CIFAR-10): a random translation with reflect
padding, a horizontal flip and a brightness scale per image.
"""

from __future__ import annotations

import numpy as np


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
