"""Fixtures of the training tests."""

import pathlib

import numpy as np
import pytest

from lorank import config_files

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def small_ssl_config(tmp_path):
    """make(config_file, **ssl_fields) -> that file's smoke config on 64 images of 4 colour classes, 16 px, in an
    npz this fixture writes (no dataset needed): 8 steps of 16 images, evaluations and checkpoints every 4."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 16)
    base = rng.uniform(size=(4, 1, 1, 3))
    x = np.clip(base[labels] + 0.2 * rng.normal(size=(64, 16, 16, 3)), 0, 1)
    np.savez(tmp_path / "images.npz", images=(x * 255).astype(np.uint8), labels=labels.astype(np.int32))

    def make(config_file, **ssl_fields):
        c = config_files.load(REPO / "configs" / config_file, "smoke")
        c.data.source, c.data.path = "npz", str(tmp_path / "images.npz")
        c.train.steps, c.train.batch_size, c.train.eval_every, c.train.checkpoint_every, c.train.log_every = (
            8, 16, 4, 4, 2)
        c.eval.knn_k, c.eval.probe_batch = (20, 5), 16
        for k, v in ssl_fields.items():
            c.ssl[k] = v
        return c

    return make
