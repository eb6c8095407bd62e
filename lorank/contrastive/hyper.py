"""Hyperparameters of the contrastive losses: names, defaults, checks.

Every loss of `lorank.contrastive` takes the same keywords; a loss ignores those it does not
use, and None means "this loss's default":

- tau: temperature, > 0 (InfoNCE, Soft Triplet, every alpha-CL weight). Default 0.5.
- eps: InfoNCE's phi = tau log(eps + x), >= 0 (default 1: the positive pair counted in the
  denominator, SimCLR's NT-Xent); the margins of Triplet ([x + eps]_+), Soft Triplet
  (e^{x/tau + eps}) and Lifted Structured (e^{x + eps}), any real (default 0.2 for Triplet
  and Soft Triplet, 1 for Lifted Structured, lorank's choices). For the alpha-CL weights it
  fixes each row's mass, xi_i / (eps + xi_i), >= 0 (default 0: mass 1).
- p: exponent of alpha-CL-direct, alpha_ij = exp(-d_ij^p / tau), > 1 (default 4).
- gamma: exponent of alpha-CL-r_gamma, > 1 (default 2).
- c: slope of Coria et al.'s sigmoid(c x), > 0 (default 1).
- normalize: L2-normalize the embeddings first (default True; d^2 = 1 - cos).
- negatives: "both_views" (default, 2N - 2 per anchor) or "one_view" (N - 1).
"""

from __future__ import annotations

from typing import Any

from lorank import checks
from lorank.contrastive.energy import NEGATIVES

KEYS = ("tau", "eps", "p", "gamma", "c", "normalize", "negatives")
COMMON = {"tau": 0.5, "p": 4.0, "gamma": 2.0, "c": 1.0, "normalize": True, "negatives": "both_views"}
EPS = {"infonce": 1.0, "triplet": 0.2, "soft_triplet": 0.2, "lifted": 1.0}  # per-loss eps defaults
ALPHA_EPS = 0.0  # the alpha-CL weights' mass parameter: mass 1
NONNEGATIVE_EPS = ("infonce",)  # losses where eps enters a log and must be >= 0


def resolve(name: str, hyper: dict[str, Any], *, alpha: bool = False) -> dict[str, Any]:
    """The full, checked hyperparameters of loss `name`: `hyper` with None filled by the defaults.

    Args:
      name: the loss (for the eps default and the error messages).
      hyper: keywords among KEYS.
      alpha: the alpha-CL weights (eps is their mass parameter, default 0, >= 0).

    Raises:
      ValueError: an unknown keyword, or a value out of range (named).
    """
    unknown = sorted(set(hyper) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} of loss {name!r}; expected some of {KEYS}")
    out = dict(COMMON)
    out["eps"] = ALPHA_EPS if alpha else EPS.get(name, 0.0)
    out.update({k: v for k, v in hyper.items() if v is not None})
    checks.number("tau", out["tau"], low=0.0, low_open=True)
    checks.number("p", out["p"], low=1.0, low_open=True)
    checks.number("gamma", out["gamma"], low=1.0, low_open=True)
    checks.number("c", out["c"], low=0.0, low_open=True)
    if alpha or name in NONNEGATIVE_EPS:
        checks.number("eps", out["eps"], low=0.0)
    else:
        checks.number("eps", out["eps"])
    checks.boolean("normalize", out["normalize"])
    checks.one_of("negatives", out["negatives"], NEGATIVES)
    return out
