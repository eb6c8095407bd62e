"""Scan&Snap on real text: does a transformer's attention become sparse under SGD?

    python -m experiments.scan_snap_text --config configs/scan_snap_text.py:one_layer --workdir runs/scan_snap_text_1
    python -m experiments.scan_snap_text --config configs/scan_snap_text.py:three_layer --workdir runs/scan_snap_text_3
    python -m experiments.scan_snap_text --config configs/scan_snap_text.py:lr_sweep --workdir runs/scan_snap_text_lr

The real-data experiment of Tian, Wang, Chen, Du, "Scan and Snap" (NeurIPS 2023, Fig. 7 and
Appendix G). `config.experiment == "train"` (variants one_layer, three_layer) trains
`lorank.models.attention.Transformer` by SGD with global-norm clipping through the generic
loop (checkpoints; rerun with the same workdir to resume) and measures, every
`analysis.every` steps on a fixed held-out batch, each layer's mean attention entropy and
mass support (`lorank.analysis.attention`); the attention maps of the held-out batch's
first sequences are saved at `analysis.snapshot_steps` (attention/step_N.npz). It writes
scan_snap_text.json and scan_snap_text_<variant>.png to the workdir. `"lr_sweep"` trains
`sweep.num_seeds` seeds at each of `sweep.lrs` (one jitted program, vmapped over seeds,
with the learning rate a traced argument so it compiles once) and writes lr_sweep.json and
its figure; each learning rate's result is kept in lr_sweep/ so a rerun of the same config
skips the learning rates already done. With `write_docs`, the variant's block of
docs/scan_snap.md and docs/figures/scan_snap_text_<name>.png are rewritten.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
import warnings
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib import colors

from experiments import benchlib, cli
from lorank import checks
from lorank.analysis import attention as attn_stats
from lorank.analysis import curves, plots
from lorank.models import attention as attention_model
from lorank.train import attention_lm, loop, mesh as mesh_lib

DOCS_MD = benchlib.REPO_ROOT / "docs" / "scan_snap.md"
RESULTS_FILE = "scan_snap_text.json"
SWEEP_FILE = "lr_sweep.json"
SWEEP_DIR = "lr_sweep"
EXPERIMENTS = ("train", "lr_sweep")


# ----------------------------------------------------------------------------- building blocks


def optimizer(optim_config, lr: Any = None) -> optax.GradientTransformation:
    """Global-norm clipping at `clip_norm` (0: none), then SGD at `lr` (default `optim.lr`; may be traced)."""
    o = optim_config
    checks.number("optim.clip_norm", o.clip_norm, low=0.0)
    checks.number("optim.momentum", o.momentum, low=0.0, high=1.0, high_open=True)
    lr = o.lr if lr is None else lr
    checks.number("learning rate", lr, low=0.0, low_open=True)
    sgd = optax.sgd(lr, momentum=o.momentum or None)
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), sgd) if o.clip_norm > 0 else sgd


def check_config(config) -> None:
    """Refuses a config that cannot run, before anything is read or trained.

    Raises:
      ValueError: an unknown experiment, a bad analysis section (`attention_lm.check_analysis`), or a
        bad learning-rate list.
    """
    checks.one_of("experiment", config.experiment, EXPERIMENTS)
    attention_lm.check_analysis(config)
    steps = config.train.steps
    if config.experiment == "lr_sweep":
        if not config.sweep.lrs:
            raise ValueError("sweep.lrs is empty: give the learning rates to sweep")
        for lr in config.sweep.lrs:
            checks.number("sweep.lrs entry", lr, low=0.0, low_open=True)
        checks.integer("sweep.num_seeds", config.sweep.num_seeds, minimum=1)
        checks.integer("sweep.eval_every", config.sweep.eval_every, minimum=1, maximum=steps)


# ----------------------------------------------------------------------------- one run through the loop


def load_snapshots(workdir: str, steps: tuple[int, ...]) -> dict[int, np.ndarray]:
    """{step: lowest layer's maps of the first held-out sequence, [H, T, T]} for the snapshots present."""
    out = {}
    for s in steps:
        path = pathlib.Path(workdir, attention_lm.SNAPSHOT_DIR, f"step_{s}.npz")
        if path.exists():
            with np.load(path) as f:
                out[s] = f["maps"][0, 0]
    return out


def draw_run(result: dict, snapshots: dict[int, np.ndarray], title: str, path: pathlib.Path) -> None:
    """Top row: the lowest layer's attention (mean over heads; colour ~ sqrt of the probability) at each
    snapshot; bottom: entropy, mass support and loss against the step."""
    ncols = max(3, len(snapshots))
    fig, axes = plots.figure(2, ncols, panel_size=(3.4, 3.0))
    for ax, (step, maps) in zip(axes[:ncols], sorted(snapshots.items())):
        ax.imshow(maps.mean(0), cmap="viridis", norm=colors.PowerNorm(0.5, vmin=0.0, vmax=1.0),
                  interpolation="nearest")
        ax.set_title(f"layer 0, step {step}", fontsize=9)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    for ax in axes[len(snapshots):ncols]:
        ax.axis("off")
    ent, sup, loss_ax = axes[ncols:ncols + 3]
    steps = np.asarray(result["steps"])
    for i, (e, s) in enumerate(zip(result["entropy"], result["support"])):
        ent.plot(steps, e, "o-", ms=2, label=f"layer {i}")
        sup.plot(steps, s, "o-", ms=2, label=f"layer {i}")
    ent.axhline(result["uniform_entropy"], color="k", ls="--", lw=0.8, label="uniform")
    sup.axhline(result["uniform_support"], color="k", ls="--", lw=0.8, label="uniform")
    ent.set(xlabel="step", ylabel="mean attention entropy (nats)", title="held-out attention entropy")
    sup.set(xlabel="step", ylabel=f"keys holding {result['mass']:.0%} of a row",
            title="attention support")
    loss_ax.plot(result["train_steps"], result["train_loss"], lw=1, label="train")
    loss_ax.plot(result["eval_steps"], result["eval_loss"], "o-", ms=2, label="held-out")
    loss_ax.set(xlabel="step", ylabel="loss (nats/token)", title="next-token loss")
    for ax in (ent, sup, loss_ax):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[ncols + 3:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    plots.save(fig, path, dpi=90)


def _per_layer(curves: list[list[float]]) -> str:
    """The last value of each layer's curve, as "0.12 / 0.34" (lowest layer first)."""
    return " / ".join(f"{c[-1]:.2f}" for c in curves)


def run_docs_body(result: dict, table_steps: tuple[int, ...]) -> str:
    """Markdown: per-layer entropy and support at `table_steps` (and the last step), and a sentence on the change."""
    steps = result["steps"]
    picked = sorted({s for s in table_steps if s in steps} | {steps[0], steps[-1]})
    num_layers = len(result["entropy"])
    header = ["step"] + [f"entropy layer {i}" for i in range(num_layers)] + \
             [f"support layer {i}" for i in range(num_layers)] + ["held-out loss"]
    loss_at = dict(zip(result["eval_steps"], result["eval_loss"]))
    rows = []
    for s in picked:
        k = steps.index(s)
        loss = loss_at.get(s)
        rows.append([s] + [f"{e[k]:.3f}" for e in result["entropy"]] + [f"{v[k]:.2f}" for v in result["support"]]
                    + [f"{loss:.3f}" if loss is not None else ""])
    first, last = result["initial_entropy"], result["final_entropy"]
    change = "; ".join(f"layer {i}: {a:.3f} -> {b:.3f} nats ({b / a:.0%} of the start)"
                       for i, (a, b) in enumerate(zip(first, last)))
    return (benchlib.markdown_table(header, rows) + "\n\n"
            f"Uniform attention would give a mean entropy of {result['uniform_entropy']:.3f} nats and a "
            f"{result['mass']:.0%}-mass support of {result['uniform_support']:.2f} keys. Mean attention entropy from "
            f"the first to the last measurement, {change}. At the last measurement the layers put "
            f"{_per_layer(result['self'])} of their attention on the query's own position and "
            f"{_per_layer(result['previous'])} on the previous token. Held-out loss "
            f"{result['initial_eval_loss']:.3f} -> {result['final_eval_loss']:.3f} nats/token; "
            f"{result['skipped']} steps skipped as non-finite; {result['seconds']:.0f} s of training.\n")


def run_training(config, workdir: str, *, stop_at: int | None = None, log=print) -> dict[str, Any]:
    """One run through the loop (resumable); returns the entropy curves and the headline numbers."""
    model = attention_lm.build_model(config)
    loop_config = loop.LoopConfig.from_config(config.train)
    mesh = mesh_lib.make_mesh(config.mesh.to_dict())
    loop.check_batch_divides_mesh(loop_config, mesh)
    tx = optimizer(config.optim)
    num_val = config.train.eval_batches * loop_config.micro_batch
    data, held_out = attention_lm.load_data(config, loop_config.batch_size, num_val)
    task = attention_lm.make_task(config, model, data, held_out, loop_config, workdir)
    log(f"{model.cfg.num_layers}-layer transformer, width {model.cfg.width}, {model.cfg.num_heads} head(s) | "
        f"data: {data.description} | SGD lr {config.optim.lr}, clip {config.optim.clip_norm}")
    start = time.perf_counter()
    state, _ = loop.run(task, tx, loop_config, mesh, workdir, config=config, stop_at=stop_at, log=log)
    seconds = time.perf_counter() - start
    records = curves.read_metrics(os.path.join(workdir, loop.METRICS_FILE))
    result = attention_lm.curves_of(records, model.cfg.num_layers)
    a, t = config.analysis, config.data.seq_len
    result.update(
        variant=config.variant, steps_done=int(jax.device_get(state.step)), skipped=int(jax.device_get(state.skipped)),
        seconds=seconds, mass=a.mass, snapshot_steps=list(a.snapshot_steps),
        uniform_entropy=attn_stats.uniform_mean_entropy(t, model.cfg.causal, a.skip_first),
        uniform_support=attn_stats.uniform_mean_mass_support(t, a.mass, model.cfg.causal, a.skip_first),
        initial_entropy=[e[0] for e in result["entropy"]], final_entropy=[e[-1] for e in result["entropy"]],
        initial_support=[s[0] for s in result["support"]], final_support=[s[-1] for s in result["support"]],
        initial_eval_loss=result["eval_loss"][0], final_eval_loss=result["eval_loss"][-1],
        initial_train_loss=result["train_loss"][0], final_train_loss=result["train_loss"][-1])
    if not loop.is_primary():
        return result
    pathlib.Path(workdir, RESULTS_FILE).write_text(json.dumps(result, indent=2) + "\n")
    figure = pathlib.Path(workdir, f"scan_snap_text_{config.variant}.png")
    title = (f"{model.cfg.num_layers}-layer transformer (width {model.cfg.width}) on {attention_lm.data_name(config)}: "
             f"SGD lr {config.optim.lr:g}, clip {config.optim.clip_norm:g}")
    draw_run(result, load_snapshots(workdir, tuple(a.snapshot_steps)), title, figure)
    body = run_docs_body(result, tuple(a.snapshot_steps))
    log(body)
    if config.write_docs and result["steps_done"] == loop_config.steps:
        write_docs(config, body, figure)
    return result


# ----------------------------------------------------------------------------- the learning-rate sweep


@dataclasses.dataclass(frozen=True)
class SweepProgram:
    """The jitted pieces of the sweep; every array has a leading seed axis S.

    init: keys [S] -> (params, opt_state).
    train: (params, opt_state, lr [], batches int [n, B, T+1], keys [S], first step []) ->
      (params, opt_state, losses [S, n], non-finite steps [S]).
    evaluate: params -> {"entropy": [S, L], "support": [S, L], "loss": [S]} on the held-out batch.
    """

    init: Callable
    train: Callable
    evaluate: Callable


def sweep_program(config, model: attention_model.Transformer, held_out: np.ndarray,
                  pad_id: int | None) -> SweepProgram:
    """`SweepProgram` for `config`: SGD with clipping at a traced learning rate, vmapped over seeds.

    Steps whose loss or gradient norm is not finite leave the seed's state unchanged and are counted,
    as in the loop. Seed s uses key fold_in(key(train.seed), s) for its initialization and
    fold_in(that key, step) for the dropout of each step; every seed sees the same batches.
    """
    loss_fn = attention_lm.dropout_loss(model, pad_id)
    a = config.analysis
    stats = attention_lm.attention_stats(model, jnp.asarray(held_out), mass=a.mass, skip_first=a.skip_first)

    def init_one(key):
        params = nn.unbox(attention_model.init_params(model, key, config.data.seq_len))
        return params, optimizer(config.optim).init(params)

    def train_one(params, opt_state, lr, batches, key, first_step):
        tx = optimizer(config.optim, lr)

        def body(carry, xs):
            params, opt_state, bad = carry
            batch, step = xs
            loss, grads = jax.value_and_grad(loss_fn)(params, batch, jax.random.fold_in(key, step))
            finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
            updates, new_opt = tx.update(grads, opt_state, params)
            new = (optax.apply_updates(params, updates), new_opt)
            params, opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, (params, opt_state))
            return (params, opt_state, bad + (~finite).astype(jnp.int32)), loss

        steps = first_step + jnp.arange(batches.shape[0])
        (params, opt_state, bad), losses = jax.lax.scan(body, (params, opt_state, jnp.zeros((), jnp.int32)),
                                                        (batches, steps))
        return params, opt_state, losses, bad

    def evaluate_one(params):
        out = stats(params)
        return {"entropy": out["entropy"], "support": out["support"], "loss": out["loss"]}

    return SweepProgram(init=jax.jit(jax.vmap(init_one)),
                        train=jax.jit(jax.vmap(train_one, in_axes=(0, 0, None, None, 0, None))),
                        evaluate=jax.jit(jax.vmap(evaluate_one)))


def sweep_one_lr(program: SweepProgram, config, lr: float, train_batch: Callable) -> dict[str, Any]:
    """Trains every seed at `lr`: {"lr", "steps": [E], "entropy": [E][S][L], "support": [E][S][L],
    "eval_loss": [E][S], "final_train_loss": [S], "nonfinite_steps": [S], "seconds"}."""
    seeds, steps, every = config.sweep.num_seeds, config.train.steps, config.sweep.eval_every
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(config.train.seed), s))(jnp.arange(seeds))
    start = time.perf_counter()
    params, opt_state = program.init(keys)
    record = {"lr": lr, "steps": [], "entropy": [], "support": [], "eval_loss": []}
    bad_total = np.zeros(seeds, np.int64)
    losses = np.full(seeds, np.nan)

    def measure(step):
        out = jax.device_get(program.evaluate(params))
        record["steps"].append(step)
        for name, key in (("entropy", "entropy"), ("support", "support"), ("eval_loss", "loss")):
            record[name].append(np.asarray(out[key], np.float64).tolist())

    measure(0)
    for first in range(0, steps, every):
        n = min(every, steps - first)
        batches = np.stack([train_batch(first + i, None) for i in range(n)])
        params, opt_state, chunk_losses, bad = program.train(params, opt_state, jnp.float32(lr), jnp.asarray(batches),
                                                             keys, jnp.int32(first))
        losses, bad_total = np.asarray(chunk_losses)[:, -1], bad_total + np.asarray(bad)
        measure(first + n)
    record.update(final_train_loss=losses.tolist(), nonfinite_steps=bad_total.tolist(),
                  seconds=time.perf_counter() - start)
    return record


def _finite_median(values: Any) -> np.ndarray:
    """Median over the leading (seed) axis of the finite values: [S, ...] -> [...] (NaN where none is finite)."""
    values = np.asarray(values, np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: every seed diverged
        return np.nanmedian(np.where(np.isfinite(values), values, np.nan), axis=0)


def _finite_extremes(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) over the leading axis of the finite values (NaN where none is finite)."""
    values = np.where(np.isfinite(values), np.asarray(values, np.float64), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmin(values, axis=0), np.nanmax(values, axis=0)


def sweep_summary(records: list[dict], uniform: float) -> dict[str, Any]:
    """The sweep's headline numbers: per learning rate the final entropy per layer (median, min, max
    over the seeds that stayed finite), the initial entropy, final held-out loss, non-finite steps."""
    out = {"lrs": [r["lr"] for r in records], "uniform_entropy": uniform, "per_lr": {}}
    for r in records:
        final = np.asarray(r["entropy"][-1], np.float64)  # [S, L]
        first = np.asarray(r["entropy"][0], np.float64)
        loss = np.asarray(r["eval_loss"][-1], np.float64)
        low, high = _finite_extremes(final)
        out["per_lr"][str(r["lr"])] = {
            "final_entropy_median": _finite_median(final).tolist(), "final_entropy_min": low.tolist(),
            "final_entropy_max": high.tolist(), "initial_entropy_median": _finite_median(first).tolist(),
            "final_eval_loss_median": float(_finite_median(loss)),
            "initial_eval_loss_median": float(_finite_median(r["eval_loss"][0])),
            "nonfinite_steps": r["nonfinite_steps"], "seconds": r["seconds"]}
    return out


def draw_sweep(records: list[dict], summary: dict, title: str, path: pathlib.Path) -> None:
    """Final entropy per layer against the learning rate (median line, seeds as dots); the lowest
    layer's entropy over training per learning rate (median and range over seeds); final loss."""
    fig, (final_ax, curve_ax, loss_ax) = plots.figure(1, 3, panel_size=(3.8, 3.1))
    lrs = np.asarray(summary["lrs"], np.float64)
    finals = np.asarray([r["entropy"][-1] for r in records], np.float64)  # [lr, S, L]
    for layer in range(finals.shape[2]):
        med = [summary["per_lr"][str(r["lr"])]["final_entropy_median"][layer] for r in records]
        (line,) = final_ax.plot(lrs, med, "o-", label=f"layer {layer}")
        for i, lr in enumerate(lrs):
            final_ax.plot(np.full(finals.shape[1], lr), finals[i, :, layer], ".", color=line.get_color(), alpha=0.5)
    final_ax.axhline(summary["uniform_entropy"], color="k", ls="--", lw=0.8, label="uniform")
    final_ax.set_xscale("log")
    final_ax.set(xlabel="SGD learning rate", ylabel="final mean attention entropy (nats)",
                 title=f"final entropy, {finals.shape[1]} seeds per lr")
    for r in records:
        curve = np.asarray(r["entropy"], np.float64)[:, :, 0].T  # [S, E]
        plots.plot_band(curve_ax, np.asarray(r["steps"]), curve, label=f"lr {r['lr']:g}")
    curve_ax.set(xlabel="step", ylabel="layer 0 entropy (nats)", title="entropy over training")
    loss = np.asarray([r["eval_loss"][-1] for r in records], np.float64)  # [lr, S]
    loss_ax.plot(lrs, [summary["per_lr"][str(r["lr"])]["final_eval_loss_median"] for r in records], "o-",
                 label="median over seeds")
    for i, lr in enumerate(lrs):
        loss_ax.plot(np.full(loss.shape[1], lr), loss[i], ".", color="C0", alpha=0.5)
    loss_ax.set_xscale("log")
    loss_ax.set(xlabel="SGD learning rate", ylabel="final held-out loss (nats/token)", title="final loss")
    for ax in (final_ax, curve_ax, loss_ax):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    plots.save(fig, path, dpi=90)


def sweep_docs_body(summary: dict, num_seeds: int) -> str:
    """Markdown: per learning rate the final entropy per layer (median [min, max] over seeds) and loss."""
    first = next(iter(summary["per_lr"].values()))
    num_layers = len(first["final_entropy_median"])
    header = ["lr"] + [f"final entropy layer {i}" for i in range(num_layers)] + \
             ["held-out loss start -> end", "non-finite steps (all seeds)"]
    rows = []
    for lr in summary["lrs"]:
        p = summary["per_lr"][str(lr)]
        cells = [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in
                 zip(p["final_entropy_median"], p["final_entropy_min"], p["final_entropy_max"])]
        rows.append([f"{lr:g}"] + cells + [f"{p['initial_eval_loss_median']:.3f} -> {p['final_eval_loss_median']:.3f}",
                                            sum(p["nonfinite_steps"])])
    start = first["initial_entropy_median"][0]
    return (benchlib.markdown_table(header, rows) + "\n\n"
            f"Median over {num_seeds} seeds [min, max]. At initialization the lowest layer's mean entropy is "
            f"{start:.3f} nats (uniform attention: {summary['uniform_entropy']:.3f}).\n")


def run_sweep(config, workdir: str, log=print) -> dict[str, Any]:
    """The learning-rate sweep; returns `sweep_summary` plus the raw records."""
    loop.check_workdir_config(config, workdir, ("model", "data", "train", "optim", "analysis", "sweep"))
    model = attention_lm.build_model(config)
    data, held_out = attention_lm.load_data(config, config.train.batch_size, config.analysis.eval_rows)
    program = sweep_program(config, model, held_out, data.pad_id)
    directory = pathlib.Path(workdir, SWEEP_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for lr in config.sweep.lrs:
        path = directory / f"lr_{lr:g}.json"
        if path.exists():
            records.append(json.loads(path.read_text()))
            log(f"lr {lr:g}: kept from {path}")
            continue
        record = sweep_one_lr(program, config, float(lr), data.train_batch)
        path.write_text(json.dumps(record) + "\n")
        log(f"lr {lr:g}: final entropy per layer (median over seeds) "
            f"{_finite_median(np.asarray(record['entropy'][-1])).round(3).tolist()} in {record['seconds']:.0f} s")
        records.append(record)
    a = config.analysis
    summary = sweep_summary(records, attn_stats.uniform_mean_entropy(config.data.seq_len, model.cfg.causal,
                                                                     a.skip_first))
    summary.update(variant=config.variant, steps=config.train.steps, num_seeds=config.sweep.num_seeds)
    pathlib.Path(workdir, SWEEP_FILE).write_text(json.dumps({**summary, "records": records}, indent=2) + "\n")
    figure = pathlib.Path(workdir, f"scan_snap_text_{config.variant}.png")
    title = (f"{model.cfg.num_layers}-layer transformer, width {model.cfg.width}, {config.train.steps} SGD steps "
             f"(clip {config.optim.clip_norm:g}) on {attention_lm.data_name(config)}")
    draw_sweep(records, summary, title, figure)
    body = sweep_docs_body(summary, config.sweep.num_seeds)
    log(body)
    if config.write_docs:
        write_docs(config, body, figure)
    return {**summary, "records": records}


# ----------------------------------------------------------------------------- entry point


def write_docs(config, body: str, figure: pathlib.Path) -> None:
    """This variant's block of docs/scan_snap.md (under its command and machine) and its figure."""
    name = config.variant.removesuffix("_smoke")
    command = (f"python -m experiments.scan_snap_text --config configs/scan_snap_text.py:{config.variant} "
               f"--workdir runs/scan_snap_text_{name}")
    benchlib.publish_figure(DOCS_MD, f"scan_snap_text_{name}", body, command, figure)


def run(config, workdir: str, *, stop_at: int | None = None, log=print) -> dict[str, Any]:
    """Runs `config.experiment` ("train" or "lr_sweep") in `workdir`; returns its headline numbers."""
    check_config(config)
    if config.experiment == "lr_sweep":
        if stop_at is not None:
            raise ValueError("--stop_at applies to the train experiment; lr_sweep resumes by learning rate")
        return run_sweep(config, workdir, log=log)
    return run_training(config, workdir, stop_at=stop_at, log=log)


if __name__ == "__main__":
    cli.launch(run, "configs/scan_snap_text.py:one_layer", resumable=True)
