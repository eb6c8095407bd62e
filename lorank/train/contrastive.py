"""The contrastive training driver behind `python -m experiments.ssl`.

`run(config, workdir)` checks the config (loss and hyperparameters, augmentation, batch, optimizer,
and that the backbone takes the data's images) before any compute, loads the images of
`config.data`, trains SimCLR with the loss of `config.ssl` (`lorank.train.simclr`) through the
generic loop with the optimizer of `config.optim` (`lorank.train.optimizers`: sgdw, adamw, lars,
galore, ...; a real per-step warmup + cosine schedule), and evaluates the frozen backbone (features
before the projector) with a linear probe and kNN (`lorank.train.probe`) and the embeddings'
singular-value spectra every `train.eval_every` steps, at step 0 (the random network) and at the
end. Writes metrics.jsonl, spectra.npz (the spectra of every evaluation), loss.png, probe.png,
spectrum.png, config.json and checkpoints; resumes from the workdir. Only process 0 writes files.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import matplotlib.cm
import numpy as np
from ml_collections import ConfigDict

from lorank.analysis import curves, plots
from lorank.data import arrays
from lorank.models import resnet
from lorank.train import loop as loop_lib, mesh as mesh_lib, noncontrastive, optimizers, probe, simclr, ssl

SPECTRA_FILE = "spectra.npz"


def check(config: ConfigDict) -> tuple[simclr.SimCLRConfig, loop_lib.LoopConfig]:
    """The loss and loop configs; ValueError naming a bad field, before any data is read."""
    cfg = simclr.SimCLRConfig.from_config(config.ssl)
    noncontrastive.augmentation(config.augment)
    loop_config = loop_lib.LoopConfig.from_config(config.train)
    if loop_config.micro_batch < 2:
        raise ValueError(f"train.batch_size={loop_config.batch_size} (micro-batch {loop_config.micro_batch}): a "
                         "contrastive batch needs at least 2 images")
    encoder = ssl.build_encoder(config.model)
    optimizers.build_optimizer(config.optim, loop_config.steps, resnet.family(config.model.backbone))
    if cfg.directclr_dim:
        simclr.check_model(encoder, cfg, (encoder.backbone.min_size, encoder.backbone.min_size, 3))
    return cfg, loop_config


def build(config: ConfigDict, data: dict[str, np.ndarray], spectra: dict | None = None):
    """(task, optimizer, schedule) of a config and its loaded data."""
    cfg, loop_config = check(config)
    aug = noncontrastive.augmentation(config.augment)
    encoder = ssl.build_encoder(config.model)
    shape = tuple(data["train"].shape[1:])
    simclr.check_model(encoder, cfg, aug_shape(aug, shape))
    num_classes = int(max(data["probe_y"].max(), data["test_y"].max())) + 1
    every = loop_config.eval_every
    evaluators = (
        probe.probe_evaluator(simclr.features_fn(encoder), data["probe_x"], data["probe_y"], data["test_x"],
                              data["test_y"], num_classes=num_classes, every=every, knn_k=tuple(config.eval.knn_k),
                              batch_size=config.eval.probe_batch),
        simclr.spectrum_evaluator(encoder, data["test_x"], every, batch_size=config.eval.probe_batch, keep=spectra),
    )
    batches = arrays.epoch_batches({"images": data["train"]}, loop_config.batch_size, seed=config.data.seed)
    task = simclr.make_task(encoder, cfg, aug, batches, image_shape=shape, evaluators=evaluators,
                            items_per_step=loop_config.batch_size)
    tx, schedule = optimizers.build_optimizer(config.optim, loop_config.steps, resnet.family(config.model.backbone))
    return task, tx, schedule


def aug_shape(aug, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(h, w, C) of the augmented views of images of `shape` (H, W, C)."""
    return (*aug.output_size(shape[0], shape[1]), shape[2])


def optimizer_state_bytes(task: loop_lib.Task, tx) -> tuple[int, int]:
    """(bytes of the optimizer state, parameter count) for the task's parameters, without allocating them."""
    params = nn.unbox(jax.eval_shape(task.init_params, jax.random.key(0)))
    state = jax.eval_shape(tx.init, params)
    size = lambda tree: sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    return size(state), resnet.param_count(params)


def run(config: ConfigDict, workdir: str, *, stop_at: int | None = None, log=print) -> dict[str, Any]:
    """Trains per `config` in `workdir`; returns the final probe accuracies, spectra ranks and state bytes."""
    mesh_lib.maybe_initialize_distributed()
    check(config)
    loop_config = loop_lib.LoopConfig.from_config(config.train)
    mesh = mesh_lib.make_mesh(config.mesh.to_dict())
    loop_lib.check_batch_divides_mesh(loop_config, mesh)
    data = noncontrastive.load_data(config.data)
    spectra: dict[int, dict[str, np.ndarray]] = {}
    task, tx, schedule = build(config, data, spectra)
    state_bytes, params = optimizer_state_bytes(task, tx)
    say = log if loop_lib.is_primary() else (lambda _: None)
    what = (f"DirectCLR d0={config.ssl.directclr_dim}" if config.ssl.directclr_dim else f"loss {config.ssl.loss}")
    say(f"SimCLR, {what} | {config.model.backbone} + projector {config.model.projector} | optimizer "
        f"{config.optim.name} ({state_bytes:,} state bytes) | {len(data['train']):,} training images, probe on "
        f"{len(data['probe_x']):,} / {len(data['test_x']):,} test")
    start = time.perf_counter()
    state, records = loop_lib.run(task, tx, loop_config, mesh, workdir, config=config, stop_at=stop_at, log=log,
                                  scalars=optimizers.lr_scalars(schedule))
    elapsed = time.perf_counter() - start
    if loop_lib.is_primary():
        records = curves.read_metrics(os.path.join(workdir, loop_lib.METRICS_FILE))
        spectra = save_spectra(workdir, spectra)
        title = what + f", projector {config.model.projector}"
        noncontrastive.plot_run(records, workdir, title=title)
        plot_spectra(spectra, os.path.join(workdir, "spectrum.png"), title=title)
    summary = noncontrastive.summarize(records)
    for key in ("spectrum/feature_erank", "spectrum/projection_erank", "probe/effective_rank"):
        values = [r[key] for r in records if key in r]
        if values:
            summary[key] = values[-1]
    summary.update(steps=int(jax.device_get(state.step)), seconds=elapsed, optimizer_state_bytes=state_bytes,
                   param_count=params)
    say("done: " + json.dumps(summary))
    return summary


def save_spectra(workdir: str, spectra: dict[int, dict[str, np.ndarray]]) -> dict[int, dict[str, np.ndarray]]:
    """Merges this invocation's spectra with those saved by earlier ones (a resumed run) into spectra.npz."""
    path = os.path.join(workdir, SPECTRA_FILE)
    merged = load_spectra(workdir)
    merged.update(spectra)
    arrays_out = {f"{name}_{step}": values for step, by_name in merged.items() for name, values in by_name.items()}
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays_out)
    os.replace(tmp, path)
    return merged


def load_spectra(workdir: str) -> dict[int, dict[str, np.ndarray]]:
    """{step: {"feature": [K], "projection": [K']}} from a run's spectra.npz ({} if absent)."""
    path = os.path.join(workdir, SPECTRA_FILE)
    if not os.path.exists(path):
        return {}
    out: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path) as saved:
        for key in saved.files:
            name, step = key.rsplit("_", 1)
            out.setdefault(int(step), {})[name] = saved[key]
    return out


def plot_spectra(spectra: dict[int, dict[str, np.ndarray]], path: str, *, title: str) -> None:
    """spectrum.png: singular values by index (log scale), one curve per evaluation step, per embedding."""
    if not spectra:
        return
    names = sorted({n for by_name in spectra.values() for n in by_name})
    fig, axes = plots.figure(1, len(names), panel_size=(5.5, 4.0))
    steps = sorted(spectra)
    for ax, name in zip(axes, names):
        for k, step in enumerate(steps):
            if name in spectra[step]:
                colour = matplotlib.cm.viridis(k / max(len(steps) - 1, 1))
                ax.semilogy(spectra[step][name], color=colour, label=f"step {step}")
        ax.set_title(f"{title}: {name} spectrum", fontsize=9)
        ax.set_xlabel("singular value index")
        ax.set_ylabel("singular value (normalized, centred rows)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    plots.save(fig, path, dpi=110)
