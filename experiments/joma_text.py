"""JoMA on real text: per-layer attention entropy and MLP stable rank of 1- to 5-layer transformers under Adam.

    python -m experiments.joma_text --config configs/joma_text.py:layers --workdir runs/joma_text_layers
    python -m experiments.joma_text --config configs/joma_text.py:one_layer_long --workdir runs/joma_text_one_layer_long
    python -m experiments.joma_text --config configs/joma_text.py:layers_smoke --workdir runs/joma_text_layers_smoke

The real-text experiment of Tian, Wang, Zhang, Chen, Du, "JoMA" (ICLR 2024, Fig. 6 and 8; public
code `decoder_wiki.py opt.lr=1e-4 nlayers=5 num_epoch=20 seed=1 dataset=wikitext2 use_baseline=true`):
the attention entropy of every layer first falls and then rises again ("bounces back"), and the
lower MLP layer's weights become low rank. For each depth in `config.depths` this trains
`lorank.models.attention.Transformer` by Adam after global-norm clipping through the generic loop,
in workdir/depth_L (checkpoints; rerun with the same workdir to resume, depths already done are
read back), and measures every `analysis.every` steps on a fixed held-out batch each layer's mean
attention entropy and mass support (`lorank.train.attention_lm`'s attention evaluator) and the
stable rank ||W||_F^2 / ||W||_2^2 of each layer's MLP kernels `layers_i/mlp/up/kernel` (the lower
layer, PyTorch's `linear1.weight`) and `layers_i/mlp/down/kernel` (the upper one, for contrast).
It writes joma_text.json and joma_text_<variant>.png to the workdir; with `write_docs`, the
variant's block of docs/joma.md and docs/figures/joma_text_<name>.png are rewritten.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from experiments import benchlib, cli
from lorank import checks
from lorank.analysis import attention as attn_stats
from lorank.analysis import curves, plots, spectrum
from lorank.data import lm_sources
from lorank.train import attention_lm, loop, mesh as mesh_lib

DOCS_MD = benchlib.REPO_ROOT / "docs" / "joma.md"
RESULTS_FILE = "joma_text.json"
SECONDS_FILE = "train_seconds.json"  # per depth workdir: seconds spent in the loop, summed over (resumed) calls
# metric name prefixes (+ layer index): stable rank of the MLP's lower (up) and upper (down) kernel
UP_SRANK, DOWN_SRANK = "mlp_up_srank/layer_", "mlp_down_srank/layer_"
SRANKS = {"up_srank": UP_SRANK, "down_srank": DOWN_SRANK}


# ----------------------------------------------------------------------------- building blocks


def optimizer(optim_config) -> optax.GradientTransformation:
    """Global-norm clipping at `clip_norm` (0: none), then Adam(lr, b1, b2, eps) at a constant rate.

    PyTorch's `clip_grad_norm_` followed by `torch.optim.Adam` (no weight decay), as the paper's code.
    """
    o = optim_config
    checks.number("optim.lr", o.lr, low=0.0, low_open=True)
    checks.number("optim.b1", o.b1, low=0.0, high=1.0, high_open=True)
    checks.number("optim.b2", o.b2, low=0.0, high=1.0, high_open=True)
    checks.number("optim.eps", o.eps, low=0.0)
    checks.number("optim.clip_norm", o.clip_norm, low=0.0)
    adam = optax.adam(o.lr, b1=o.b1, b2=o.b2, eps=o.eps)
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adam) if o.clip_norm > 0 else adam


def mlp_kernels(params: Any, num_layers: int) -> tuple[list[jax.Array], list[jax.Array]]:
    """([up kernel [D, F] per layer], [down kernel [F, D] per layer]), lowest layer first; params plain or boxed."""
    p = nn.unbox(params)
    missing = [i for i in range(num_layers) if f"layers_{i}" not in p]
    if missing:
        raise ValueError(f"the parameters hold no block layers_{missing[0]} of the {num_layers} asked for")
    mlps = [p[f"layers_{i}"]["mlp"] for i in range(num_layers)]
    return [m["up"]["kernel"] for m in mlps], [m["down"]["kernel"] for m in mlps]


def mlp_stable_ranks(num_layers: int) -> Callable[[Any], dict[str, jax.Array]]:
    """params -> {"mlp_up_srank/layer_i", "mlp_down_srank/layer_i": stable rank of that kernel} (jit-able).

    The stable rank ||W||_F^2 / ||W||_2^2 (`lorank.analysis.spectrum.stable_rank`, float32 SVD) is
    invariant under transposition, so flax's [in, out] kernel gives the value of PyTorch's [out, in] weight.
    """
    checks.integer("num_layers", num_layers, minimum=1)

    def fn(params):
        ups, downs = mlp_kernels(params, num_layers)
        out = {}
        for prefix, kernels in ((UP_SRANK, ups), (DOWN_SRANK, downs)):
            out.update({f"{prefix}{i}": spectrum.stable_rank(k.astype(jnp.float32)) for i, k in enumerate(kernels)})
        return out

    return fn


def stable_rank_evaluator(num_layers: int, every: int) -> loop.Evaluator:
    """The stable rank of every layer's MLP kernels every `every` steps (and at step 0 and the end)."""
    return loop.params_evaluator(mlp_stable_ranks(num_layers), every)


def entropy_turn(steps: list[int], curve: list[float], threshold: float) -> dict[str, Any]:
    """Where an entropy curve turns: {"start", "min", "min_step", "end", "drop", "rise", "bounced",
    "rebound", "rebound_from", "rebound_to"}.

    `drop` = start - min and `rise` = end - min (both >= 0) for the curve's lowest value (the first
    one when there are ties); the curve "bounced" when it fell by at least `threshold` to its minimum
    before the last measurement and then rose again by at least `threshold`. `rebound` is the largest
    rise above an earlier minimum anywhere along the curve (a transient dip counts even when the curve
    falls lower later), from the step `rebound_from` of that minimum to the step `rebound_to` of the peak.
    """
    checks.number("threshold", threshold, low=0.0)
    if not curve or len(steps) != len(curve):
        raise ValueError(f"need one value per step, got {len(steps)} steps and {len(curve)} values")
    values = np.asarray(curve, np.float64)
    k = int(np.argmin(values))
    start, low, end = float(values[0]), float(values[k]), float(values[-1])
    drop, rise = start - low, end - low
    gain = values - np.minimum.accumulate(values)
    peak = int(np.argmax(gain))
    trough = int(np.argmin(values[:peak + 1]))
    return {"start": start, "min": low, "min_step": int(steps[k]), "end": end, "drop": drop, "rise": rise,
            "bounced": bool(drop >= threshold and rise >= threshold and k < len(values) - 1),
            "rebound": float(gain[peak]), "rebound_from": int(steps[trough]), "rebound_to": int(steps[peak])}


def check_config(config) -> None:
    """Refuses a config whose runs cannot be analysed, before anything is read or trained.

    Raises:
      ValueError: no depths or a bad one, a bad bounce threshold, or one of
        `lorank.train.attention_lm.check_analysis`'s errors of the analysis section.
    """
    if not config.depths:
        raise ValueError("depths is empty: give the transformer depths to train, e.g. --config.depths=(1,2,3)")
    for d in config.depths:
        checks.integer("depths entry", d, minimum=1)
    if len(set(config.depths)) != len(config.depths):
        raise ValueError(f"depths={tuple(config.depths)} repeats a depth")
    checks.number("analysis.bounce_nats", config.analysis.bounce_nats, low=0.0)
    attention_lm.check_analysis(config)


def depth_config(config, depth: int) -> ConfigDict:
    """A copy of `config` whose model has `depth` blocks (model.num_layers), as one run's config."""
    c = ConfigDict(config.to_dict())
    c.model.num_layers = depth
    return c


# ----------------------------------------------------------------------------- one depth through the loop


def train_depth(config, depth: int, data: lm_sources.LMData, held_out: np.ndarray, workdir: str, *,
                stop_at: int | None = None, log=print) -> tuple[dict[str, Any], loop.TrainState]:
    """Trains the depth-`depth` model of `config` in `workdir` (resumable); (its curves, the final state).

    The curves are `attention_lm.curves_of`'s plus "up_srank" and "down_srank" [L][E] at the same steps.
    """
    cfg = depth_config(config, depth)
    model = attention_lm.build_model(cfg)
    loop_config = loop.LoopConfig.from_config(cfg.train)
    mesh = mesh_lib.make_mesh(cfg.mesh.to_dict())
    loop.check_batch_divides_mesh(loop_config, mesh)
    task = attention_lm.make_task(cfg, model, data, held_out, loop_config, workdir)
    task = dataclasses.replace(task, evaluators=task.evaluators + (stable_rank_evaluator(depth, cfg.analysis.every),))
    o = cfg.optim
    log(f"depth {depth}: width {model.cfg.width}, {model.cfg.num_heads} head(s), norm {model.cfg.norm} | "
        f"data: {data.description} | Adam lr {o.lr:g}, clip {o.clip_norm:g}")
    start = time.perf_counter()
    state, _ = loop.run(task, optimizer(o), loop_config, mesh, workdir, config=cfg, stop_at=stop_at, log=log)
    seconds = _add_seconds(workdir, time.perf_counter() - start)
    records = curves.read_metrics(os.path.join(workdir, loop.METRICS_FILE))
    result = attention_lm.curves_of(records, depth)
    rows = [r for r in records if f"{attention_lm.ENTROPY}0" in r]
    result.update({name: [[r[f"{prefix}{i}"] for r in rows] for i in range(depth)] for name, prefix in SRANKS.items()})
    result.update(depth=depth, steps_done=int(jax.device_get(state.step)), skipped=int(jax.device_get(state.skipped)),
                  seconds=seconds)
    return result, state


def _add_seconds(workdir: str, seconds: float) -> float:
    """Adds `seconds` to the loop time recorded in `workdir` (a resumed run adds its part); the total."""
    path = pathlib.Path(workdir, SECONDS_FILE)
    total = seconds + (json.loads(path.read_text())["seconds"] if path.exists() else 0.0)
    if loop.is_primary():
        path.write_text(json.dumps({"seconds": total}) + "\n")
    return total


def summarize_depth(result: dict[str, Any], threshold: float) -> dict[str, Any]:
    """Headline numbers of one depth: per layer the entropy's turn (`entropy_turn`) and the stable ranks
    at the first, lowest and last measurement; held-out loss at the first and last."""
    steps = result["steps"]
    per_layer = []
    for i, curve in enumerate(result["entropy"]):
        layer = {"entropy": entropy_turn(steps, curve, threshold)}
        for name in SRANKS:
            s = np.asarray(result[name][i], np.float64)
            layer[name] = {"start": float(s[0]), "min": float(s.min()), "end": float(s[-1])}
        per_layer.append(layer)
    return {"depth": result["depth"], "layers": per_layer, "initial_eval_loss": result["eval_loss"][0],
            "final_eval_loss": result["eval_loss"][-1], "initial_train_loss": result["train_loss"][0],
            "final_train_loss": result["train_loss"][-1], "skipped": result["skipped"],
            "steps_done": result["steps_done"], "seconds": result["seconds"]}


# ----------------------------------------------------------------------------- figure and docs


def draw(results: list[dict], uniform_entropy: float, title: str, path: pathlib.Path) -> None:
    """One column per depth: attention entropy per layer, the MLP up kernel's stable rank per layer (the
    down kernel's dotted), and the held-out loss, against the step."""
    ncols = len(results)
    fig, axes = plots.figure(3, ncols, panel_size=(3.0 if ncols > 1 else 4.2, 2.5))
    for col, r in enumerate(results):
        ent, srank, loss_ax = axes[col], axes[ncols + col], axes[2 * ncols + col]
        steps = np.asarray(r["steps"])
        depth = r["depth"]
        colors = [f"C{i}" for i in range(depth)]
        for i in range(depth):
            ent.plot(steps, r["entropy"][i], "-", color=colors[i], lw=1.2, label=f"layer {i}")
            srank.plot(steps, r["up_srank"][i], "-", color=colors[i], lw=1.2, label=f"layer {i} up")
            srank.plot(steps, r["down_srank"][i], ":", color=colors[i], lw=1.0)
        ent.axhline(uniform_entropy, color="k", ls="--", lw=0.7, label="uniform")
        ent.set(title=f"{depth} layer{'s' * (depth > 1)}: attention entropy", xlabel="step",
                ylabel="mean entropy (nats)" if col == 0 else None)
        srank.set(title="MLP stable rank (up solid, down dotted)", xlabel="step",
                  ylabel="stable rank" if col == 0 else None)
        loss_ax.plot(r["train_steps"], r["train_loss"], lw=1, label="train")
        loss_ax.plot(r["eval_steps"], r["eval_loss"], "o-", ms=2, label="held-out")
        loss_ax.set(title="next-token loss", xlabel="step", ylabel="nats/token" if col == 0 else None)
        for ax in (ent, srank, loss_ax):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        ent.title.set_fontsize(9)
        srank.title.set_fontsize(8)
        loss_ax.title.set_fontsize(9)
    fig.suptitle(title if ncols > 2 else title.replace(" on ", "\non ", 1).replace(": ", ":\n"), fontsize=9)
    plots.save(fig, path, dpi=90)


def docs_body(summaries: list[dict], uniform_entropy: float, threshold: float) -> str:
    """Markdown: per depth and layer the entropy's start / minimum (its step) / end and the MLP stable
    ranks' start -> end; then counts of bounces and of falling up-kernel stable ranks, and the losses."""
    header = ["depth", "layer", "entropy start", "entropy min", "step of min", "entropy end", "rise after min",
              "bounce", "largest rebound (steps)", "up srank start", "up srank min", "up srank end",
              "down srank start", "down srank end"]
    rows = []
    for s in summaries:
        for i, layer in enumerate(s["layers"]):
            e, up, down = layer["entropy"], layer["up_srank"], layer["down_srank"]
            rows.append([s["depth"], i, f"{e['start']:.3f}", f"{e['min']:.3f}", e["min_step"], f"{e['end']:.3f}",
                         f"{e['rise']:.3f}", "yes" if e["bounced"] else "no",
                         f"{e['rebound']:.3f} ({e['rebound_from']} -> {e['rebound_to']})", f"{up['start']:.2f}",
                         f"{up['min']:.2f}", f"{up['end']:.2f}", f"{down['start']:.2f}", f"{down['end']:.2f}"])
    layers = [layer for s in summaries for layer in s["layers"]]
    bounced = sum(layer["entropy"]["bounced"] for layer in layers)
    rebounds = sum(layer["entropy"]["rebound"] >= threshold for layer in layers)
    dropped = sum(layer["entropy"]["drop"] >= threshold for layer in layers)
    up_falls = sum(layer["up_srank"]["end"] < layer["up_srank"]["start"] for layer in layers)
    down_falls = sum(layer["down_srank"]["end"] < layer["down_srank"]["start"] for layer in layers)
    up_ratio = np.median([layer["up_srank"]["end"] / layer["up_srank"]["start"] for layer in layers])
    down_ratio = np.median([layer["down_srank"]["end"] / layer["down_srank"]["start"] for layer in layers])
    losses = "; ".join(f"{s['depth']} layer{'s' * (s['depth'] > 1)}: {s['initial_eval_loss']:.3f} -> "
                       f"{s['final_eval_loss']:.3f}" for s in summaries)
    seconds = sum(s["seconds"] for s in summaries)
    skipped = sum(s["skipped"] for s in summaries)
    n = len(layers)
    return (benchlib.markdown_table(header, rows) + "\n\n"
            f"Uniform attention would give a mean entropy of {uniform_entropy:.3f} nats. Of the {n} "
            f"layer{'s' * (n > 1)}, {dropped} fall by at least {threshold:g} nats below their initial entropy and "
            f"{bounced} of those rise again by at least {threshold:g} nats after their minimum (a bounce); "
            f"{rebounds} rise by at least {threshold:g} nats above some earlier minimum (a transient rebound, even "
            f"if they fall lower later). The MLP's lower (up) kernel ends with a lower stable rank than it started "
            f"with in {up_falls} of {n} (median end / start {up_ratio:.3f}); the upper (down) kernel in {down_falls} "
            f"(median {down_ratio:.3f}). Held-out loss (nats/token) {losses}. {skipped} steps skipped as "
            f"non-finite; {seconds:.0f} s in the training loop in all (compilation and measurements included).\n")


def write_docs(config, body: str, figure: pathlib.Path) -> None:
    """This variant's block of docs/joma.md (under its command and machine) and its figure."""
    name = config.variant.removesuffix("_smoke")
    command = (f"python -m experiments.joma_text --config configs/joma_text.py:{config.variant} "
               f"--workdir runs/joma_text_{name}")
    benchlib.publish_figure(DOCS_MD, f"joma_text_{name}", body, command, figure)


# ----------------------------------------------------------------------------- entry point


def run(config, workdir: str, *, stop_at: int | None = None, log=print) -> dict[str, Any]:
    """Trains every depth of `config.depths` in workdir/depth_L; returns {"depths", "runs": [curves per depth],
    "summaries": [headline numbers per depth], "uniform_entropy", ...}."""
    check_config(config)
    loop_config = loop.LoopConfig.from_config(config.train)
    num_val = config.train.eval_batches * loop_config.micro_batch
    data, held_out = attention_lm.load_data(config, loop_config.batch_size, num_val)
    a = config.analysis
    uniform = attn_stats.uniform_mean_entropy(config.data.seq_len, config.model.causal, a.skip_first)
    results, summaries = [], []
    for depth in config.depths:
        result, _ = train_depth(config, depth, data, held_out, os.path.join(workdir, f"depth_{depth}"),
                                stop_at=stop_at, log=log)
        results.append(result)
        summaries.append(summarize_depth(result, a.bounce_nats))
    out = {"variant": config.variant, "depths": list(config.depths), "uniform_entropy": uniform,
           "bounce_nats": a.bounce_nats, "steps": config.train.steps, "runs": results, "summaries": summaries}
    if not loop.is_primary():
        return out
    pathlib.Path(workdir, RESULTS_FILE).write_text(json.dumps(out, indent=2) + "\n")
    figure = pathlib.Path(workdir, f"joma_text_{config.variant}.png")
    o = config.optim
    title = (f"width-{config.model.width} transformers on {attention_lm.data_name(config)}: Adam lr {o.lr:g}, "
             f"clip {o.clip_norm:g}, {config.train.steps} steps of {config.train.batch_size} x {config.data.seq_len}")
    draw(results, uniform, title, figure)
    body = docs_body(summaries, uniform, a.bounce_nats)
    log(body)
    if config.write_docs and all(s["steps_done"] == config.train.steps for s in summaries):
        write_docs(config, body, figure)
    return out


if __name__ == "__main__":
    cli.launch(run, "configs/joma_text.py:layers", resumable=True)
