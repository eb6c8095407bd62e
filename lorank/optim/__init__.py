"""Optimizers: GaLore gradient low-rank projection, blockwise 8-bit states, parameter labels, state shardings.

Modules: `galore` (scale_by_galore and its state), `galore_optimizers` (galore_adamw,
galore_adamw_8bit, galore_adafactor), `projection` (matrix views, placements, projections),
`svd` (top singular vectors, sign conventions), `quantize` (8-bit states, scale_by_adam_8bit),
`sharding` (shardings of optimizer and other states), `inspection` (GaLore states and metrics),
`labels` (masks and labels by parameter path).

The quantizer itself is `lorank.optim.quantize.quantize` / `.dequantize` (module, not re-exported).
"""

from lorank.optim.galore import ProjectorState, ScaleByGaloreState, scale_by_galore
from lorank.optim.galore_optimizers import galore_adafactor, galore_adamw, galore_adamw_8bit
from lorank.optim.inspection import find_galore_states, galore_metrics
from lorank.optim.labels import label_by_path, mask_by_path, path_str
from lorank.optim.projection import PROJ_TYPES, MatrixAxes
from lorank.optim.quantize import (
    QuantizedArray,
    ScaleByAdam8bitState,
    dynamic_code_map,
    scale_by_adam_8bit,
    tree_nbytes,
)
from lorank.optim.sharding import optimizer_state_shardings, tree_shardings
from lorank.optim.svd import SVD_METHODS, canonical_signs, exact_top_singular, randomized_top_singular

__all__ = [
    "PROJ_TYPES", "SVD_METHODS", "MatrixAxes", "ProjectorState", "ScaleByGaloreState", "canonical_signs",
    "exact_top_singular", "find_galore_states", "galore_adafactor", "galore_adamw", "galore_adamw_8bit",
    "galore_metrics", "optimizer_state_shardings", "randomized_top_singular", "scale_by_galore",
    "tree_shardings",
    "label_by_path", "mask_by_path", "path_str",
    "QuantizedArray", "ScaleByAdam8bitState", "dynamic_code_map", "scale_by_adam_8bit", "tree_nbytes",
]
