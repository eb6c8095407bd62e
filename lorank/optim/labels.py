"""Which parameters get which optimizer treatment, decided by their tree paths.

Masks here are pytrees of Python bools with the params' structure, the form
`optax.masked`, `optax.add_decayed_weights` and `scale_by_galore(galore_mask=...)`
take; labels are strings for `optax.multi_transform`. Pass unboxed parameters
(`flax.linen.meta.unbox`), whose paths are the module paths. Which paths a
model family projects is the family's business (`lorank.models.family`).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax


def path_str(path: Sequence[Any]) -> str:
    """'layers_0/attn/q_proj/kernel' for a jax key path (dict keys, attributes, indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def mask_by_path(params: Any, pattern: str) -> Any:
    """True at leaves whose path string fully matches the regular expression `pattern`.

    Args:
      params: any pytree (arrays or jax.ShapeDtypeStruct leaves).
      pattern: a regex matched against 'a/b/c' paths with re.fullmatch.
    Returns:
      A pytree of Python bools with the structure of `params`.
    """
    regex = re.compile(pattern)
    return jax.tree_util.tree_map_with_path(lambda path, _: regex.fullmatch(path_str(path)) is not None,
                                            params)


def label_by_path(params: Any, rules: Sequence[tuple[str, str]], default: str) -> Any:
    """The label of the first (pattern, label) rule whose regex fully matches each leaf's path, else `default`."""
    compiled = [(re.compile(p), label) for p, label in rules]

    def label(path, _):
        s = path_str(path)
        return next((lab for regex, lab in compiled if regex.fullmatch(s)), default)

    return jax.tree_util.tree_map_with_path(label, params)
