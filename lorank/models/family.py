"""What a model family tells the generic layers, so that train/ and optim/ never name a model.

A `ModelFamily` says how its parameters are laid out on a mesh (logical-axis
rules), which kernels GaLore projects (and LoRA and the low-rank baseline
factor), how >2-D kernels are viewed as matrices, which kind of layer each
parameter belongs to (for per-kind statistics such as gradient stable rank),
and, where the family supports it, the stages the per-layer update walks.
`lorank.models.llama.FAMILY` is the LLaMA family; a ResNet or a one-layer
attention model describes itself the same way and trains through the same
optimizer builder, per-layer step, gradient-rank probe and mesh rules.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from lorank.optim import labels


@dataclasses.dataclass(frozen=True)
class Stage:
    """One group of the per-layer update: the top-level parameter keys it owns and its forward pass.

    apply(group_params, x, batch) -> the stage's output: `group_params` is {key: params[key]}
    for `keys`, `x` the previous stage's output (None for the first stage), `batch` the step's
    micro-batch. The last stage returns the scalar loss.
    """

    keys: tuple[str, ...]
    apply: Callable[[dict, Any, Any], Any]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """A model family's description.

    Attributes:
      name: the family's name.
      axis_rules: (logical axis, mesh axes) pairs for the parameters' logical axes
        (`lorank.train.mesh.logical_shardings` adds the batch rule).
      projected: regular expression over parameter paths ('a/b/kernel') of the matrices GaLore
        projects and LoRA / the low-rank baseline factor.
      layer_kind: parameter path (a tuple of key strings) -> the kind of layer it belongs to,
        or None for parameters outside every kind (norm scales).
      matrix_axes: `lorank.optim.MatrixAxes` (a pytree, or a callable on params) of projected
        kernels with more than two axes; None when every projected kernel is a matrix.
      stages: (model config, inputs_of, loss_of) -> the per-layer update's stages in forward
        order (`Stage`); `inputs_of(batch)` is the first stage's input, `loss_of(output, batch)`
        the loss of the last stage's output. None: the family has no per-layer step.
    """

    name: str
    axis_rules: tuple
    projected: str
    layer_kind: Callable[[tuple[str, ...]], str | None]
    matrix_axes: Any = None
    stages: Callable[..., list[Stage]] | None = None

    def galore_mask(self, params: Any) -> Any:
        """True at the projected kernels of `params` (unboxed, or under further keys), else False."""
        return labels.mask_by_path(params, self.projected)
