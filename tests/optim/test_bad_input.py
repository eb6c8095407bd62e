"""Every lorank optimizer rejects the same bad hyperparameter with the same message, and lets tracers through."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lorank.optim import (PROJ_TYPES, SVD_METHODS, galore_adafactor, galore_adamw, galore_adamw_8bit,
                          scale_by_adam_8bit, scale_by_galore)

GALORE = (scale_by_galore, galore_adamw, galore_adamw_8bit, galore_adafactor)
WITH_LR = (galore_adamw, galore_adamw_8bit, galore_adafactor)
ADAM = (scale_by_adam_8bit, galore_adamw, galore_adamw_8bit)
EIGHT_BIT = (scale_by_adam_8bit, galore_adamw_8bit)


def required(factory):
    """Values for the arguments `factory` has no default for."""
    if factory is scale_by_adam_8bit:
        return {}
    return {"rank": 4} if factory is scale_by_galore else {"learning_rate": 1e-3, "rank": 4}


def build(factory, **kwargs):
    return factory(**(required(factory) | kwargs))


def cases(factories, rows):
    return [pytest.param(f, kwargs, message, id=f"{f.__name__}-{message}") for f in factories
            for kwargs, message in rows]


ADAM_ROWS = [
    (dict(b1=None), "b1 must be a number in [0, 1), got None"),
    (dict(b1=1.0), "b1 must be a number in [0, 1), got 1.0"),
    (dict(b1=True), "b1 must be a number in [0, 1), got True"),
    (dict(b1="0.9"), "b1 must be a number in [0, 1), got '0.9'"),
    (dict(b2=1.0), "b2 must be a number in [0, 1), got 1.0"),
    (dict(b2=-0.1), "b2 must be a number in [0, 1), got -0.1"),
    (dict(b2=None), "b2 must be a number in [0, 1), got None"),
    (dict(eps=-1e-8), "eps must be a finite number >= 0, got -1e-08"),
    (dict(eps=None), "eps must be a finite number >= 0, got None"),
    (dict(eps=float("inf")), "eps must be a finite number >= 0, got inf"),
]
GALORE_ROWS = [
    (dict(rank=4.0), "rank must be an integer >= 1, got 4.0"),
    (dict(rank=2.5), "rank must be an integer >= 1, got 2.5"),
    (dict(rank=0), "rank must be an integer >= 1, got 0"),
    (dict(rank=None), "rank must be an integer >= 1, got None"),
    (dict(rank=True), "rank must be an integer >= 1, got True"),
    (dict(rank="8"), "rank must be an integer >= 1, got '8'"),
    (dict(update_proj_gap=0), "update_proj_gap must be an integer >= 1, got 0"),
    (dict(update_proj_gap=2.5), "update_proj_gap must be an integer >= 1, got 2.5"),
    (dict(scale=None), "scale must be a finite number, got None"),
    (dict(scale=float("nan")), "scale must be a finite number, got nan"),
    (dict(proj_type="diagonal"), f"proj_type must be one of {PROJ_TYPES}, got 'diagonal'"),
    (dict(svd="lanczos"), f"svd must be one of {SVD_METHODS}, got 'lanczos'"),
    (dict(oversample=-1), "oversample must be an integer >= 0, got -1"),
    (dict(oversample=2.0), "oversample must be an integer >= 0, got 2.0"),
    (dict(power_iters=-1), "power_iters must be an integer >= 0, got -1"),
    (dict(seed=-1), "seed must be an integer >= 0, got -1"),
    (dict(seed=0.5), "seed must be an integer >= 0, got 0.5"),
    (dict(lazy_threshold=0.0), "lazy_threshold must be a number in (0, 1], got 0.0"),
    (dict(lazy_threshold=1.5), "lazy_threshold must be a number in (0, 1], got 1.5"),
    (dict(lazy_patience=0), "lazy_patience must be an integer >= 1, got 0"),
    (dict(update_proj_gap=10, max_update_proj_gap=5), "max_update_proj_gap must be an integer >= 10, got 5"),
]
LR_ROWS = [
    (dict(learning_rate=None), "learning_rate must be a finite number, got None"),
    (dict(learning_rate="1e-3"), "learning_rate must be a finite number, got '1e-3'"),
    (dict(weight_decay=-1e-4), "weight_decay must be a finite number >= 0, got -0.0001"),
    (dict(weight_decay=None), "weight_decay must be a finite number >= 0, got None"),
]
EIGHT_BIT_ROWS = [
    (dict(block_size=0), "block_size must be an integer >= 1, got 0"),
    (dict(block_size=32.0), "block_size must be an integer >= 1, got 32.0"),
    (dict(min_size=-1), "min_size must be an integer >= 0, got -1"),
]
ADAFACTOR_ROWS = [
    (dict(decay_rate=1.5), "decay_rate must be a number in [0, 1], got 1.5"),
    (dict(decay_rate=None), "decay_rate must be a number in [0, 1], got None"),
    (dict(momentum=1.0), "momentum must be a number in [0, 1), got 1.0"),
    (dict(clipping_threshold=-1.0), "clipping_threshold must be a finite number >= 0, got -1.0"),
    (dict(eps=-1.0), "eps must be a finite number >= 0, got -1.0"),
]


@pytest.mark.parametrize("factory, kwargs, message",
                         cases(ADAM, ADAM_ROWS) + cases(GALORE, GALORE_ROWS) + cases(WITH_LR, LR_ROWS)
                         + cases(EIGHT_BIT, EIGHT_BIT_ROWS) + cases([galore_adafactor], ADAFACTOR_ROWS))
def test_bad_hyperparameter_raises_the_same_message_everywhere(factory, kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        build(factory, **kwargs)


@pytest.mark.parametrize("factory", GALORE)
def test_non_bool_mask_leaf_raises_at_init(factory):
    params = {"w": jnp.zeros((12, 10)), "b": jnp.zeros((10,))}
    tx = build(factory, galore_mask={"w": 1, "b": False})
    with pytest.raises(ValueError, match=re.escape("galore_mask leaf at w must be a Python bool, got 1")):
        tx.init(params)


@pytest.mark.parametrize("factory", GALORE + (scale_by_adam_8bit,))
def test_traced_hyperparameters_pass_the_checks(factory):
    """Under inject_hyperparams and jit, rank, gap, betas, eps and scale reach the factory as tracers."""
    static = {scale_by_adam_8bit: ("block_size", "min_size"), galore_adamw_8bit: ("block_size", "min_size"),
              galore_adafactor: ("min_dim_size_to_factor",)}.get(factory, ())
    extra = dict(block_size=32, min_size=16) if factory in EIGHT_BIT else {}
    tx = optax.inject_hyperparams(factory, static_args=static)(**required(factory), **extra)
    params = {"w": jnp.ones((12, 10)), "b": jnp.ones((10,))}
    grads = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(0).normal(size=p.shape), p.dtype), params)
    state = tx.init(params)
    injected = {"b1", "b2", "eps"} if factory in ADAM else {"rank", "update_proj_gap", "scale"}
    assert injected <= set(state.hyperparams)
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert all(bool(jnp.all(jnp.isfinite(u))) and float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("factory", GALORE + (scale_by_adam_8bit,))
def test_bfloat16_hyperparameters_pass_the_checks(factory):
    """inject_hyperparams makes float hyperparameters arrays of the params' dtype: bfloat16 ones are numbers.

    (b2=0.999 rounds to 1.0 in bfloat16, which the check rightly refuses; 0.99 stays below 1.)
    """
    static = ("block_size", "min_size") if factory in EIGHT_BIT else ()
    b2 = {"b2": 0.99} if factory in ADAM else {}
    tx = optax.inject_hyperparams(factory, static_args=static)(**required(factory), **b2)
    state = tx.init({"w": jnp.ones((12, 10), jnp.bfloat16)})
    assert {h.dtype for k, h in state.hyperparams.items() if k in ("b1", "scale", "eps")} == {jnp.dtype(jnp.bfloat16)}
