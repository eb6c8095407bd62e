"""Language models whose attention is measured while they train (the real-text runs of the dynamics papers).

Built on `lorank.models.attention.Transformer` (every layer sows its attention maps) and the generic
loop: the model of a config, its data, a next-token task with dropout, a held-out loss evaluator and
an attention evaluator that measures, on a fixed held-out batch, each layer's mean attention
entropy, 90%-mass support and mass on the query's own and previous position
(`lorank.analysis.attention`), and saves maps at chosen steps. `experiments.scan_snap_text` (SGD)
and `experiments.joma_text` (Adam, stable ranks) use it.

Config sections read: `model` (`TransformerConfig` fields), `data` (`lorank.data.lm_sources`),
`train` (steps, eval_batches, ...), `analysis` (every, eval_rows, snapshot_rows, snapshot_steps,
skip_first, mass).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lorank import checks
from lorank.analysis import attention as attn_stats
from lorank.data import lm_sources
from lorank.models import attention as attention_model
from lorank.train import lm, loop

SNAPSHOT_DIR = "attention"
# metric name prefixes (+ layer index): mean entropy, mass support, mass on the own and on the previous position
ENTROPY, SUPPORT, SELF, PREVIOUS = "attn_entropy/layer_", "attn_support/layer_", "attn_self/layer_", "attn_prev/layer_"
METRICS = {"entropy": ENTROPY, "support": SUPPORT, "self": SELF, "previous": PREVIOUS}


def build_model(config) -> attention_model.Transformer:
    """The model of `config.model`, checked against `config.data.seq_len`."""
    if config.data.seq_len > config.model.max_len:
        raise ValueError(f"data.seq_len={config.data.seq_len} exceeds model.max_len={config.model.max_len}")
    return attention_model.Transformer(attention_model.TransformerConfig(**config.model.to_dict()))


def dropout_loss(model: attention_model.Transformer, pad_id: int | None = None) -> Callable:
    """(params, sequences int [B, T+1], key) -> mean next-token cross-entropy with dropout from `key`."""

    def loss_fn(params, sequences, key):
        logits = model.apply({"params": params}, sequences[:, :-1], deterministic=False, rngs={"dropout": key})
        return lm.mean_cross_entropy(logits, sequences[:, 1:], pad_id)

    return loss_fn


def attention_stats(model: attention_model.Transformer, tokens: jax.Array, *, mass: float,
                    skip_first: int) -> Callable[[Any], dict[str, jax.Array]]:
    """params -> {"entropy", "support", "self", "previous": [L], "maps": [L, R, H, T, T], "loss": []} on
    held-out `tokens` [R, T+1].

    Entropy, mass support and the mass on the query's own and previous position are
    `lorank.analysis.attention`'s means over rows, batch and heads (causal or not as the
    model); the loss is the deterministic next-token loss.
    """
    causal = model.cfg.causal

    def stats(params):
        logits, maps = attention_model.apply_with_attention(model, params, tokens[:, :-1])
        return {"entropy": jnp.stack([attn_stats.mean_entropy(m, causal, skip_first) for m in maps]),
                "support": jnp.stack([attn_stats.mean_mass_support(m, mass, causal, skip_first) for m in maps]),
                "self": jnp.stack([attn_stats.diagonal_mass(m, 0, skip_first) for m in maps]),
                "previous": jnp.stack([attn_stats.diagonal_mass(m, 1, skip_first) for m in maps]),
                "maps": jnp.stack(maps), "loss": lm.mean_cross_entropy(logits, tokens[:, 1:])}

    return stats


def check_analysis(config) -> None:
    """Refuses an `analysis` section that cannot run, before anything is read or trained.

    Raises:
      ValueError: snapshot steps outside [0, train.steps] or off the measurement grid, too few
        held-out rows, a bad mass or skip_first.
    """
    a, steps = config.analysis, config.train.steps
    checks.integer("analysis.every", a.every, minimum=1)
    checks.integer("analysis.eval_rows", a.eval_rows, minimum=1)
    checks.integer("analysis.snapshot_rows", a.snapshot_rows, minimum=1, maximum=a.eval_rows)
    checks.integer("analysis.skip_first", a.skip_first, minimum=0, maximum=config.data.seq_len - 1)
    checks.number("analysis.mass", a.mass, low=0.0, high=1.0, low_open=True)
    for s in a.snapshot_steps:
        checks.integer("analysis.snapshot_steps entry", s, minimum=0, maximum=steps)
        if s % a.every and s != steps:
            raise ValueError(f"analysis.snapshot_steps holds {s}, which is not a multiple of analysis.every="
                             f"{a.every} (nor the last step {steps}): the attention is measured only there")


def load_data(config, batch_size: int, num_val: int) -> tuple[lm_sources.LMData, np.ndarray]:
    """(the data of `config.data`, the held-out batch int32 [analysis.eval_rows, seq_len + 1])."""
    tokenizer = lm_sources.load_tokenizer(config.data, config.model.vocab_size)
    data = lm_sources.load_lm_data(config.data, tokenizer, batch_size=batch_size,
                                   num_val=max(num_val, config.analysis.eval_rows))
    rows = config.analysis.eval_rows
    if len(data.val) < rows:
        raise ValueError(f"the held-out data holds {len(data.val)} sequences of {config.data.seq_len + 1} tokens, "
                         f"fewer than analysis.eval_rows={rows}")
    return data, np.asarray(data.val[:rows])


def attention_evaluator(stats_fn: Callable, every: int, snapshot_steps: tuple[int, ...], snapshot_rows: int,
                        workdir: str, tokens: np.ndarray) -> loop.Evaluator:
    """Per-layer entropy, mass support and own / previous position mass every `every` steps.

    At `snapshot_steps` process 0 also writes the maps of the first `snapshot_rows` held-out
    sequences to workdir/attention/step_N.npz (maps float32 [L, rows, H, T, T], tokens int32
    [rows, T + 1]).
    """
    directory = pathlib.Path(workdir, SNAPSHOT_DIR)

    def make(mesh):
        jitted = jax.jit(stats_fn)

        def evaluate(state):
            out = jax.device_get(jitted(state.params))
            step = int(jax.device_get(state.step))
            if step in snapshot_steps and loop.is_primary():
                directory.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(directory / f"step_{step}.npz", maps=out["maps"][:, :snapshot_rows],
                                    tokens=tokens[:snapshot_rows])
            return {f"{prefix}{i}": float(v) for name, prefix in METRICS.items() for i, v in enumerate(out[name])}

        return evaluate

    return loop.Evaluator(every, make)


def make_task(config, model, data: lm_sources.LMData, held_out: np.ndarray, loop_config: loop.LoopConfig,
              workdir: str) -> loop.Task:
    """The loop's task: next-token loss with dropout, held-out loss and the attention evaluator."""
    seq_len, micro = config.data.seq_len, loop_config.micro_batch
    loss_fn = dropout_loss(model, data.pad_id)
    usable = min(len(data.val) // micro, config.train.eval_batches) * micro
    if usable == 0:
        raise ValueError(f"the held-out data gives {len(data.val)} sequences, fewer than the micro-batch {micro}")
    eval_loss = lm.next_token_loss(model, data.pad_id)
    a = config.analysis
    stats = attention_stats(model, jnp.asarray(held_out), mass=a.mass, skip_first=a.skip_first)
    evaluators = (loop.mean_loss_evaluator(lambda params, extra, batch: eval_loss(params, batch), data.val[:usable],
                                           micro, loop_config.eval_every),
                  attention_evaluator(stats, a.every, tuple(a.snapshot_steps), a.snapshot_rows, workdir, held_out))
    return loop.Task(init_params=lambda key: attention_model.init_params(model, key, seq_len),
                     loss_fn=lambda params, extra, batch, rng: (loss_fn(params, batch, rng), {}),
                     train_batch=data.train_batch, evaluators=evaluators,
                     items_per_step=loop_config.batch_size * seq_len, item_name="tokens",
                     axis_rules=attention_model.FAMILY.axis_rules,
                     resume_sections=("model", "data", "train", "optim", "analysis"))


def curves_of(records: list[dict], num_layers: int) -> dict[str, Any]:
    """{"steps": [E], "entropy", "support", "self", "previous": [L][E], "eval_steps", "eval_loss", "train_steps",
    "train_loss"} of a run's metrics records (the evaluations that hold the attention metrics)."""
    rows = [r for r in records if f"{ENTROPY}0" in r]
    evals = [r for r in records if "eval_loss" in r]
    trains = [r for r in records if "loss" in r]
    return {"steps": [r["step"] for r in rows],
            **{name: [[r[f"{prefix}{i}"] for r in rows] for i in range(num_layers)]
               for name, prefix in METRICS.items()},
            "eval_steps": [r["step"] for r in evals], "eval_loss": [r["eval_loss"] for r in evals],
            "train_steps": [r["step"] for r in trains], "train_loss": [r["loss"] for r in trains]}


def data_name(config) -> str:
    """What the run trains on, for titles: the corpus files or tfds dataset, and the tokenizer."""
    d = config.data
    if d.source == "tfds":
        source = d.tfds_name
    else:
        source = ", ".join(os.path.basename(p) for p in d.corpus.split(",") if p) or "Tiny Shakespeare (embedded)"
    return f"{source}, {'bytes' if d.tokenizer == 'byte' else os.path.basename(d.tokenizer)}"
