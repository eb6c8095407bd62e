"""Every lorank optimizer's eagerly initialised state can be donated to a jitted step.

`jax.jit(step, donate_argnums=...)` refuses a state in which two leaves are one
buffer ("Attempt to donate the same buffer twice"), so `init` must give every
leaf its own array, as optax's own transformations do.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lorank.optim import (MatrixAxes, galore_adafactor, galore_adamw, galore_adamw_8bit, scale_by_adam_8bit,
                          scale_by_galore)

# Three projected matrices (one a 3-D leaf with a matrix view), a vector, a small matrix and a scalar.
SHAPES = {"wq": (24, 16), "wo": (16, 24), "x3": (12, 2, 10), "b": (16,), "small": (3, 5), "gain": ()}
AXES = {"wq": None, "wo": None, "x3": MatrixAxes(0, (1, 2)), "b": None, "small": None, "gain": None}
GALORE = dict(rank=4, update_proj_gap=1, matrix_axes=AXES)

OPTIMIZERS = {
    "scale_by_galore": lambda: scale_by_galore(**GALORE),
    "scale_by_galore_adaptive": lambda: scale_by_galore(
        **GALORE, svd="randomized", lazy_threshold=0.5, reproject_moments=True, align_signs=True),
    "galore_adamw": lambda: galore_adamw(1e-2, **GALORE, weight_decay=0.1),
    "galore_adamw_8bit": lambda: galore_adamw_8bit(1e-2, **GALORE, block_size=32, min_size=16),
    "galore_adafactor": lambda: galore_adafactor(1e-2, **GALORE, momentum=0.9, min_dim_size_to_factor=8),
    "scale_by_adam_8bit": lambda: scale_by_adam_8bit(block_size=32, min_size=16),
    "inject_hyperparams(galore_adamw)": lambda: optax.inject_hyperparams(
        galore_adamw, static_args=("matrix_axes",))(learning_rate=1e-2, **GALORE),
}


def make_params():
    rng = np.random.default_rng(0)
    return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}


def grads_at(step):
    rng = np.random.default_rng(100 + step)
    return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}


def shared_buffers(tree):
    """{buffer address: paths} for every buffer that more than one leaf of `tree` uses."""
    paths = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        paths.setdefault(leaf.unsafe_buffer_pointer(), []).append(jax.tree_util.keystr(path))
    return {ptr: where for ptr, where in paths.items() if len(where) > 1}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_eager_init_leaves_have_distinct_buffers(name):
    params = make_params()
    state = OPTIMIZERS[name]().init(params)
    assert len(jax.tree.leaves(state)) > 3
    assert shared_buffers((params, state)) == {}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_eager_init_then_donated_jitted_steps(name):
    tx = OPTIMIZERS[name]()
    params = make_params()
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    donated = jax.jit(step, donate_argnums=(0, 1))
    reference = jax.jit(step)
    expected_params, expected_state = make_params(), tx.init(make_params())
    for i in range(2):
        params, state = donated(params, state, grads_at(i))
        expected_params, expected_state = reference(expected_params, expected_state, grads_at(i))
    jax.tree.map(np.testing.assert_array_equal, (params, state), (expected_params, expected_state))
