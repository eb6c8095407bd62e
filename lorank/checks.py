"""Argument checks: validate one named argument before any compute.

Each check takes the argument's name and value and either returns the value in
a canonical form or raises `ValueError(f"{name} must be ..., got {value!r}")`.

Numbers are Python or NumPy reals, or 0-d arrays of a real dtype; None,
strings, bools and arrays with more than one value are not numbers. A value
may be a tracer: `optax.inject_hyperparams` passes its state's hyperparameters
to the factory inside a jitted update, and a factory may be called under
`jax.jit` or `jax.eval_shape`. Checks of values that only enter the computation
(`concrete`, `number`, `integer_or_traced`) then skip the check and return None.
Values that fix shapes or Python control flow (`integer`, `boolean`, `one_of`)
must be concrete and reject a tracer.

Only the standard library, NumPy and JAX (for tracer detection) are used, so
any lorank package may import this module.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_STATIC_HINT = "a concrete value (it fixes shapes: under optax.inject_hyperparams give it in static_args)"


def is_traced(value: Any) -> bool:
    """True when `value` is a JAX tracer (inside jit, eval_shape, grad, vmap, ...)."""
    return isinstance(value, jax.core.Tracer)


def _kind(value: Any) -> Optional[str]:
    """'bool', 'int' or 'real' for a concrete scalar (Python, NumPy, or a 0-d array), else None."""
    if isinstance(value, (str, bytes)) or value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, (float, np.floating)):
        return "real"
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None or tuple(shape) != ():
        return None
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return "bool"
    if jnp.issubdtype(dtype, jnp.integer):
        return "int"
    if jnp.issubdtype(dtype, jnp.floating):  # bfloat16 and the other ml_dtypes floats included
        return "real"
    return None


def _fmt(bound: Any) -> str:
    return str(bound) if isinstance(bound, (int, np.integer)) else f"{bound:g}"


def _bounds(low: Any, high: Any, low_open: bool = False, high_open: bool = False) -> str:
    """' in [0, 1)', ' >= 1', ' < 2' or '' for the given bounds."""
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {_fmt(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {_fmt(high)}"
    return ""


def _inside(v: float, low: Any, high: Any, low_open: bool, high_open: bool) -> bool:
    above = low is None or (v > low if low_open else v >= low)
    below = high is None or (v < high if high_open else v <= high)
    return above and below


def concrete(name: str, value: Any) -> Optional[float]:
    """float(value) for a number; None when `value` is traced.

    Raises:
      ValueError: `value` is not a number (None, a string, a bool, an array of shape != ()).
    """
    if is_traced(value):
        return None
    if _kind(value) not in ("int", "real"):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def number(name: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None,
           low_open: bool = False, high_open: bool = False, finite: bool = True) -> Optional[float]:
    """float(value) for a number inside the given interval; None when `value` is traced.

    `low`/`high` bound the value (None: unbounded on that side), closed unless
    `low_open`/`high_open`. `finite` rejects +-inf. NaN is always rejected.

    Raises:
      ValueError: `value` is not a number, not finite (when `finite`), or outside
        the interval, e.g. "b1 must be a number in [0, 1), got 1.0".
    """
    if is_traced(value):
        return None
    bounded = low is not None and high is not None
    requirement = ("a finite number" if finite and not bounded else "a number") + _bounds(
        low, high, low_open, high_open)
    if _kind(value) not in ("int", "real"):
        raise ValueError(f"{name} must be {requirement}, got {value!r}")
    v = float(value)
    if math.isnan(v) or (finite and math.isinf(v)) or not _inside(v, low, high, low_open, high_open):
        raise ValueError(f"{name} must be {requirement}, got {value!r}")
    return v


def _check_integer(name: str, value: Any, minimum: Optional[int], maximum: Optional[int]) -> int:
    requirement = "an integer" + _bounds(minimum, maximum)
    if _kind(value) != "int":
        raise ValueError(f"{name} must be {requirement}, got {value!r}")
    v = int(value)
    if not _inside(v, minimum, maximum, False, False):
        raise ValueError(f"{name} must be {requirement}, got {value!r}")
    return v


def integer(name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """int(value) for a Python or NumPy integer in [minimum, maximum] (None: unbounded).

    For values that fix shapes or loop counts: arrays and tracers are rejected.

    Raises:
      ValueError: `value` is not a Python/NumPy integer (bools, floats, arrays,
        tracers included) or lies outside the bounds.
    """
    if is_traced(value):
        raise ValueError(f"{name} must be {_STATIC_HINT}, got {value!r}")
    if not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer{_bounds(minimum, maximum)}, got {value!r}")
    return _check_integer(name, value, minimum, maximum)


def integer_or_traced(name: str, value: Any, minimum: Optional[int] = None,
                      maximum: Optional[int] = None) -> Optional[int]:
    """int(value) for an integer in [minimum, maximum]; None when `value` is traced.

    Besides Python and NumPy integers, a 0-d array of an integer dtype is accepted
    (what `optax.inject_hyperparams` makes of an int hyperparameter).

    Raises:
      ValueError: `value` is not an integer (bools and floats included) or lies outside the bounds.
    """
    if is_traced(value):
        return None
    return _check_integer(name, value, minimum, maximum)


def boolean(name: str, value: Any) -> bool:
    """bool(value) for a Python or NumPy bool or a concrete 0-d bool array.

    Raises:
      ValueError: anything else (ints, None, tracers included).
    """
    if is_traced(value) or _kind(value) != "bool":
        raise ValueError(f"{name} must be a Python bool, got {value!r}")
    return bool(value)


def one_of(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """`value` itself when it equals one of `choices` and is of its type (a bool never matches an int).

    Raises:
      ValueError: e.g. "proj_type must be one of ('std', 'left'), got 'diagonal'".
    """
    if not any(isinstance(value, type(c)) and isinstance(value, bool) == isinstance(c, bool) and value == c
               for c in choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
