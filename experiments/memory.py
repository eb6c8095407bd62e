"""Memory of one LLaMA train step for every paper size and method: closed forms and XLA's compiled peak.

    python -m experiments.memory --config configs/memory.py:paper --workdir runs/memory
    python -m experiments.memory --config configs/memory.py:smoke --workdir runs/memory_smoke
    python -m experiments.memory --config configs/memory.py:finetune --workdir runs/memory_finetune

For each size (a variant of `model_config`: configs/llama.py, or configs/finetune.py's LLaMA-architecture
models of LLaMA-7B's and Gemma-2B's shapes for `finetune`), method (`optim.name`) and update option it reports

- closed forms from the model shapes alone: parameter, gradient (trainable parameters) and
  optimizer-state bytes (`closed_form`; docs/memory.md states the formulas), next to the
  optimizer-state bytes of `jax.eval_shape(tx.init, params)`;
- the compiled train step's memory: `jax.jit(step, donate_argnums=0).lower(abstract state,
  abstract batch int32 [1, batch, seq + 1]).compile().memory_analysis()` on one device, nothing
  allocated, so 7B compiles on a laptop: argument, output, alias and temp bytes and the peak
  estimate argument + output - alias + temp.

Update options (`UPDATES`): "global_clip" (`optim.clip_scope="global"`: one gradient norm over
all leaves gates every update), "per_leaf_clip" (`clip_scope="per_leaf"`: each leaf clipped by
its own norm), "no_clip" (`clip_norm=0`), and "per_layer" (per-leaf clipping in an explicit
per-layer schedule, `optim.update_schedule="per_layer"` (`lorank.train.per_layer`): back-propagate
group by group and update each group's weights, the embedding and LM head in row chunks, before
the next group's backward; full-rank methods and untied embeddings only, `has_step`).

Rows accumulate in WORKDIR/memory.json. With `write_docs`, the tables of docs/memory.md (between
its `BLOCK:start` / `BLOCK:end` markers, BLOCK = `docs_block`: `memory`, or `memory_finetune`
with a column per update option of whether the peak is at most `fit_bytes`) are rewritten from
them; with `write_benchmarks`, also the `memory` section of docs/benchmarks.md and
docs/bench_results/memory.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import logging

from experiments import benchlib, cli
from lorank import config_files
from lorank.models import llama
from lorank.optim import quantize
from lorank.train import lm, loop, methods, optimizers
from lorank.train import mesh as mesh_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
MEMORY_MD = REPO / "docs" / "memory.md"
UPDATES = ("global_clip", "per_leaf_clip", "no_clip", "per_layer")
# XLA CPU compiler options of `xla_scheduler`; other backends compile with their defaults.
CPU_SCHEDULERS = {
    "default": {},
    "memory_optimized": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"},
}
# The paper's (Zhao et al. 2024) memory of LLaMA 7B at 256 tokens per batch, in GB, by method here.
PAPER_7B_GB = {"adamw": 58.0, "galore8bit": 22.0}


# --------------------------------------------------------------------------- closed forms


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The LLaMA dimensions the closed forms need."""

    vocab: int  # V
    hidden: int  # d
    intermediate: int  # f
    layers: int  # L
    param_bytes: int  # bytes per stored parameter value (2 for bfloat16)
    heads: int = 1  # query heads
    kv_heads: int = 0  # key/value heads (grouped-query attention); 0: as many as query heads
    tied: bool = False  # logits from the transposed embedding, no LM head

    @property
    def kv_size(self) -> int:
        """K = kv_heads * head_dim, the output width of the k and v kernels (d without GQA)."""
        return (self.kv_heads or self.heads) * (self.hidden // self.heads)

    @classmethod
    def from_model_config(cls, model_config) -> "Shapes":
        dtype = llama.DTYPES.get(model_config.param_dtype)
        if dtype is None:
            raise ValueError(f"model.param_dtype={model_config.param_dtype!r} is not one of {sorted(llama.DTYPES)}")
        return cls(int(model_config.vocab_size), int(model_config.hidden_size),
                   int(model_config.intermediate_size), int(model_config.num_layers), jnp.dtype(dtype).itemsize,
                   heads=int(model_config.num_heads), kv_heads=int(model_config.get("num_kv_heads") or 0),
                   tied=bool(model_config.get("tie_embeddings", False)))

    def llama_config(self) -> llama.LlamaConfig:
        """The model's `llama.LlamaConfig` (shapes only), for lorank.models.llama's closed-form counts."""
        return llama.LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                                 num_heads=self.heads, num_layers=self.layers, num_kv_heads=self.kv_heads or None,
                                 tie_embeddings=self.tied)


def leaf_shapes(s: Shapes) -> list[tuple[tuple[int, ...], bool]]:
    """Every parameter of the model as (shape, is_projected_kernel): embedding [V, d]; per block two
    norms [d], q and o [d, d], k and v [d, K] (K = kv_heads * head_dim, d without grouped-query
    attention), gate/up [d, f], down [f, d]; final norm [d]; LM head [d, V] unless `s.tied`."""
    d, f, k = s.hidden, s.intermediate, s.kv_size
    block = ([((d,), False), ((d,), False), ((d, d), True), ((d, k), True), ((d, k), True), ((d, d), True)]
             + [((d, f), True)] * 2 + [((f, d), True)])
    head = [] if s.tied else [((d, s.vocab), False)]
    return [((s.vocab, d), False)] + block * s.layers + [((d,), False)] + head


def model_counts(s: Shapes, method: str, rank: int) -> tuple[int, int]:
    """(parameters, trainable parameters) of `method` by lorank.models.llama's closed forms
    (`param_count`, `lowrank_param_count`, `lora_param_count`)."""
    cfg = s.llama_config()
    if method == "lowrank":
        n = llama.lowrank_param_count(cfg, rank)
        return n, n
    if method in methods.FACTORED:
        return llama.lora_param_count(cfg, rank)
    n = llama.param_count(cfg)
    return n, n


def q8_bytes(size: int, block_size: int, param_bytes: int) -> int:
    """One 8-bit moment of `size` values: a code byte each plus a float32 scale per block, or the
    parameter dtype below quantize.MIN_SIZE values."""
    if size < quantize.MIN_SIZE:
        return size * param_bytes
    return size + 4 * math.ceil(size / block_size)


def adafactor_values(shape: tuple[int, ...]) -> int:
    """Second-moment values Adafactor keeps for `shape`: rows + cols when the second-largest
    dimension is at least 128 (factored), else one per entry."""
    if len(shape) >= 2 and sorted(shape)[-2] >= 128:
        big = sorted(shape)[-2:]
        return big[0] + big[1]
    return math.prod(shape)


def closed_form(s: Shapes, method: str, rank: int, block_size: int = 256) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes of `method` from the shapes alone.

    Conventions (what lorank stores; b = s.param_bytes; the leaves of `leaf_shapes`, so k/v
    kernels [d, K] with grouped-query attention and no LM head with tied embeddings; the
    parameter and trainable counts are checked against lorank.models.llama's, `model_counts`):
      parameters: every weight in b bytes; lowrank replaces each kernel [m, n] by factors
        [m, r] + [r, n]; lora/relora keep the frozen kernel and add the factors.
      gradients: trainable parameters in b bytes (frozen LoRA kernels have none).
      optimizer state: AdamW two moments per trainable value in b bytes; 8-bit moments
        `q8_bytes`; GaLore projects each kernel with min(m, n) > r: projector r min(m, n)
        and inner state on [r, max(m, n)] (both in b bytes, 8-bit inner moments for
        galore8bit, factored second moment for galore_adafactor), other leaves at full rank.
      Scalar counters (step counts, refresh schedules) are left out.
    Raises:
      ValueError: unknown method.
      AssertionError: the leaves disagree with lorank.models.llama's counts.
    """
    if method not in methods.METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {methods.METHODS}")
    b = s.param_bytes
    params = trainable = state = 0
    for shape, kernel in leaf_shapes(s):
        size = math.prod(shape)
        m, n = shape if len(shape) == 2 else (size, 1)
        if kernel and method in methods.FACTORED:
            factors = rank * (m + n)
            params += factors + (size if method != "lowrank" else 0)
            trainable += factors
            state += 2 * factors * b
            continue
        params += size
        trainable += size
        projected = kernel and method in optimizers.GALORE_OPTIMIZERS and min(m, n) > rank
        inner = (rank, max(m, n)) if projected else shape
        inner_size = math.prod(inner)
        state += rank * min(m, n) * b if projected else 0
        if method in ("adamw8bit", "galore8bit"):
            state += 2 * q8_bytes(inner_size, block_size, b)
        elif method == "galore_adafactor":
            state += adafactor_values(inner) * b
        elif method == "sgd":
            state += size * b
        else:
            state += 2 * inner_size * b
    if (params, trainable) != model_counts(s, method, rank):
        raise AssertionError(f"leaf_shapes gives {(params, trainable)} (parameters, trainable) for {method}, "
                             f"lorank.models.llama {model_counts(s, method, rank)}")
    return {"param_bytes": params * b, "grad_bytes": trainable * b, "optimizer_state_bytes": state,
            "params": params, "trainable": trainable}


# --------------------------------------------------------------------------- compiled step


def size_config(config, size: str, method: str, update: str):
    """The training config of `size` (a variant of `config.model_config`) for `method` and `update`.

    The model takes `config.dtype` for parameters and compute and `config.remat`, the step one batch of
    `config.batch_size` sequences (no gradient accumulation); clipping follows `update` (UPDATES).
    """
    if update not in UPDATES:
        raise ValueError(f"unknown update option {update!r}; expected one of {UPDATES}")
    if method not in methods.METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {methods.METHODS}")
    c = config_files.load(config.model_config, size)
    c.model.dtype = c.model.param_dtype = config.dtype
    c.model.remat = config.remat
    c.data.seq_len = int(config.seq_len)
    c.train.batch_size = int(config.batch_size)
    c.train.grad_accum = 1  # the measured step takes one batch [1, batch_size, seq_len + 1]
    c.model.max_len = max(int(c.model.max_len), int(config.seq_len))
    c.optim.name = method
    if update == "no_clip":
        c.optim.clip_norm = 0.0
    c.optim.clip_scope = "global" if update == "global_clip" else "per_leaf"
    c.optim.update_schedule = "per_layer" if update == "per_layer" else "joint"
    c.optim.update_chunk = int(config.update_chunk)
    return c


def memory_stats(compiled) -> dict[str, int]:
    """argument, output, alias and temp bytes of a compiled executable and the peak estimate
    argument + output - alias + temp (donated inputs reused by outputs are counted once)."""
    ma = compiled.memory_analysis()
    out = {"argument": int(ma.argument_size_in_bytes), "output": int(ma.output_size_in_bytes),
           "alias": int(ma.alias_size_in_bytes), "temp": int(ma.temp_size_in_bytes)}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def compiler_options(scheduler: str) -> dict[str, Any]:
    """XLA options for `scheduler` (a key of CPU_SCHEDULERS) on this backend."""
    if scheduler not in CPU_SCHEDULERS:
        raise ValueError(f"unknown xla_scheduler {scheduler!r}; expected one of {sorted(CPU_SCHEDULERS)}")
    return CPU_SCHEDULERS[scheduler] if jax.default_backend() == "cpu" else {}


def compile_step(step: Callable, abstract_state: Any, abstract_batch: Any, options: dict[str, Any]):
    """`jax.jit(step, donate_argnums=0)` lowered for abstract inputs and compiled; (compiled, seconds)."""
    start = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=0).lower(abstract_state, abstract_batch)
    compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    return compiled, time.perf_counter() - start


# --------------------------------------------------------------------------- one measurement


def one_device_mesh():
    return mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])


def abstract_step(c, method: methods.Method, model: llama.Llama) -> tuple[Callable, loop.TrainState]:
    """(step, abstract state) of the train step training config `c` runs for `method`, on one device."""
    plan = lm.step_plan(c, model, method, one_device_mesh(), jax.random.key(0))
    return plan.step, plan.abstract_state


def has_step(c, method_name: str, update: str) -> bool:
    """Whether `update` applies: the per-layer step needs a full-rank method (the factored ones train
    factors, not the model's weights) and untied embeddings (`llama.per_layer_stages`)."""
    if update != "per_layer":
        return True
    return method_name not in methods.FACTORED and not bool(c.model.get("tie_embeddings", False))


def measure(config, size: str, method_name: str, update: str, *, compile_step_too: bool = True) -> dict[str, Any]:
    """Closed forms, shape-derived sizes and (unless `compile_step_too` is False, or the update
    option does not apply to the method and model, `has_step`) the compiled step's memory for one
    configuration.

    Returns:
      {"size", "method", "update", "closed": closed_form(...), "params", "trainable",
       "param_bytes", "optimizer_state_bytes" (from eval_shape), "compiled": memory_stats(...)
       or None, "compile_seconds", "compile_skipped": whether a step that applies was left
       uncompiled}.
    """
    c = size_config(config, size, method_name, update)
    model = lm.build_llama(c)
    method = methods.build_method(c, lm.shapes_task(model), llama.FAMILY)
    report = methods.parameter_report(method)
    closed = closed_form(Shapes.from_model_config(c.model), method_name, int(c.optim.rank), int(c.optim.block_size))
    row = {"size": size, "method": method_name, "update": update, "rank": int(c.optim.rank), "closed": closed,
           "params": report["total"], "trainable": report["trainable"], "param_bytes": report["param_bytes"],
           "optimizer_state_bytes": report["optimizer_state_bytes"], "compiled": None, "compile_seconds": None,
           "compile_skipped": not compile_step_too and has_step(c, method_name, update)}
    if not compile_step_too or not has_step(c, method_name, update):
        return row
    step, abstract_state = abstract_step(c, method, model)
    batch = jax.ShapeDtypeStruct((1, int(config.batch_size), int(config.seq_len) + 1), jnp.int32)
    compiled, seconds = compile_step(step, abstract_state, batch, compiler_options(config.xla_scheduler))
    row["compiled"] = memory_stats(compiled)
    row["compile_seconds"] = seconds
    logging.info("%s %s %s: peak %.3f GB (temp %.3f GB), compiled in %.0f s", size, method_name, update,
                 row["compiled"]["peak"] / 1e9, row["compiled"]["temp"] / 1e9, seconds)
    return row


# --------------------------------------------------------------------------- tables and run


def row_key(row: dict[str, Any]) -> tuple:
    return row["size"], row["method"], row["update"], row.get("xla_scheduler")


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` with every row of the same (size, method, update, scheduler) as a `new` row replaced."""
    replaced = {row_key(r) for r in new}
    return [r for r in old if row_key(r) not in replaced] + list(new)


def _gb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e9:.3f}"


def sizes_table(rows: list[dict]) -> str:
    """Markdown: closed forms per (size, method), GB = 1e9 bytes."""
    seen, body = set(), []
    for r in rows:
        if (r["size"], r["method"]) in seen:
            continue
        seen.add((r["size"], r["method"]))
        c = r["closed"]
        body.append([r["size"], r["method"], f"{c['params'] / 1e6:.1f}", f"{c['trainable'] / 1e6:.1f}",
                     _gb(c["param_bytes"]), _gb(c["grad_bytes"]), _gb(c["optimizer_state_bytes"]),
                     _gb(r["optimizer_state_bytes"]),
                     _gb(c["param_bytes"] + c["grad_bytes"] + c["optimizer_state_bytes"])])
    header = ["size", "method", "params (M)", "trainable (M)", "params GB", "grads GB", "opt. state GB",
              "opt. state GB (eval_shape)", "params + grads + state GB"]
    return benchlib.markdown_table(header, body)


def fits(peak: int, fit_bytes: int) -> str:
    """"yes" when a compiled peak of `peak` bytes is at most `fit_bytes`, else "no"."""
    return "yes" if peak <= fit_bytes else "no"


def peaks_table(rows: list[dict], updates: tuple[str, ...], fit_bytes: int = 0) -> str:
    """Markdown: compiled peak (temp) in GB per (size, method) and update option; with `fit_bytes`,
    also per update option whether the peak is at most `fit_bytes` bytes ("not compiled": the row
    has closed forms only; "n/a": the update option does not apply)."""
    cells: dict[tuple[str, str], dict[str, str]] = {}
    fit: dict[tuple[str, str], dict[str, str]] = {}
    args: dict[tuple[str, str], str] = {}
    for r in rows:
        key = (r["size"], r["method"])
        cells.setdefault(key, {})
        fit.setdefault(key, {})
        if r["compiled"] is not None:
            m = r["compiled"]
            cells[key][r["update"]] = f"{_gb(m['peak'])} ({_gb(m['temp'])})"
            fit[key][r["update"]] = fits(m["peak"], fit_bytes)
            args.setdefault(key, _gb(m["argument"]))
        else:
            missing = "not compiled" if r.get("compile_skipped") else "n/a"
            cells[key].setdefault(r["update"], missing)
            fit[key].setdefault(r["update"], missing)
    header = ["size", "method", "arguments GB"] + [f"{u} peak (temp) GB" for u in updates]
    body = [[size, method, args.get((size, method), "")] + [cells[(size, method)].get(u, "") for u in updates]
            for size, method in cells]
    if fit_bytes:
        header += [f"{u} peak <= {fit_bytes / 1e9:g} GB" for u in updates]
        for line, (size, method) in zip(body, cells):
            line += [fit[(size, method)].get(u, "") for u in updates]
    return benchlib.markdown_table(header, body)


def paper_comparison(rows: list[dict]) -> str:
    """One line per method of PAPER_7B_GB with 7B rows: the paper's figure and the lowest compiled peak."""
    lines = []
    for method, paper_gb in PAPER_7B_GB.items():
        measured = [r for r in rows if r["size"] == "7b" and r["method"] == method and r["compiled"]]
        if measured:
            best = min(measured, key=lambda r: r["compiled"]["peak"])
            lines.append(f"- 7B {method}: paper {paper_gb:.1f} GB; lowest compiled peak here "
                         f"{_gb(best['compiled']['peak'])} GB ({best['compiled']['peak'] / 2**30:.2f} GiB, "
                         f"`{best['update']}`)")
    return "\n".join(lines)


def _order(row: dict) -> tuple:
    sizes = ("smoke", "tiny", "60m", "130m", "350m", "1b", "7b", "llama_7b", "gemma_2b")
    size = sizes.index(row["size"]) if row["size"] in sizes else len(sizes)
    return size, row["size"], methods.METHODS.index(row["method"]), UPDATES.index(row["update"])


def tables_markdown(rows: list[dict], fit_bytes: int = 0) -> str:
    """The commands that measured `rows`, the closed-form table and the compiled-peak table (with
    `fit_bytes`, its columns of whether each peak is at most that many bytes)."""
    rows = sorted(rows, key=_order)
    updates = tuple(u for u in UPDATES if any(r["update"] == u for r in rows))
    schedulers = ", ".join(sorted({f"`{r.get('xla_scheduler')}`" for r in rows}))
    commands = "\n".join(f"    {c}" for c in sorted({r.get("command", "") for r in rows}))
    return (f"Rows measured by\n\n{commands}\n\n**Closed forms** (GB = 1e9 bytes)\n\n{sizes_table(rows)}\n\n"
            f"**Compiled train step**: peak (temp) = argument + output - alias + temp, GB = 1e9 bytes; "
            f"XLA scheduler {schedulers}\n\n{peaks_table(rows, updates, fit_bytes)}\n\n"
            f"{paper_comparison(rows)}").strip()


def write_memory_md(tables_md: str, path: pathlib.Path = MEMORY_MD, block: str = "memory") -> None:
    """Replaces the text between `<!-- BLOCK:start -->` and `<!-- BLOCK:end -->` of docs/memory.md."""
    benchlib.write_measured_block(path, block, tables_md)


def command_line(config, variant: str | None = None) -> str:
    """The command that measures `config`: the variant (`config.variant`) plus every field that
    differs from it, and the variant's workdir (runs/memory, runs/memory_VARIANT)."""
    variant = variant or config.get("variant", "paper")
    base = config_files.load("configs/memory.py", variant)
    parts = [f"python -m experiments.memory --config configs/memory.py:{variant}"]
    for field in ("sizes", "methods", "updates", "dtype", "remat", "batch_size", "seq_len", "update_chunk",
                  "xla_scheduler", "compile"):
        value = config[field]
        if value == base[field]:
            continue
        if isinstance(value, (tuple, list)):
            value = value[0] if len(value) == 1 else f'"{tuple(value)!r}"'
        parts.append(f"--config.{field}={value}")
    workdir = "runs/memory" if variant == "paper" else f"runs/memory_{variant}"
    return " ".join(parts) + f" --workdir {workdir}"


def check_config(config) -> None:
    """Unknown sizes, methods, update options or scheduler fail before anything is compiled."""
    unknown = [u for u in config.updates if u not in UPDATES]
    if unknown:
        raise ValueError(f"unknown update options {unknown}; expected some of {UPDATES}")
    unknown = [m for m in config.methods if m not in methods.METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {methods.METHODS}")
    compiler_options(config.xla_scheduler)
    for size in config.sizes:
        try:
            config_files.load(config.model_config, size)
        except ValueError as err:
            raise ValueError(f"unknown size {size!r}: {err}") from None


def run(config, workdir) -> dict[str, Any]:
    """Measures every (size, method, update) of `config`; merges the rows into workdir/memory.json.

    Returns:
      {"rows": the merged rows}. With `config.write_docs`, the tables of docs/memory.md (its
      `config.docs_block` markers) are rewritten from the merged rows; with
      `config.write_benchmarks`, also the `memory` section of docs/benchmarks.md and
      docs/bench_results/memory.json.
    """
    check_config(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in config.sizes:
        for method_name in config.methods:
            for update in config.updates:
                row = measure(config, size, method_name, update, compile_step_too=bool(config.compile))
                row["xla_scheduler"] = config.xla_scheduler
                row["command"] = command_line(config)
                rows.append(row)
                peak = row["compiled"]["peak"] if row["compiled"] else None
                print(f"{size:>6} {method_name:>16} {update:>13}: params {_gb(row['param_bytes'])} GB, "
                      f"state {_gb(row['optimizer_state_bytes'])} GB, peak {_gb(peak) or 'n/a'} GB", flush=True)
    path = workdir / "memory.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    merged = merge_rows(old, rows)
    path.write_text(json.dumps({"rows": merged}, indent=2) + "\n")
    tables = tables_markdown(merged, int(config.get("fit_bytes", 0)))
    print(tables)
    command = command_line(config)
    if config.write_docs:
        write_memory_md(tables, block=config.get("docs_block", "memory"))
    if config.write_benchmarks:
        benchlib.write_section("memory", command, tables, {"rows": merged})
    return {"rows": merged}


if __name__ == "__main__":
    cli.launch(run, "configs/memory.py:paper")
