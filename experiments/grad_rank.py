"""Gradient stable rank per layer kind over a pretraining run: the observation GaLore builds on.

    python -m experiments.grad_rank --config configs/grad_rank.py:d192 --workdir runs/grad_rank

Trains `config.pretrain` with the probe `analysis.grad_rank` on (at every evaluation, the
mean stable rank ||G||_F^2 / ||G||_2^2 of the gradients of each layer kind on a fixed
validation batch), then tabulates it per evaluation next to the smallest dimension of that
kind's matrices. Writes grad_rank.json and the run's files to the workdir and, with
`write_docs`, the `grad_rank` block of docs/pretraining.md and its figure.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import jax

from experiments import benchlib, cli
from lorank.analysis import curves
from lorank.models import llama
from lorank.train import lm, loop, pretrain

PRETRAINING_MD = benchlib.REPO_ROOT / "docs" / "pretraining.md"
FIGURE = benchlib.REPO_ROOT / "docs" / "figures" / "pretrain_grad_rank.png"
PREFIX = lm.GRAD_RANK_PREFIX
KIND_NAMES = dict(zip(llama.LAYER_KINDS, ("attention", "MLP", "embedding", "LM head")))  # as the docs name them


def kind_min_dims(config) -> dict[str, int]:
    """{layer kind: the smallest dimension of any of its matrices} of `config`'s model (from shapes)."""
    model = lm.build_llama(config)
    shapes = jax.eval_shape(lm.init_params_fn(model), jax.random.key(0))
    dims: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        kind = llama.layer_kind(tuple(path))
        if kind is not None and leaf.ndim == 2:
            dims[kind] = min(dims.get(kind, min(leaf.shape)), min(leaf.shape))
    return dims


def rank_table(records: list[dict]) -> tuple[list[str], list[tuple[int, dict[str, float]]]]:
    """(layer kinds, [(step, {kind: stable rank})]) of the evaluations in `records` that hold the probe."""
    found = [key[len(PREFIX):] for key in curves.metric_keys(records, PREFIX)]
    kinds = [k for k in llama.LAYER_KINDS if k in found] + [k for k in found if k not in llama.LAYER_KINDS]
    rows = [(r["step"], {k: r[PREFIX + k] for k in kinds}) for r in records if PREFIX + kinds[0] in r]
    return kinds, rows


def docs_body(kinds: list[str], rows: list[tuple[int, dict[str, float]]], dims: dict[str, int]) -> str:
    table = benchlib.markdown_table(["step"] + [f"{KIND_NAMES.get(k, k)} (min dim {dims[k]})" for k in kinds],
                                    [[step] + [f"{ranks[k]:.2f}" for k in kinds] for step, ranks in rows])
    peak = max(max(ranks.values()) for _, ranks in rows)
    fraction = max(ranks[k] / dims[k] for _, ranks in rows for k in kinds)
    lowest = [min(kinds, key=lambda k: ranks[k]) for _, ranks in rows[1:]]
    return (table + f"\n\nThe largest mean stable rank is {peak:.2f}: at most {100 * fraction:.1f}% of "
            f"the smallest dimension of its matrices. The lowest kind after initialization, per evaluation: "
            f"{', '.join(KIND_NAMES.get(k, k) for k in lowest)}.\n")


def run(config, workdir: str, log=print) -> dict[str, Any]:
    """Trains `config.pretrain` with the probe in `workdir`; returns the table and the run's summary."""
    if not config.pretrain.analysis.grad_rank:
        raise ValueError("pretrain.analysis.grad_rank=False: this experiment tabulates that probe")
    summary = pretrain.run(config.pretrain, workdir, log=log)
    kinds, rows = rank_table(curves.read_metrics(os.path.join(workdir, loop.METRICS_FILE)))
    dims = kind_min_dims(config.pretrain)
    results = {"steps": [s for s, _ in rows], "stable_rank": {k: [r[k] for _, r in rows] for k in kinds},
               "min_dims": dims, "final_eval_loss": summary["final_eval_loss"]}
    pathlib.Path(workdir, "grad_rank.json").write_text(json.dumps(results, indent=2) + "\n")
    body = docs_body(kinds, rows, dims)
    log(body)
    if config.write_docs:
        command = (f"python -m experiments.grad_rank --config configs/grad_rank.py:{config.variant} "
                   "--workdir runs/grad_rank")
        benchlib.write_measured_block(PRETRAINING_MD, "grad_rank", body, command)
        shutil.copyfile(os.path.join(workdir, "grad_stable_rank.png"), FIGURE)
    return results


if __name__ == "__main__":
    cli.launch(run, "configs/grad_rank.py:d192")
