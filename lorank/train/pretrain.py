"""LLaMA-style pretraining with any method of the GaLore paper's comparisons, from one config.

`run(config, workdir)` is the body of `python -m experiments.pretrain`: it checks the
config (method, rank, schedule, mesh, learning rate) before anything is read or
written, loads the data of `config.data` (`lorank.data.lm_sources`), builds the
method's task (`lorank.train.methods`) and update schedule
(`lorank.train.per_layer`), trains with the generic loop, plots the metrics and
ends with a sample from the trained (for LoRA: merged) model. Only process 0
writes files and prints.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from lorank.analysis import curves
from lorank.data import lm_sources
from lorank.models import llama
from lorank.train import lm, loop as loop_lib, mesh as mesh_lib, methods, optimizers, per_layer


def host_params(params: Any) -> Any:
    """Every process's full copy of (possibly multi-process sharded) parameters, as NumPy arrays."""
    if jax.process_count() == 1:
        return jax.device_get(params)
    return multihost_utils.process_allgather(params, tiled=True)


def check_run_config(config: ConfigDict, model: llama.Llama, loop_config: loop_lib.LoopConfig, mesh) -> None:
    """The checks made before anything is read or written: batch against mesh, method and rank,
    update schedule, learning-rate schedule."""
    loop_lib.check_batch_divides_mesh(loop_config, mesh)
    methods.check_method(config.optim, jax.eval_shape(lm.init_params_fn(model), jax.random.key(0)), llama.FAMILY)
    per_layer.check_config(config)
    optimizers.learning_rate_schedule(config.optim, loop_config.steps)  # checks lr, warmup, min_lr_ratio


def run(config: ConfigDict, workdir: str, *, stop_at: int | None = None, log=print) -> dict:
    """Trains per `config` in `workdir`; returns a summary (final losses, time, parameter counts, sample)."""
    mesh_lib.maybe_initialize_distributed()
    model = lm.build_llama(config)
    loop_config = loop_lib.LoopConfig.from_config(config.train)
    mesh = mesh_lib.make_mesh(config.mesh.to_dict())
    check_run_config(config, model, loop_config, mesh)
    tokenizer = lm_sources.load_tokenizer(config.data, config.model.vocab_size)
    data = lm_sources.load_lm_data(config.data, tokenizer, batch_size=loop_config.batch_size,
                                   num_val=config.train.eval_batches * loop_config.micro_batch)
    summary, _, _ = train_language_model(config, workdir, model, tokenizer, data, mesh, stop_at=stop_at, log=log)
    return summary


def train_language_model(config: ConfigDict, workdir: str, model: llama.Llama, tokenizer, data: lm_sources.LMData,
                         mesh, *, init_params=None, other_val: dict | None = None, perplexity: bool = False,
                         stop_at: int | None = None, log=print) -> tuple[dict, Any, Any]:
    """The training body shared by pretraining and fine-tuning: `config.optim.name`'s method on `data`,
    the generic loop in `workdir`, the metrics plotted, a sample from the trained (LoRA: merged) model.

    Args:
      init_params: key -> boxed parameters to start from (None: the model's random init).
      other_val: name -> held-out rows also evaluated, as eval_loss/NAME.
      perplexity: also report eval_perplexity (and eval_perplexity/NAME).
    Returns:
      (summary, final train state, the method) on every process; only process 0 writes and prints.
    """
    primary = loop_lib.is_primary()
    say = log if primary else (lambda _: None)
    loop_config = loop_lib.LoopConfig.from_config(config.train)
    task = lm.make_sequence_task(model, data.train_batch, data.val, loop_config, seq_len=config.data.seq_len,
                                 eval_batches=config.train.eval_batches, pad_id=data.pad_id,
                                 track_grad_rank=config.analysis.grad_rank, perplexity=perplexity,
                                 other_val=other_val, init_params=init_params)
    method = methods.build_method(config, task, llama.FAMILY)
    report = methods.parameter_report(method)

    say(f"model: {llama.param_count(model.cfg):,} parameters | data: {data.description} | mesh {dict(mesh.shape)} "
        f"on {jax.device_count()} devices")
    say(methods.describe(method, report))
    step_plan = functools.partial(lm.step_plan, config, model, method, pad_id=data.pad_id)
    start = time.perf_counter()
    state, history = loop_lib.run(method.task, method.tx, loop_config, mesh, workdir, config=config,
                                  stop_at=stop_at, log=log, scalars=optimizers.lr_scalars(method.schedule),
                                  step_plan=step_plan)
    elapsed = time.perf_counter() - start
    if primary:
        metrics_path = os.path.join(workdir, loop_lib.METRICS_FILE)
        title = f"{model.cfg.num_layers}-layer LLaMA, {method.name}, {report['total']:,} params"
        curves.plot_metrics(metrics_path, os.path.join(workdir, "loss.png"), title=title)
        if config.analysis.grad_rank:
            keys = curves.metric_keys(curves.read_metrics(metrics_path), lm.GRAD_RANK_PREFIX)
            curves.plot_metrics(metrics_path, os.path.join(workdir, "grad_stable_rank.png"), keys=keys,
                                ylabel="gradient stable rank (mean over layers)", title=title, logy=True)
    evals = [h for h in history if "eval_loss" in h]
    summary: dict[str, Any] = {
        "method": method.name, "steps": int(jax.device_get(state.step)), "seconds": elapsed,
        "params": report["total"], "trainable_params": report["trainable"],
        "optimizer_state_bytes": report["optimizer_state_bytes"],
        "initial_eval_loss": evals[0]["eval_loss"] if evals and evals[0]["step"] == 0 else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "final_train_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None)}
    if evals:
        summary.update({k: v for k, v in evals[-1].items() if k.startswith("eval_") and k != "eval_loss"})
    if summary["steps"] == loop_config.steps:
        s = config.sample
        params = host_params(jax.jit(method.export)(state.params))
        out = lm.generate(model, params, tokenizer.encode(s.prompt), s.length, key=jax.random.key(s.seed),
                          temperature=s.temperature, top_k=s.top_k)
        summary["sample"] = tokenizer.decode(out)
        say("sample:\n" + summary["sample"])
    say(f"done in {elapsed:.1f}s: " + json.dumps({k: v for k, v in summary.items() if k != "sample"}))
    return summary, state, method


def load_run(workdir: str, *, warn=lambda message: None) -> tuple[ConfigDict, llama.Llama, Any]:
    """(config, model, full-rank params) of the newest intact checkpoint of a pretraining (or fine-tuning)
    run in `workdir`, on one device.

    Factored methods' parameters are exported (LoRA merged, factors multiplied out); corrupt
    newer checkpoints are named through `warn` and skipped.

    Raises:
      FileNotFoundError: `workdir` holds no config.json or no checkpoint (named).
    """
    config = loop_lib.load_workdir_config(workdir)
    model = lm.build_llama(config)
    method = methods.build_method(config, lm.shapes_task(model), llama.FAMILY)
    mesh = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
    plan = lm.step_plan(config, model, method, mesh, jax.random.key(0))
    state = loop_lib.restore_latest(workdir, plan.abstract_state, plan.shardings, warn=warn)
    return config, model, method.export(state.params)
