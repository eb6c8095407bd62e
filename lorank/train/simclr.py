"""Contrastive self-supervised learning for the generic loop: SimCLR with any loss of `lorank.contrastive`
(the L_{phi,psi} family, alpha-CL) and DirectCLR.

The network is backbone -> projector (`ssl.Encoder`; projector "mlp2", "linear" or "none"). On two
augmented views v1, v2 of each image (`lorank.data.augment`, one key per example from the step's
key) the loss is `contrastive.contrastive_loss(loss, z1, z2, **hyper)` of the projections, or, for
DirectCLR (`directclr_dim` = d0 > 0, no projector), InfoNCE on the first d0 backbone features. The
loss sees the whole global batch: under a data-parallel mesh the jitted step computes it on the
global arrays, so every anchor's negatives come from all devices, and BatchNorm statistics are
those of the global batch too.

Parameters: the encoder's; non-gradient state ("extra"): {"stats": its BatchNorm statistics}.
Logged each step: the loss and the collapse metrics of the projections of view 1 (`ssl.collapse_metrics`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lorank import checks, contrastive
from lorank.data import augment as augment_lib
from lorank.models import heads
from lorank.train import loop as loop_lib
from lorank.train import probe, ssl


@dataclasses.dataclass(frozen=True)
class SimCLRConfig:
    """What a contrastive run optimizes; checked on construction (ValueError naming the bad field)."""

    loss: str = "infonce"  # a name of contrastive.LOSS_NAMES
    tau: float | None = None  # temperature (None: the loss's default, lorank.contrastive.hyper)
    eps: float | None = None  # InfoNCE's eps, a margin, or the alpha rows' mass parameter
    p: float | None = None  # alpha-CL-direct exponent, > 1
    gamma: float | None = None  # alpha-CL-r_gamma exponent, > 1
    c: float | None = None  # Coria et al.'s sigmoid slope
    normalize: bool = True  # L2-normalize the embeddings
    negatives: str = "both_views"  # or "one_view"
    directclr_dim: int = 0  # > 0: DirectCLR, InfoNCE on the first d0 backbone features (needs projector "none")

    def __post_init__(self):
        contrastive.check_loss(self.loss, **self.hyper())
        checks.integer("directclr_dim", self.directclr_dim, minimum=0)
        if self.directclr_dim and self.loss != "infonce":
            raise ValueError(f"DirectCLR (directclr_dim={self.directclr_dim}) trains InfoNCE; got loss={self.loss!r}")

    def hyper(self) -> dict[str, Any]:
        return {"tau": self.tau, "eps": self.eps, "p": self.p, "gamma": self.gamma, "c": self.c,
                "normalize": self.normalize, "negatives": self.negatives}

    @classmethod
    def from_config(cls, section) -> "SimCLRConfig":
        return ssl.from_section(cls, section)


def check_model(encoder: ssl.Encoder, cfg: SimCLRConfig, image_shape: tuple[int, int, int]) -> None:
    """ValueError when the backbone cannot take images of `image_shape` (H, W, C) or DirectCLR does not fit."""
    encoder.backbone.check((2, *image_shape))
    if cfg.directclr_dim:
        if not isinstance(encoder.projector, heads.Identity):
            raise ValueError("DirectCLR trains without a projector: set model.projector='none'")
        width = encoder.backbone.feature_dim
        if cfg.directclr_dim > width:
            raise ValueError(f"directclr_dim={cfg.directclr_dim} exceeds the backbone's feature dimension {width}")


def loss_of_views(cfg: SimCLRConfig, features: tuple[jax.Array, jax.Array],
                  projections: tuple[jax.Array, jax.Array]) -> jax.Array:
    """The run's loss from the two views' backbone features and projections, each [N, .]."""
    if cfg.directclr_dim:
        return contrastive.directclr_loss(*features, d0=cfg.directclr_dim, **cfg.hyper())
    return contrastive.contrastive_loss(cfg.loss, *projections, **cfg.hyper())


def make_task(encoder: ssl.Encoder, cfg: SimCLRConfig, aug: augment_lib.SimCLRAugment,
              train_batch: Callable[[int, np.ndarray | None], dict], *, image_shape: tuple[int, int, int],
              evaluators: tuple = (), items_per_step: int = 0) -> loop_lib.Task:
    """The loop `Task` of a contrastive run.

    Args:
      encoder: backbone + projector (`ssl.build_encoder`).
      cfg: the loss.
      aug: the augmentation of both views.
      train_batch: (step, rows) -> {"images": float32 [R, H, W, C] in [0, 1]}.
      image_shape: (H, W, C) of the images.
    """
    check_model(encoder, cfg, image_shape)
    sample = jnp.zeros((2, *image_shape), jnp.float32)

    def init_params(key):
        return encoder.init(key, sample, train=False)["params"]

    def init_extra(key, boxed_params):
        del boxed_params
        return {"stats": encoder.init(key, sample, train=False).get("batch_stats", {})}

    def loss_fn(params, extra, batch, rng):
        v1, v2 = augment_lib.two_views(rng, batch["images"], aug)
        (h1, z1), stats = ssl._apply(encoder, params, extra["stats"], v1, True)
        (h2, z2), stats = ssl._apply(encoder, params, stats, v2, True)
        loss = loss_of_views(cfg, (h1, h2), (z1, z2))
        return loss, {"extra": {"stats": stats}, "metrics": ssl.collapse_metrics(jax.lax.stop_gradient(z1))}

    return loop_lib.Task(init_params=init_params, loss_fn=loss_fn, train_batch=train_batch, init_extra=init_extra,
                         evaluators=tuple(evaluators), items_per_step=items_per_step, item_name="images")


def embeddings_fn(encoder: ssl.Encoder) -> Callable[[Any, Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """(params, extra, images) -> (features [N, F], projections [N, d]) in evaluation mode."""

    def embed(params, extra, images):
        variables = {"params": params, **({"batch_stats": extra["stats"]} if extra["stats"] else {})}
        return encoder.apply(variables, images, train=False)

    return embed


def features_fn(encoder: ssl.Encoder) -> Callable[[Any, Any, jax.Array], jax.Array]:
    """(params, extra, images) -> backbone features [N, F] (the representation probes see)."""
    embed = embeddings_fn(encoder)
    return lambda params, extra, images: embed(params, extra, images)[0]


def spectrum_evaluator(encoder: ssl.Encoder, images: np.ndarray, every: int, *, batch_size: int = 256,
                       keep: dict | None = None) -> loop_lib.Evaluator:
    """Singular values of the embeddings of `images` [M, H, W, C] every `every` steps (dimensional collapse).

    Logs "spectrum/feature_erank" and, with a projector, "spectrum/projection_erank": the effective
    ranks (`probe.effective_rank`) of the spectra (`probe.embedding_spectrum`: rows normalized, then
    centred) of the backbone features and of the projections. The spectra ({"feature": [K],
    "projection": [K']}) go into `keep[step]` when a dict is given.
    """
    checks.integer("every", every, minimum=1)
    names = ("feature", "projection") if not isinstance(encoder.projector, heads.Identity) else ("feature",)

    def make(mesh):
        embed = probe.state_features(mesh, embeddings_fn(encoder), batch_size)

        def evaluate(state):
            spectra = {name: np.asarray(probe.embedding_spectrum(emb))
                       for name, emb in zip(names, embed(state, images))}
            if keep is not None:
                keep[int(jax.device_get(state.step))] = spectra
            return {f"spectrum/{name}_erank": float(probe.effective_rank(s)) for name, s in spectra.items()}

        return evaluate

    return loop_lib.Evaluator(every, make)
