"""Optimizers: GaLore gradient low-rank projection, blockwise 8-bit states, parameter labels.

The quantizer itself is `lorank.optim.quantize.quantize` / `.dequantize` (module, not re-exported).
"""

from lorank.optim.galore import (
    PROJ_TYPES,
    SVD_METHODS,
    MatrixAxes,
    ProjectorState,
    ScaleByGaloreState,
    canonical_signs,
    exact_top_singular,
    find_galore_states,
    galore_adafactor,
    galore_adamw,
    galore_adamw_8bit,
    galore_metrics,
    galore_state_shardings,
    randomized_top_singular,
    scale_by_galore,
)
from lorank.optim.labels import (
    label_by_path,
    llama_galore_labels,
    llama_galore_mask,
    mask_by_path,
    path_str,
)
from lorank.optim.quantize import (
    QuantizedArray,
    ScaleByAdam8bitState,
    dynamic_code_map,
    scale_by_adam_8bit,
    tree_nbytes,
)

__all__ = [
    "PROJ_TYPES", "SVD_METHODS", "MatrixAxes", "ProjectorState", "ScaleByGaloreState", "canonical_signs",
    "exact_top_singular", "find_galore_states", "galore_adafactor", "galore_adamw", "galore_adamw_8bit",
    "galore_metrics", "galore_state_shardings", "randomized_top_singular", "scale_by_galore",
    "label_by_path", "llama_galore_labels", "llama_galore_mask", "mask_by_path", "path_str",
    "QuantizedArray", "ScaleByAdam8bitState", "dynamic_code_map", "scale_by_adam_8bit", "tree_nbytes",
]
