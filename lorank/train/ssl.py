"""Non-contrastive self-supervised learning for the generic loop: BYOL, SimSiam, DirectPred, DirectCopy and
the collapsing variants (no predictor, no stop-gradient).

The online network is backbone -> projector -> predictor; the target is the online backbone and
projector, as an EMA copy (BYOL) or the online network itself (SimSiam). On two augmented views
v1, v2 of each image (`lorank.data.augment`, one key per example from the step's key)

    loss = (d(p1, t2) + d(p2, t1)) / 2,   d(p, t) = mean over the batch of 2 - 2 cos(p, t)

with p the online predictions, t the target projections, under stop-gradient unless
`stop_gradient=False` (SimSiam only: an EMA target has no gradient to stop). After each optimizer
step (`Task.update_extra`) the target moves by EMA, the running correlation of the online
projector outputs of both views is updated, F <- rho F + (1 - rho) E[f f^T] (the first step
sets F = E[f f^T]), and DirectPred / DirectCopy write the linear predictor from F every `freq`
steps (`lorank.dynamics.directpred`); in between it trains by gradient like the linear
predictor, as the public DirectPred code does.

Parameters: {"online": backbone + projector, "predictor": ...}; non-gradient state ("extra"):
{"online_stats": BatchNorm statistics of the online network, "predictor_stats", "target":
{"params", "batch_stats"} (BYOL), "corr": F [d, d]}. Logged each step: the loss and the collapse
metrics of the L2-normalized online projections of view 1: their per-dimension standard deviation
(`collapse_std`: 0 under complete collapse, about 1/sqrt(d) for spread embeddings) and
effective rank.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorank import checks
from lorank.analysis import spectrum
from lorank.data import augment as augment_lib
from lorank.dynamics import directpred
from lorank.models import heads, resnet
from lorank.train import loop as loop_lib

METHODS = ("byol", "simsiam")
PREDICTORS = ("mlp", "linear", "directpred", "directcopy", "none")
EMA_SCHEDULES = ("constant", "cosine")
TARGET_INITS = ("independent", "copy")
SET_PREDICTORS = ("directpred", "directcopy")  # predictors written from the running correlation F


@dataclasses.dataclass(frozen=True)
class NonContrastiveConfig:
    """What a non-contrastive run trains; every field is checked on construction (ValueError naming it)."""

    method: str = "byol"  # byol: EMA target; simsiam: the online network itself
    predictor: str = "directpred"  # mlp, linear (trained), directpred, directcopy (set from F), none
    stop_gradient: bool = True  # False: gradients flow through the targets (SimSiam only)
    ema_rate: float = 0.996  # BYOL target EMA rate (the paper's code: constant 0.996)
    ema_schedule: str = "constant"  # or "cosine": 1 - (1 - ema_rate)(cos(pi k / K) + 1) / 2 (BYOL's own code)
    target_init: str = "independent"  # BYOL target: its own random init (both public codes) or a copy
    rho: float = 0.3  # DirectPred: F <- rho F + (1 - rho) E[f f^T]
    eps: float = 0.01  # DirectPred / DirectCopy eps
    freq: int = 1  # write the predictor from F every freq optimizer steps
    centered: bool = False  # F of centered projector outputs
    eps_inside_root: bool = False  # DirectPred: p = sqrt(s / max s + eps) instead of sqrt(s / max s) + eps
    directcopy_normalize: bool = True  # DirectCopy: F / ||F|| + eps I (False: F + eps I)
    predictor_hidden: int = 512  # mlp predictor hidden width

    def __post_init__(self):
        checks.one_of("method", self.method, METHODS)
        checks.one_of("predictor", self.predictor, PREDICTORS)
        checks.one_of("ema_schedule", self.ema_schedule, EMA_SCHEDULES)
        checks.one_of("target_init", self.target_init, TARGET_INITS)
        checks.number("ema_rate", self.ema_rate, low=0.0, high=1.0)
        checks.number("rho", self.rho, low=0.0, high=1.0, high_open=True)
        checks.number("eps", self.eps, low=0.0)
        checks.integer("freq", self.freq, minimum=1)
        checks.integer("predictor_hidden", self.predictor_hidden, minimum=1)
        if not self.stop_gradient and self.method != "simsiam":
            raise ValueError("stop_gradient=False needs method='simsiam': gradients cannot reach an EMA target")

    @classmethod
    def from_config(cls, section) -> "NonContrastiveConfig":
        return from_section(cls, section)


def from_section(cls, section):
    """The frozen dataclass `cls` built from a run's `ssl` config section; ValueError naming unknown fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(dict(section)) - names)
    if unknown:
        raise ValueError(f"unknown fields {unknown} in the ssl section; expected {sorted(names)}")
    return cls(**dict(section))


class Encoder(nn.Module):
    """backbone -> projector. images [N, H, W, C] -> (features [N, F], projections [N, d])."""

    backbone: nn.Module
    projector: nn.Module

    @nn.compact
    def __call__(self, images, train: bool = True):
        features = self.backbone(images, train=train)
        return features, self.projector(features, train=train)


def build_encoder(model_config) -> Encoder:
    """The encoder of a `model` config section: backbone name and options, projector name and sizes."""
    m = model_config
    backbone = resnet.backbone(m.backbone, **dict(m.get("backbone_options", {})))
    projector = heads.projector(m.projector, hidden=m.projector_hidden, out=m.projector_dim)
    return Encoder(backbone, projector)


def build_predictor(cfg: NonContrastiveConfig, dim: int) -> nn.Module | None:
    """The predictor module, d -> d (None for "none")."""
    if cfg.predictor == "none":
        return None
    if cfg.predictor == "mlp":
        return heads.MLPHead(hidden=cfg.predictor_hidden, out=dim)
    return heads.LinearHead(dim, use_bias=False)


def cosine_distance(p: jax.Array, t: jax.Array) -> jax.Array:
    """mean over rows of 2 - 2 cos(p_i, t_i). p, t [N, d] -> scalar."""
    p = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
    t = t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    return jnp.mean(2.0 - 2.0 * jnp.sum(p * t, axis=-1))


def ema_rate(cfg: NonContrastiveConfig, step: jax.Array, total_steps: int) -> jax.Array:
    """The target's EMA rate at optimizer step `step` (1-based) of `total_steps`."""
    if cfg.ema_schedule == "constant":
        return jnp.asarray(cfg.ema_rate, jnp.float32)
    progress = jnp.clip(step.astype(jnp.float32) / total_steps, 0.0, 1.0)
    return 1.0 - (1.0 - cfg.ema_rate) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def ema_update(target: Any, online: Any, rate: jax.Array) -> Any:
    """rate * target + (1 - rate) * online, leaf by leaf."""
    return jax.tree.map(lambda t, o: rate * t + (1.0 - rate) * o, target, online)


def collapse_metrics(z: jax.Array) -> dict[str, jax.Array]:
    """Collapse of projections z [N, d]: per-dimension std of the L2-normalized rows, averaged
    (0 under complete collapse, about 1/sqrt(d) for spread rows), and the effective rank of the
    normalized rows."""
    zn = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    return {"collapse_std": jnp.mean(jnp.std(zn, axis=0)), "effective_rank": spectrum.effective_rank(zn)}


def _apply(module: nn.Module, params, stats, x, train: bool):
    """module(x, train) with BatchNorm statistics `stats` ({} if it has none) -> (out, new stats)."""
    variables = {"params": params, **({"batch_stats": stats} if stats else {})}
    if train and stats:
        out, updated = module.apply(variables, x, train=True, mutable=["batch_stats"])
        return out, updated["batch_stats"]
    return module.apply(variables, x, train=train), stats


def make_task(encoder: Encoder, cfg: NonContrastiveConfig, aug: augment_lib.SimCLRAugment,
              train_batch: Callable[[int, np.ndarray | None], dict], *, image_shape: tuple[int, int, int],
              total_steps: int, evaluators: tuple = (), items_per_step: int = 0) -> loop_lib.Task:
    """The loop `Task` of a non-contrastive run.

    Args:
      encoder: backbone + projector (`build_encoder`).
      cfg: the method.
      aug: the augmentation of both views.
      train_batch: (step, rows) -> {"images": float32 [R, H, W, C] in [0, 1]}.
      image_shape: (H, W, C) of the images, for initialization.
      total_steps: the run's optimizer steps (the cosine EMA schedule).
    """
    sample = jnp.zeros((2, *image_shape), jnp.float32)
    dim = jax.eval_shape(lambda k: encoder.init_with_output(k, sample, train=False)[0][1], jax.random.key(0)).shape[-1]
    predictor = build_predictor(cfg, dim)

    def init_params(key):
        k_online, k_pred = jax.random.split(key)
        params = {"online": encoder.init(k_online, sample, train=False)["params"]}
        if predictor is not None:
            params["predictor"] = predictor.init(k_pred, jnp.zeros((2, dim)), train=False)["params"]
            if cfg.predictor in SET_PREDICTORS:
                params["predictor"] = set_predictor_kernel(params["predictor"], jnp.eye(dim))
        return params

    def init_extra(key, boxed_params):
        k_target, _ = jax.random.split(key)
        target_vars = encoder.init(k_target, sample, train=False)
        stats = target_vars.get("batch_stats", {})  # BatchNorm statistics start the same for every key
        extra = {"online_stats": stats, "corr": jnp.zeros((dim, dim), jnp.float32)}
        if predictor is not None:
            extra["predictor_stats"] = predictor.init(jax.random.key(0), jnp.zeros((2, dim)),
                                                      train=False).get("batch_stats", {})
        if cfg.method == "byol":
            copied = cfg.target_init == "copy"
            target_params = nn.unbox(boxed_params)["online"] if copied else target_vars["params"]
            extra["target"] = {"params": target_params, "batch_stats": stats}
        return extra

    def predict(params, extra, z, train):
        if predictor is None:
            return z, extra.get("predictor_stats", {})
        return _apply(predictor, params["predictor"], extra["predictor_stats"], z, train)

    def loss_fn(params, extra, batch, rng):
        v1, v2 = augment_lib.two_views(rng, batch["images"], aug)
        stats = extra["online_stats"]
        (_, z1), stats = _apply(encoder, params["online"], stats, v1, True)
        (_, z2), stats = _apply(encoder, params["online"], stats, v2, True)
        p1, pred_stats = predict(params, extra, z1, True)
        p2, pred_stats = predict(params, {**extra, "predictor_stats": pred_stats}, z2, True)
        new_extra = {**extra, "online_stats": stats}
        if predictor is not None:
            new_extra["predictor_stats"] = pred_stats
        if cfg.method == "byol":
            target = extra["target"]
            (_, t1), t_stats = _apply(encoder, target["params"], target["batch_stats"], v1, True)
            (_, t2), t_stats = _apply(encoder, target["params"], t_stats, v2, True)
            new_extra["target"] = {"params": target["params"], "batch_stats": t_stats}
        else:
            t1, t2 = z1, z2
        if cfg.stop_gradient:
            t1, t2 = jax.lax.stop_gradient(t1), jax.lax.stop_gradient(t2)
        loss = 0.5 * (cosine_distance(p1, t2) + cosine_distance(p2, t1))
        f = jax.lax.stop_gradient(jnp.concatenate([z1, z2], axis=0))
        return loss, {"extra": new_extra, "f": f, "metrics": collapse_metrics(jax.lax.stop_gradient(z1))}

    def update_extra(step, params, extra, aux):
        extra = dict(extra)
        if cfg.method == "byol":
            rate = ema_rate(cfg, step, total_steps)
            extra["target"] = {**extra["target"],
                               "params": ema_update(extra["target"]["params"], params["online"], rate)}
        f = aux["f"]
        half = f.shape[0] // 2
        rho = jnp.where(step == 1, 0.0, cfg.rho)  # the first step sets F = E[f f^T]
        corr = directpred.update_correlation(extra["corr"], f[:half], f[half:], rho, centered=cfg.centered)
        extra["corr"] = corr
        if cfg.predictor in SET_PREDICTORS:
            w = predictor_from_corr(cfg, corr)
            kernel = jnp.where(step % cfg.freq == 0, w, predictor_kernel(params["predictor"]))
            params = {**params, "predictor": set_predictor_kernel(params["predictor"], kernel)}
        return params, extra

    return loop_lib.Task(init_params=init_params, loss_fn=loss_fn, train_batch=train_batch, init_extra=init_extra,
                         update_extra=update_extra, evaluators=tuple(evaluators), items_per_step=items_per_step,
                         item_name="images")


def predictor_from_corr(cfg: NonContrastiveConfig, corr: jax.Array) -> jax.Array:
    """The predictor matrix DirectPred or DirectCopy writes from F [d, d]."""
    if cfg.predictor == "directpred":
        return directpred.directpred_predictor(corr, eps=cfg.eps, eps_inside_root=cfg.eps_inside_root)
    return directpred.directcopy_predictor(corr, eps=cfg.eps, normalize=cfg.directcopy_normalize)


def predictor_kernel(predictor_params) -> jax.Array:
    """The linear predictor's matrix W_p [d, d] (p = W_p z; flax's kernel is its transpose)."""
    return predictor_params["dense"]["kernel"].T


def set_predictor_kernel(predictor_params, w: jax.Array):
    """The linear predictor's parameters (`heads.LinearHead`, boxed or not) with W_p = w."""
    kernel = predictor_params["dense"]["kernel"]
    if isinstance(kernel, nn.meta.AxisMetadata):
        kernel = kernel.replace_boxed(w.T.astype(kernel.unbox().dtype))
    else:
        kernel = w.T.astype(kernel.dtype)
    return {**predictor_params, "dense": {**predictor_params["dense"], "kernel": kernel}}


def _aligned_spectra(f: jax.Array, w_p: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Eigenvalues of F and of sym(W_p), largest first ([d] each), and the |cos| between their
    eigenvectors of the same rank ([d])."""
    f_eig, u_f = jnp.linalg.eigh(f)
    w_eig, u_w = jnp.linalg.eigh((w_p + w_p.T) / 2)
    return f_eig[::-1], w_eig[::-1], jnp.abs(jnp.sum(u_f[:, ::-1] * u_w[:, ::-1], axis=0))


def eigenbasis_cosines(f: jax.Array, w_p: jax.Array) -> jax.Array:
    """|cos| between each eigenvector of F and the eigenvector of sym(W_p) of the same rank
    (both sorted by eigenvalue, largest first). f, w_p [d, d] -> [d]."""
    return _aligned_spectra(f, w_p)[2]


def alignment_evaluator(every: int, top: int = 8) -> loop_lib.Evaluator:
    """Eigenspace alignment of the linear predictor with F every `every` steps:
    align/commutator (||F W_p - W_p F||_F / (||F||_F ||W_p||_F)), align/cos_mean over the top
    `top` eigenvectors, and the top eigenvalues of F and W_p (align/f_eig_i, align/wp_eig_i)."""

    def make(mesh):
        @jax.jit
        def measure(params, extra):
            w_p = predictor_kernel(params["predictor"])
            f = extra["corr"]
            f_eig, w_eig, cos = _aligned_spectra(f, w_p)
            return directpred.commutator_alignment(f, w_p), jnp.mean(cos[:top]), f_eig[:top], w_eig[:top]

        def evaluate(state):
            comm, cos, f_eig, w_eig = jax.device_get(measure(state.params, state.extra))
            out = {"align/commutator": float(comm), "align/cos_mean": float(cos)}
            out.update({f"align/f_eig_{i}": float(v) for i, v in enumerate(f_eig)})
            out.update({f"align/wp_eig_{i}": float(v) for i, v in enumerate(w_eig)})
            return out

        return evaluate

    return loop_lib.Evaluator(every, make)


def features_fn(encoder: Encoder) -> Callable[[Any, Any, jax.Array], jax.Array]:
    """(params, extra, images) -> backbone features [N, F] in evaluation mode (running BN statistics)."""

    def features(params, extra, images):
        variables = {"params": params["online"]}
        if extra["online_stats"]:
            variables["batch_stats"] = extra["online_stats"]
        return encoder.apply(variables, images, train=False)[0]

    return features


def sgd(lr: float, total_steps: int, *, momentum: float = 0.9, weight_decay: float = 4e-4,
        warmup_steps: int = 0, cosine: bool = False) -> optax.GradientTransformation:
    """SGD with momentum and (coupled, as torch.optim.SGD) weight decay: the DirectPred paper's
    optimizer (lr 0.03, momentum 0.9, weight decay 4e-4); optional warmup and per-step cosine."""
    checks.number("lr", lr, low=0.0, low_open=True)
    if cosine:
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 0), max(total_steps, 1))
    elif warmup_steps:
        schedule = optax.linear_schedule(0.0, lr, warmup_steps)
    else:
        schedule = lr
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum))
