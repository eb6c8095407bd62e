"""DirectCLR (Jing, Vincent, LeCun and Tian, ICLR 2022): InfoNCE on a sub-vector of the representation.

No projector: the loss sees only the first d0 dimensions of the backbone representation r, and the
gradient reaches the rest of r only through the backbone's shared weights. The representation
evaluated downstream is the whole r.
"""

from __future__ import annotations

from typing import Any

import jax

from lorank import checks
from lorank.contrastive import family


def directclr_loss(h1: jax.Array, h2: jax.Array, *, d0: int, **hyper: Any) -> jax.Array:
    """InfoNCE (`family.family_loss("infonce")`) on the first d0 columns of the representations.

    Args:
      h1, h2: [N, F] backbone representations of the two views.
      d0: the sub-vector's size, 1 <= d0 <= F.
      **hyper: InfoNCE's (tau, eps, normalize, negatives).

    Returns:
      [] the loss.
    """
    width = h1.shape[-1] if getattr(h1, "ndim", 0) == 2 else None
    checks.integer("d0", d0, minimum=1, maximum=width)
    return family.family_loss("infonce", h1[:, :d0], h2[:, :d0], **hyper)
