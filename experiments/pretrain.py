"""Pretrain a LLaMA-style model on a text corpus.

    python -m experiments.pretrain --config configs/llama.py:tiny --workdir runs/tiny

Prints progress, writes metrics.jsonl, loss.png (and grad_stable_rank.png with
--config.analysis.grad_rank=True), config.json and orbax checkpoints to the
workdir, resumes from the newest checkpoint there, and ends with a sample from
the trained model.
"""

from __future__ import annotations

import json
import os
import time

import jax
from ml_collections import ConfigDict

from experiments import cli
from lorank.analysis import curves
from lorank.data import text
from lorank.models import llama
from lorank.train import lm, loop as loop_lib, mesh as mesh_lib, optimizers


def run(config: ConfigDict, workdir: str, *, stop_at: int | None = None, log=print) -> dict:
    """Trains per `config` in `workdir`; returns a summary (final losses, time, parameter count, sample)."""
    mesh_lib.maybe_initialize_distributed()
    model = lm.build_llama(config)
    loop_config = loop_lib.LoopConfig.from_config(config.train)
    mesh = mesh_lib.make_mesh(config.mesh.to_dict())
    loop_lib.check_batch_divides_mesh(loop_config, mesh)
    tx, schedule = optimizers.build_optimizer(config.optim, loop_config.steps)

    tokenizer = text.ByteTokenizer()
    if config.model.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={config.model.vocab_size} but the byte tokenizer has 256 tokens")
    tokens = tokenizer.encode(text.read_corpus(config.data.corpus))
    train_tokens, val_tokens = text.train_val_split(tokens, config.data.val_fraction)
    task = lm.make_lm_task(model, train_tokens, val_tokens, loop_config, seq_len=config.data.seq_len,
                           eval_batches=config.train.eval_batches, data_seed=config.data.seed,
                           track_grad_rank=config.analysis.grad_rank)
    loop_lib.check_workdir_config(config, workdir)

    log(f"model: {llama.param_count(model.cfg):,} parameters | corpus: {len(train_tokens):,} train / "
        f"{len(val_tokens):,} validation tokens | mesh {dict(mesh.shape)} on {jax.device_count()} devices")
    start = time.perf_counter()
    state, history = loop_lib.run(task, tx, loop_config, mesh, workdir, stop_at=stop_at, log=log,
                                  scalars=optimizers.lr_scalars(schedule))
    elapsed = time.perf_counter() - start
    metrics_path = os.path.join(workdir, loop_lib.METRICS_FILE)
    title = f"{model.cfg.num_layers}-layer LLaMA, {llama.param_count(model.cfg):,} params"
    curves.plot_metrics(metrics_path, os.path.join(workdir, "loss.png"), title=title)
    if config.analysis.grad_rank:
        keys = curves.metric_keys(curves.read_metrics(metrics_path), "grad_stable_rank/")
        curves.plot_metrics(metrics_path, os.path.join(workdir, "grad_stable_rank.png"), keys=keys,
                            ylabel="gradient stable rank (mean over layers)", title=title, logy=True)
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    summary = {"steps": int(jax.device_get(state.step)), "seconds": elapsed,
               "params": llama.param_count(model.cfg), "final_eval_loss": evals[-1] if evals else None,
               "final_train_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None)}
    if summary["steps"] == loop_config.steps:
        s = config.sample
        prompt = tokenizer.encode(s.prompt)
        params = jax.device_get(state.params)
        out = lm.generate(model, params, prompt, s.length, key=jax.random.key(s.seed),
                          temperature=s.temperature, top_k=s.top_k)
        summary["sample"] = tokenizer.decode(out)
        log("sample:\n" + summary["sample"])
    log(f"done in {elapsed:.1f}s: " + json.dumps({k: v for k, v in summary.items() if k != "sample"}))
    return summary


if __name__ == "__main__":
    cli.launch(run, "configs/llama.py:tiny", resumable=True)
