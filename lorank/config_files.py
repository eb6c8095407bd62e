"""Config files by path: `get_config(variant)` of a Python file, as `--config FILE:VARIANT` loads it.

    load("configs/llama.py:tiny")          # or load("configs/llama.py", "tiny")
    load_module("configs/memory.py").SMOKE_VARIANTS

A relative path is looked up in the working directory, then in the repository
(the folder holding the `lorank` package). Only the standard library and
ml_collections are imported here, so config files may use it to build on each
other.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from types import ModuleType

from ml_collections import ConfigDict

REPO = pathlib.Path(__file__).resolve().parents[1]


def resolve(path: str | os.PathLike) -> pathlib.Path:
    """The config file `path`: absolute, or relative to the working directory or the repository.

    Raises:
      FileNotFoundError: no such file (the places looked in are named).
    """
    path = pathlib.Path(path).expanduser()
    candidates = [path] if path.is_absolute() else [pathlib.Path.cwd() / path, REPO / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"config file {path} not found (looked for {', '.join(map(str, candidates))})")


def load_module(path: str | os.PathLike) -> ModuleType:
    """The config file at `path` as a module (its `get_config`, `SMOKE_VARIANTS`, constants)."""
    file = resolve(path)
    spec = importlib.util.spec_from_file_location(f"lorank_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smoke_variant(arg: str, variants) -> tuple[str, bool]:
    """(NAME, smoke) of a config variant spelled `NAME` or `NAME_smoke` for NAME in `variants`.

    Raises:
      ValueError: any other spelling (the choices are listed).
    """
    smoke = arg.endswith("_smoke")
    name = arg[: -len("_smoke")] if smoke else arg
    if name not in variants:
        choices = sorted(variants) + sorted(f"{v}_smoke" for v in variants)
        raise ValueError(f"unknown config variant {arg!r}; choose one of {choices}")
    return name, smoke


def load(spec: str | os.PathLike, variant: str | None = None) -> ConfigDict:
    """`get_config(variant)` of a config file; `spec` is "FILE:VARIANT" or a path with `variant` given
    (neither: the file's default variant)."""
    path = os.fspath(spec)
    if variant is None and ":" in path:
        path, variant = path.rsplit(":", 1)
    module = load_module(path)
    return module.get_config() if variant is None else module.get_config(variant)
