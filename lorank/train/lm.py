"""Language-model pieces for the generic loop: next-token loss, the task, its step plan, sampling.

The models are LLaMA-style decoders (`lorank.models.llama`); what the generic
layers need to know about them comes from the model family (`llama.FAMILY`):
logical-axis rules, projected kernels, layer kinds, per-layer stages.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.sharding import Mesh

from lorank import checks
from lorank.analysis import grad_rank
from lorank.data import text
from lorank.models import llama
from lorank.models.family import ModelFamily
from lorank.train import loop as loop_lib, per_layer
from lorank.train.loop import LoopConfig, Task


def llama_config(model_section) -> llama.LlamaConfig:
    """The `LlamaConfig` of a config's `model` section (a ConfigDict or dict; num_kv_heads 0: num_heads)."""
    fields = dict(model_section.to_dict() if hasattr(model_section, "to_dict") else model_section)
    fields["num_kv_heads"] = fields.get("num_kv_heads") or None  # 0 in a config: as many as query heads
    return llama.LlamaConfig(**fields)


def build_llama(config) -> llama.Llama:
    """The model of `config.model` (`llama_config`), checked against `config.data.seq_len`."""
    if config.data.seq_len > config.model.max_len:
        raise ValueError(f"data.seq_len={config.data.seq_len} exceeds model.max_len={config.model.max_len}")
    return llama.Llama(llama_config(config.model))


def batch_tokens(batch) -> jax.Array:
    """The int token windows [B, T+1] of a batch: the batch itself, or its "tokens" entry."""
    return batch["tokens"] if isinstance(batch, dict) else batch


def batch_loss(logits: jax.Array, batch, pad_id: int | None = None) -> jax.Array:
    """Mean next-token cross-entropy of logits [B, T, V] on `batch`.

    `batch` is int [B, T+1] (targets x[:, 1:], those equal to `pad_id` left out) or a dict with
    "tokens" int [B, T+1] and "loss_mask" float [B, T], the weight of predicting tokens[:, t+1]
    (instruction data: 1 on response tokens, 0 on prompts and padding).
    """
    targets = batch_tokens(batch)[:, 1:]
    if isinstance(batch, dict) and "loss_mask" in batch:
        return weighted_cross_entropy(logits, targets, batch["loss_mask"])
    return mean_cross_entropy(logits, targets, pad_id)


def next_token_loss(model: nn.Module, pad_id: int | None = None) -> Callable[[dict, jax.Array], jax.Array]:
    """(params, batch) -> mean cross-entropy (nats/token) of predicting x[1:] from x[:-1] (`batch_loss`)."""

    def loss_fn(params, batch):
        return batch_loss(model.apply({"params": params}, batch_tokens(batch)[:, :-1]), batch, pad_id)

    return loss_fn


def mean_cross_entropy(logits: jax.Array, targets: jax.Array, pad_id: int | None = None) -> jax.Array:
    """Mean cross-entropy of logits [..., V] against int targets [...], leaving out targets equal to `pad_id`."""
    if pad_id is None:
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    return weighted_cross_entropy(logits, targets, (targets != pad_id).astype(jnp.float32))


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(w * CE) / max(sum(w), 1) of logits [..., V], int targets [...] and weights [...]."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    weights = weights.astype(losses.dtype)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def init_params_fn(model: nn.Module, seq_len: int = 1) -> Callable[[jax.Array], dict]:
    """key -> the model's (boxed) parameters."""
    return lambda key: model.init(key, jnp.zeros((1, seq_len), jnp.int32))["params"]


GRAD_RANK_PREFIX = "grad_stable_rank/"  # metrics of `gradient_rank_probe`: GRAD_RANK_PREFIX + layer kind


def gradient_rank_probe(loss_fn: Callable, probe_batch, layer_kind: Callable[[tuple], str | None]
                        ) -> Callable[[dict], dict[str, jax.Array]]:
    """params -> {"grad_stable_rank/<kind>": mean stable rank of that layer kind's gradients on `probe_batch`}."""
    probe_batch = jax.tree.map(jnp.asarray, probe_batch)

    def probe(params):
        grads = jax.grad(loss_fn)(params, probe_batch)
        return {GRAD_RANK_PREFIX + k: v for k, v in grad_rank.group_stable_ranks(grads, layer_kind).items()}

    return probe


def shapes_task(model: nn.Module, family: ModelFamily = llama.FAMILY) -> Task:
    """A `Task` with the model's parameters and loss but no data: for building optimizer states and
    train steps from shapes (restoring checkpoints, memory analysis)."""
    return Task(init_params=init_params_fn(model), loss_fn=loop_lib.plain_loss(next_token_loss(model)),
                train_batch=lambda step, rows=None: None, axis_rules=family.axis_rules)


def make_lm_task(model: nn.Module, train_tokens: np.ndarray, val_tokens: np.ndarray, loop: LoopConfig, *,
                 seq_len: int, eval_batches: int, data_seed: int = 0, track_grad_rank: bool = False,
                 family: ModelFamily = llama.FAMILY) -> Task:
    """A `Task` training `model` on random windows of `train_tokens`, evaluated on `val_tokens`.

    Evaluation uses the first `eval_batches` global batches of consecutive
    validation windows (all of them if fewer exist). With `track_grad_rank`,
    every evaluation also records the gradient stable rank per layer kind on the
    first validation micro-batch.
    """
    sampler = text.SequenceSampler(train_tokens, seq_len, loop.batch_size, seed=data_seed)
    return make_sequence_task(model, sampler.batch, text.eval_sequences(val_tokens, seq_len), loop,
                              seq_len=seq_len, eval_batches=eval_batches, track_grad_rank=track_grad_rank,
                              family=family)


def _first_rows(batches, count: int):
    return jax.tree.map(lambda x: x[:count], batches)


def held_out_evaluator(loss_fn: Callable, val, loop: LoopConfig, *, eval_batches: int, name: str = "eval_loss",
                       perplexity: bool = False) -> loop_lib.Evaluator:
    """`name`: the mean of `loss_fn(params, batch)` over the first `eval_batches` micro-batches of `val`
    (int [M, T+1] or a dict of such rows, `batch_loss`), every `loop.eval_every` steps; with `perplexity`
    also `name` with "loss" replaced by "perplexity": exp of that mean (of the whole held-out set, not a
    mean of per-batch perplexities).

    Raises:
      ValueError: `val` holds fewer rows than one micro-batch (the shortfall is named).
    """
    rows = len(batch_tokens(val))
    usable = (rows // loop.micro_batch) * loop.micro_batch
    if usable == 0:
        raise ValueError(f"the held-out data for {name} gives {rows} sequences, fewer than the micro-batch "
                         f"{loop.micro_batch}")
    val = _first_rows(val, min(usable, eval_batches * loop.micro_batch))
    evaluator = loop_lib.mean_loss_evaluator(lambda params, extra, batch: loss_fn(params, batch), val,
                                             loop.micro_batch, loop.eval_every, name=name)
    if not perplexity:
        return evaluator

    def make(mesh):
        evaluate = evaluator.make(mesh)

        def with_perplexity(state):
            results = evaluate(state)
            return {**results, name.replace("loss", "perplexity"): float(np.exp(results[name]))}

        return with_perplexity

    return loop_lib.Evaluator(evaluator.every, make)


def make_sequence_task(model: nn.Module, train_batch: Callable[[int, np.ndarray | None], np.ndarray], val: np.ndarray,
                       loop: LoopConfig, *, seq_len: int, eval_batches: int, pad_id: int | None = None,
                       track_grad_rank: bool = False, family: ModelFamily = llama.FAMILY,
                       perplexity: bool = False, other_val: dict | None = None,
                       init_params: Callable[[jax.Array], dict] | None = None) -> Task:
    """A `Task` training `model` on `train_batch(step, rows)` (int [rows, T+1] or a dict with "tokens" and
    "loss_mask", see `batch_loss`), evaluated on `val` (the same form, [M, ...]).

    Every `loop.eval_every` steps the task reports `eval_loss`, the mean loss over the first
    `eval_batches` micro-batches of `val` (and `eval_perplexity` with `perplexity`), `eval_loss/NAME`
    for every NAME: rows of `other_val` (e.g. the pretraining corpus, to measure forgetting), and with
    `track_grad_rank` the gradient stable rank per layer kind (`family.layer_kind`) on the first
    micro-batch of `val`. `pad_id`: targets to leave out of the loss. `init_params`: key -> boxed
    parameters (default: the model's random init; a fine-tuning run passes its pretrained weights).
    Parameters are laid out by `family.axis_rules`.
    """
    loss_fn = next_token_loss(model, pad_id)
    evaluators = [held_out_evaluator(loss_fn, val, loop, eval_batches=eval_batches, perplexity=perplexity)]
    for name, rows in (other_val or {}).items():
        evaluators.append(held_out_evaluator(loss_fn, rows, loop, eval_batches=eval_batches, name=f"eval_loss/{name}",
                                             perplexity=perplexity))
    if track_grad_rank:
        probe = gradient_rank_probe(loss_fn, _first_rows(val, loop.micro_batch), family.layer_kind)
        evaluators.append(loop_lib.params_evaluator(probe, loop.eval_every))
    return Task(
        init_params=init_params or init_params_fn(model, seq_len),
        loss_fn=loop_lib.plain_loss(loss_fn),
        train_batch=train_batch,
        evaluators=tuple(evaluators),
        items_per_step=loop.batch_size * seq_len,
        item_name="tokens",
        axis_rules=family.axis_rules,
    )


def step_plan(config, model: llama.Llama, method, mesh: Mesh, key: jax.Array, *,
              pad_id: int | None = None, family: ModelFamily = llama.FAMILY) -> loop_lib.StepPlan:
    """The `loop.StepPlan` that `config.optim.update_schedule` selects for `method` (a
    `lorank.train.methods.Method` of `model`): the per-layer plan over the family's stages of the
    next-token loss for "per_layer", `loop.joint_step_plan` otherwise ("joint", the default)."""
    if config.optim.get("update_schedule", "joint") != "per_layer":
        return loop_lib.joint_step_plan(method.task, method.tx, mesh, key)
    stages = family.stages(model.cfg, inputs_of=lambda batch: batch_tokens(batch)[:, :-1],
                           loss_of=lambda logits, batch: batch_loss(logits, batch, pad_id))
    return per_layer.step_plan(config, family, stages, method.task, mesh, key)


def generate(model: nn.Module, params, prompt: np.ndarray, length: int, *, key: jax.Array,
             temperature: float = 1.0, top_k: int = 0) -> np.ndarray:
    """Samples `length` tokens after `prompt` (int [P]) -> int [P + length].

    The context is the last `max_len` tokens; every step reruns the model on a
    fixed-size window so one compiled step serves the whole generation.
    temperature 0 means greedy decoding; top_k > 0 samples among the k likeliest.
    """
    max_len = model.cfg.max_len
    if len(prompt) == 0:
        raise ValueError("the prompt must hold at least one token")
    checks.number("temperature", temperature, low=0.0)
    window = min(max_len, len(prompt) + length)

    @jax.jit
    def next_token(params, buf, filled, key):
        # buf: [window] holds the last `filled` tokens left-aligned.
        logits = model.apply({"params": params}, buf[None, :])[0, filled - 1]
        if top_k > 0:
            kth = jax.lax.top_k(logits, top_k)[0][-1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        greedy = jnp.argmax(logits)
        sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
        return jnp.where(temperature == 0, greedy, sampled).astype(jnp.int32)

    tokens = [int(t) for t in prompt]
    for i in range(length):
        context = tokens[-window:]
        buf = np.zeros(window, np.int32)
        buf[: len(context)] = context
        token = next_token(params, jnp.asarray(buf), len(context), jax.random.fold_in(key, i))
        tokens.append(int(token))
    return np.asarray(tokens, np.int32)
