"""Pretrain a LLaMA-style model with any method of the GaLore paper's comparisons.

    python -m experiments.pretrain --config configs/llama.py:tiny --workdir runs/tiny
    python -m experiments.pretrain --config configs/llama.py:tiny --config.optim.name=galore --workdir runs/galore

`--config.optim.name` picks the method (`lorank.train.methods.METHODS`: adamw,
adamw8bit, sgd, galore, galore8bit, galore_adafactor, lowrank, lora, relora);
`--config.optim.update_schedule=per_layer` updates each layer as soon as its gradient
exists (`lorank.train.per_layer`, the GaLore paper's per-layer weight updates).
Prints the parameter counts and progress, writes metrics.jsonl, loss.png (and
grad_stable_rank.png with --config.analysis.grad_rank=True), config.json and
orbax checkpoints to the workdir, resumes from the newest checkpoint there, and
ends with a sample from the trained (for LoRA: merged) model.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from ml_collections import ConfigDict

from experiments import cli
from lorank.analysis import curves
from lorank.data import text, tfds_text, tokenizers
from lorank.models import llama
from lorank.train import lm, loop as loop_lib, mesh as mesh_lib, methods, optimizers, per_layer

SOURCES = ("text", "tfds")


def load_tokenizer(data_config, vocab_size: int):
    """The tokenizer of `data.tokenizer` ("byte" or a SentencePiece model path), checked against the model."""
    if not data_config.tokenizer:
        raise ValueError("data.tokenizer is empty: pass --config.data.tokenizer=byte or the path of a "
                         "SentencePiece .model file (the GaLore paper used the T5 tokenizer's spiece.model)")
    tokenizer = tokenizers.make_tokenizer(data_config.tokenizer)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"model.vocab_size={vocab_size} is smaller than the {tokenizer.vocab_size} tokens of "
                         f"data.tokenizer={data_config.tokenizer!r}")
    return tokenizer


def load_data(config: ConfigDict, loop: loop_lib.LoopConfig, tokenizer
              ) -> tuple[Callable[[int], np.ndarray], np.ndarray, int | None, str]:
    """Training batches, validation sequences, the pad id the loss skips (or None), and a description.

    `data.source` "text": `data.corpus` files (default: the embedded corpus), split
    into train/validation by `data.val_fraction`, random windows. "tfds": the
    dataset `data.tfds_name` prepared in `data.tfds_data_dir`, documents padded
    or packed per `data.mode`.
    """
    d = config.data
    if d.source not in SOURCES:
        raise ValueError(f"unknown data.source={d.source!r}; expected one of {SOURCES}")
    num_val = config.train.eval_batches * loop.micro_batch
    if d.source == "text":
        tokens = tokenizer.encode(text.read_corpus(d.corpus))
        train_tokens, val_tokens = text.train_val_split(tokens, d.val_fraction)
        sampler = text.SequenceSampler(train_tokens, d.seq_len, loop.batch_size, seed=d.seed)
        val = text.eval_sequences(val_tokens, d.seq_len)
        return sampler.batch, val, None, f"{len(train_tokens):,} train / {len(val_tokens):,} validation tokens"

    def sequences(split, seed):
        return tfds_text.tfds_text_sequences(d.tfds_name, split, d.tfds_data_dir, tokenizer, d.seq_len,
                                             mode=d.mode, seed=seed)

    if d.mode == "pad":
        train_batch = tfds_text.batch_fn(sequences(d.tfds_train_split, d.seed), loop.batch_size)
        pad_id = tfds_text.resolve_pad_id(tokenizer, None)
    else:
        train_batch = tfds_text.sequential_batch_fn(lambda: iter(sequences(d.tfds_train_split, d.seed)),
                                                    loop.batch_size)
        pad_id = None
    val = tfds_text.first_sequences(sequences(d.tfds_eval_split, 0), num_val)
    return train_batch, val, pad_id, f"tfds {d.tfds_name} ({d.mode} mode) in {d.tfds_data_dir}"


def run(config: ConfigDict, workdir: str, *, stop_at: int | None = None, log=print) -> dict:
    """Trains per `config` in `workdir`; returns a summary (final losses, time, parameter counts, sample)."""
    mesh_lib.maybe_initialize_distributed()
    model = lm.build_llama(config)
    loop_config = loop_lib.LoopConfig.from_config(config.train)
    mesh = mesh_lib.make_mesh(config.mesh.to_dict())
    loop_lib.check_batch_divides_mesh(loop_config, mesh)
    methods.check_method(config.optim, jax.eval_shape(lm.init_params_fn(model), jax.random.key(0)))
    per_layer.check_config(config)
    optimizers.learning_rate_schedule(config.optim, loop_config.steps)  # checks lr, warmup, min_lr_ratio

    tokenizer = load_tokenizer(config.data, config.model.vocab_size)
    train_batch, val, pad_id, data_text = load_data(config, loop_config, tokenizer)
    task = lm.make_sequence_task(model, train_batch, val, loop_config, seq_len=config.data.seq_len,
                                 eval_batches=config.train.eval_batches, pad_id=pad_id,
                                 track_grad_rank=config.analysis.grad_rank)
    method = methods.build_method(config, task)
    report = methods.parameter_report(method)
    loop_lib.check_workdir_config(config, workdir)

    log(f"model: {llama.param_count(model.cfg):,} parameters | data: {data_text} | mesh {dict(mesh.shape)} on "
        f"{jax.device_count()} devices")
    log(methods.describe(method, report))
    step_plan = functools.partial(per_layer.configured_step_plan, config, model, method, pad_id=pad_id)
    start = time.perf_counter()
    state, history = loop_lib.run(method.task, method.tx, loop_config, mesh, workdir, stop_at=stop_at, log=log,
                                  scalars=optimizers.lr_scalars(method.schedule), step_plan=step_plan)
    elapsed = time.perf_counter() - start
    metrics_path = os.path.join(workdir, loop_lib.METRICS_FILE)
    title = f"{model.cfg.num_layers}-layer LLaMA, {method.name}, {report['total']:,} params"
    curves.plot_metrics(metrics_path, os.path.join(workdir, "loss.png"), title=title)
    if config.analysis.grad_rank:
        keys = curves.metric_keys(curves.read_metrics(metrics_path), "grad_stable_rank/")
        curves.plot_metrics(metrics_path, os.path.join(workdir, "grad_stable_rank.png"), keys=keys,
                            ylabel="gradient stable rank (mean over layers)", title=title, logy=True)
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    summary: dict[str, Any] = {
        "method": method.name, "steps": int(jax.device_get(state.step)), "seconds": elapsed,
        "params": report["total"], "trainable_params": report["trainable"],
        "optimizer_state_bytes": report["optimizer_state_bytes"],
        "final_eval_loss": evals[-1] if evals else None,
        "final_train_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None)}
    if summary["steps"] == loop_config.steps:
        s = config.sample
        params = jax.device_get(method.export(state.params))
        out = lm.generate(model, params, tokenizer.encode(s.prompt), s.length, key=jax.random.key(s.seed),
                          temperature=s.temperature, top_k=s.top_k)
        summary["sample"] = tokenizer.decode(out)
        log("sample:\n" + summary["sample"])
    log(f"done in {elapsed:.1f}s: " + json.dumps({k: v for k, v in summary.items() if k != "sample"}))
    return summary


if __name__ == "__main__":
    cli.launch(run, "configs/llama.py:tiny", resumable=True)
