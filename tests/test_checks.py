"""lorank.checks: what each check accepts, what it rejects and with which message, traced values."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorank import checks


def raises_naming(name, value, requirement):
    """pytest.raises for the message f"{name} must be {requirement}, got {value!r}"."""
    return pytest.raises(ValueError, match="^" + re.escape(f"{name} must be {requirement}, got {value!r}") + "$")


def traced(check, *args, **kwargs):
    """What `check` returns when its value (the second argument) is a tracer under jax.jit."""
    out = []

    @jax.jit
    def f(x):
        out.append(check(args[0], x, *args[1:], **kwargs))
        return x

    f(jnp.asarray(0.5))
    return out[0]


# --------------------------------------------------------------------------- is_traced


def test_is_traced_only_inside_transformations():
    seen = []
    jax.jit(lambda x: seen.append(checks.is_traced(x)) or x)(jnp.ones(()))
    jax.eval_shape(lambda x: seen.append(checks.is_traced(x)) or x, jnp.ones(()))
    assert seen == [True, True]
    assert not checks.is_traced(jnp.ones(())) and not checks.is_traced(1.0)


# --------------------------------------------------------------------------- concrete


@pytest.mark.parametrize("value, expected", [
    (3, 3.0), (0.25, 0.25), (np.float32(0.5), 0.5), (np.int64(7), 7.0), (jnp.asarray(2.5), 2.5),
    (np.asarray(4), 4.0), (float("inf"), float("inf")), (jnp.asarray(0.5, jnp.bfloat16), 0.5),
    (np.float16(0.25), 0.25),
])
def test_concrete_accepts_numbers(value, expected):
    v = checks.concrete("x", value)
    assert v == expected and type(v) is float


@pytest.mark.parametrize("value", [None, "0.1", b"1", True, np.bool_(False), jnp.asarray(True),
                                   np.ones(2), jnp.zeros((1,)), [0.1], 1j])
def test_concrete_rejects_non_numbers(value):
    with raises_naming("lr", value, "a number"):
        checks.concrete("lr", value)


def test_concrete_is_none_when_traced():
    assert traced(checks.concrete, "lr") is None


# --------------------------------------------------------------------------- number


@pytest.mark.parametrize("value, kwargs", [
    (0.0, dict(low=0, high=1, high_open=True)),
    (0.999, dict(low=0, high=1, high_open=True)),
    (1.0, dict(low=0, high=1)),
    (1e-30, dict(low=0, low_open=True)),
    (-5, dict()),
    (float("inf"), dict(low=0, finite=False)),
    (jnp.asarray(0.9, jnp.float32), dict(low=0, high=1, high_open=True)),
    (jnp.asarray(0.9, jnp.bfloat16), dict(low=0, high=1, high_open=True)),  # inject_hyperparams on bf16 params
])
def test_number_accepts_inside_the_interval(value, kwargs):
    assert checks.number("x", value, **kwargs) == float(value)


@pytest.mark.parametrize("value, kwargs, requirement", [
    (1.0, dict(low=0, high=1, high_open=True), "a number in [0, 1)"),
    (-0.1, dict(low=0, high=1, high_open=True), "a number in [0, 1)"),
    (0.0, dict(low=0, high=1, low_open=True), "a number in (0, 1]"),
    (-1e-8, dict(low=0), "a finite number >= 0"),
    (0, dict(low=0, low_open=True), "a finite number > 0"),
    (2.0, dict(high=1), "a finite number <= 1"),
    (1.0, dict(high=1, high_open=True), "a finite number < 1"),
    (float("nan"), dict(), "a finite number"),
    (float("inf"), dict(), "a finite number"),
    (float("inf"), dict(low=0, high=1e3), "a number in [0, 1000]"),
    (float("nan"), dict(finite=False), "a number"),
    (None, dict(low=0, high=1, high_open=True), "a number in [0, 1)"),
    ("0.9", dict(low=0, high=1, high_open=True), "a number in [0, 1)"),
    (True, dict(), "a finite number"),
    (np.zeros(3), dict(low=0), "a finite number >= 0"),
])
def test_number_rejects_naming_name_and_value(value, kwargs, requirement):
    with raises_naming("b1", value, requirement):
        checks.number("b1", value, **kwargs)


def test_number_is_none_when_traced():
    assert traced(checks.number, "b1", low=0, high=1, high_open=True) is None
    assert traced(checks.number, "b1", low=2.0) is None  # the check is skipped, not evaluated


# --------------------------------------------------------------------------- integer


@pytest.mark.parametrize("value, kwargs", [
    (0, dict()), (5, dict(minimum=1)), (np.int32(3), dict(minimum=0, maximum=3)), (-2, dict(maximum=-2)),
])
def test_integer_accepts_python_and_numpy_ints(value, kwargs):
    v = checks.integer("n", value, **kwargs)
    assert v == value and type(v) is int


@pytest.mark.parametrize("value, kwargs, requirement", [
    (0, dict(minimum=1), "an integer >= 1"),
    (4, dict(minimum=0, maximum=3), "an integer in [0, 3]"),
    (7, dict(maximum=6), "an integer <= 6"),
    (2.0, dict(minimum=1), "an integer >= 1"),
    (True, dict(minimum=0), "an integer >= 0"),
    (np.bool_(True), dict(), "an integer"),
    (None, dict(minimum=1), "an integer >= 1"),
    ("8", dict(), "an integer"),
    (jnp.asarray(8), dict(), "an integer"),
    (np.asarray(8), dict(), "an integer"),
])
def test_integer_rejects_naming_name_and_value(value, kwargs, requirement):
    with raises_naming("block_size", value, requirement):
        checks.integer("block_size", value, **kwargs)


def test_integer_rejects_traced_values():
    with pytest.raises(ValueError, match=r"^oversample must be a concrete value .*static_args.*, got \w*Tracer"):
        traced(checks.integer, "oversample", minimum=0)


# --------------------------------------------------------------------------- integer_or_traced


@pytest.mark.parametrize("value", [4, np.int64(4), jnp.asarray(4), np.asarray(4, np.int16), jnp.asarray(4, jnp.uint8)])
def test_integer_or_traced_accepts_ints_and_integer_arrays(value):
    v = checks.integer_or_traced("rank", value, minimum=1)
    assert v == 4 and type(v) is int


@pytest.mark.parametrize("value, kwargs, requirement", [
    (0, dict(minimum=1), "an integer >= 1"),
    (2.5, dict(minimum=1), "an integer >= 1"),
    (4.0, dict(minimum=1), "an integer >= 1"),
    (jnp.asarray(4.0), dict(minimum=1), "an integer >= 1"),
    (False, dict(minimum=0), "an integer >= 0"),
    (None, dict(minimum=1), "an integer >= 1"),
    ("8", dict(minimum=1), "an integer >= 1"),
    (jnp.asarray([4, 4]), dict(), "an integer"),
    (12, dict(minimum=1, maximum=10), "an integer in [1, 10]"),
])
def test_integer_or_traced_rejects_naming_name_and_value(value, kwargs, requirement):
    with raises_naming("rank", value, requirement):
        checks.integer_or_traced("rank", value, **kwargs)


def test_integer_or_traced_is_none_when_traced():
    assert traced(checks.integer_or_traced, "rank", minimum=1) is None


# --------------------------------------------------------------------------- boolean


@pytest.mark.parametrize("value", [True, False, np.bool_(True), jnp.asarray(False), np.asarray(True)])
def test_boolean_accepts_bools(value):
    v = checks.boolean("mask", value)
    assert v is bool(value)


@pytest.mark.parametrize("value", [1, 0, None, "True", jnp.asarray([True]), jnp.asarray(1)])
def test_boolean_rejects_naming_name_and_value(value):
    with raises_naming("mask", value, "a Python bool"):
        checks.boolean("mask", value)


def test_boolean_rejects_traced_values():
    with pytest.raises(ValueError, match=r"^mask must be a Python bool, got \w*Tracer"):
        jax.jit(lambda x: checks.boolean("mask", x) or x)(jnp.asarray(True))


# --------------------------------------------------------------------------- one_of


def test_one_of_accepts_a_choice():
    assert checks.one_of("svd", "exact", ("exact", "randomized")) == "exact"
    assert checks.one_of("k", 2, [1, 2]) == 2


@pytest.mark.parametrize("value, choices", [
    ("lanczos", ("exact", "randomized")), (None, ("exact",)), (True, (1, 2)), (1, ("1",)),
    (np.asarray(1), (1, 2)),
])
def test_one_of_rejects_naming_name_value_and_choices(value, choices):
    with raises_naming("svd", value, f"one of {tuple(choices)}"):
        checks.one_of("svd", value, choices)
