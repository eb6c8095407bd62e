"""The non-contrastive training driver behind `python -m experiments.noncontrastive`.

`run(config, workdir)` checks the config, loads the images of `config.data`, builds the
method of `config.ssl` (`lorank.train.ssl`: BYOL or SimSiam; MLP, linear, DirectPred or
DirectCopy predictor, or none; stop-gradient or not), trains it with the generic loop (SGD
with momentum and weight decay, the DirectPred paper's optimizer), evaluates the frozen
backbone with a linear probe and kNN (`lorank.train.probe`) every `train.eval_every` steps,
at step 0 (the random network) and at the end, and the predictor's eigenspace alignment
with F where the predictor is linear, and plots the curves. Only process 0 writes files.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from lorank.analysis import curves
from lorank.data import arrays, augment as augment_lib, images as images_lib
from lorank.train import loop as loop_lib, mesh as mesh_lib, probe, ssl

LINEAR_PREDICTORS = ("linear", "directpred", "directcopy")


def augmentation(section) -> augment_lib.SimCLRAugment:
    """The augmentation of an `augment` config section (lists become tuples)."""
    fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(section).items()}
    return augment_lib.SimCLRAugment(**fields)


def load_data(d) -> dict[str, np.ndarray]:
    """Training images, the probe's labeled train images and the test images of a `data` section, each
    average-pooled by data.downsample."""
    common = dict(path=d.path, tfds_name=d.tfds_name, data_dir=d.tfds_data_dir)
    train, _ = images_lib.load_images(d.source, d.train_split, max_per_class=d.train_per_class or None,
                                      max_images=d.max_train_images or None, **common)
    probe_x, probe_y = images_lib.load_images(d.source, d.probe_split, max_per_class=d.probe_per_class or None,
                                              max_images=d.max_probe_images or None, **common)
    test_x, test_y = images_lib.load_images(d.source, d.test_split, max_per_class=d.test_per_class or None,
                                            max_images=d.max_test_images or None, **common)
    pool = lambda x: images_lib.downsample(x, d.downsample)  # noqa: E731
    return {"train": pool(train), "probe_x": pool(probe_x), "probe_y": probe_y, "test_x": pool(test_x),
            "test_y": test_y}


def build(config: ConfigDict, data: dict[str, np.ndarray]):
    """(task, optimizer, encoder) of a config and its loaded data; checks before any compute."""
    cfg = ssl.NonContrastiveConfig.from_config(config.ssl)
    aug = augmentation(config.augment)
    encoder = ssl.build_encoder(config.model)
    loop_config = loop_lib.LoopConfig.from_config(config.train)
    shape = tuple(data["train"].shape[1:])
    num_classes = int(max(data["probe_y"].max(), data["test_y"].max())) + 1
    evaluators = [probe.probe_evaluator(ssl.features_fn(encoder), data["probe_x"], data["probe_y"], data["test_x"],
                                        data["test_y"], num_classes=num_classes, every=loop_config.eval_every,
                                        knn_k=tuple(config.eval.knn_k), batch_size=config.eval.probe_batch)]
    if cfg.predictor in LINEAR_PREDICTORS:
        evaluators.append(ssl.alignment_evaluator(config.eval.align_every))
    batches = arrays.epoch_batches({"images": data["train"]}, loop_config.batch_size, seed=config.data.seed)
    task = ssl.make_task(encoder, cfg, aug, batches, image_shape=shape, total_steps=loop_config.steps,
                         evaluators=tuple(evaluators), items_per_step=loop_config.batch_size)
    o = config.optim
    tx = ssl.sgd(o.lr, loop_config.steps, momentum=o.momentum, weight_decay=o.weight_decay,
                 warmup_steps=o.warmup_steps, cosine=o.cosine)
    return task, tx, encoder


def run(config: ConfigDict, workdir: str, *, stop_at: int | None = None, log=print) -> dict[str, Any]:
    """Trains per `config` in `workdir`; returns the final probe accuracies, collapse metrics and alignment."""
    mesh_lib.maybe_initialize_distributed()
    ssl.NonContrastiveConfig.from_config(config.ssl)  # method checks before any data is read
    augmentation(config.augment)
    loop_config = loop_lib.LoopConfig.from_config(config.train)
    mesh = mesh_lib.make_mesh(config.mesh.to_dict())
    loop_lib.check_batch_divides_mesh(loop_config, mesh)
    data = load_data(config.data)
    task, tx, _ = build(config, data)
    say = log if loop_lib.is_primary() else (lambda _: None)
    say(f"{config.ssl.method} with predictor {config.ssl.predictor} (stop-gradient {config.ssl.stop_gradient}) | "
        f"{config.model.backbone} | {len(data['train']):,} training images, probe on {len(data['probe_x']):,} / "
        f"{len(data['test_x']):,} test")
    start = time.perf_counter()
    state, history = loop_lib.run(task, tx, loop_config, mesh, workdir, config=config, stop_at=stop_at, log=log)
    elapsed = time.perf_counter() - start
    records = history
    if loop_lib.is_primary():
        metrics_path = os.path.join(workdir, loop_lib.METRICS_FILE)
        records = curves.read_metrics(metrics_path)
        plot_run(records, workdir, title=f"{config.ssl.method}, predictor {config.ssl.predictor}")
    summary = summarize(records)
    summary.update(steps=int(jax.device_get(state.step)), seconds=elapsed)
    say("done: " + json.dumps(summary))
    return summary


def summarize(records: list[dict]) -> dict[str, Any]:
    """The last logged value of every headline metric, and the step-0 probe (the random network)."""
    probe_keys = sorted({k for r in records for k in r if k.startswith("probe/")})
    out: dict[str, Any] = {}
    for key in ("loss", "collapse_std", "effective_rank", *probe_keys, "align/commutator", "align/cos_mean"):
        values = [r[key] for r in records if key in r]
        if values:
            out[key] = values[-1]
    first = next((r for r in records if r.get("step") == 0 and "probe/linear_acc" in r), None)
    if first is not None:
        out["random_network"] = {k: first[k] for k in probe_keys if k in first}
    return out


def plot_run(records: list[dict], workdir: str, *, title: str) -> None:
    """loss.png (loss and collapse metrics), probe.png, alignment.png (where logged)."""
    metrics = os.path.join(workdir, loop_lib.METRICS_FILE)
    curves.plot_metrics(metrics, os.path.join(workdir, "loss.png"), keys=["loss", "collapse_std"], title=title)
    accuracies = sorted({k for r in records for k in r if k.startswith("probe/") and k.endswith("_acc")})
    curves.plot_metrics(metrics, os.path.join(workdir, "probe.png"), keys=accuracies, ylabel="accuracy", title=title)
    if any("align/commutator" in r for r in records):
        curves.plot_metrics(metrics, os.path.join(workdir, "alignment.png"),
                            keys=["align/commutator", "align/cos_mean"], ylabel="alignment", title=title)
