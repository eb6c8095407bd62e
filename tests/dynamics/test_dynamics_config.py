"""configs/dynamics.py: every variant and its smoke twin build; unknown names are rejected."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from configs import dynamics  # noqa: E402


@pytest.mark.parametrize("name", sorted(dynamics.VARIANTS))
def test_variants_build_and_smoke_is_smaller(name):
    full, smoke = dynamics.get_config(name), dynamics.get_config(f"{name}_smoke")
    assert full.variant == name and smoke.variant == f"{name}_smoke"
    assert set(full.keys()) == set(smoke.keys())
    sizes = [k for k in ("steps", "num_seeds", "max_nodes", "num_ics", "num_samples")
             if k in full]
    assert sizes and all(smoke[k] <= full[k] for k in sizes)


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown config variant 'linear'"):
        dynamics.get_config("linear")
