"""GaLore benchmarks: step overhead, other implementations, state bytes, randomized SVD, sign handling.

    python -m experiments.bench_galore                 # full CPU variant (~11 minutes on 2 cores)
    python -m experiments.bench_galore --smoke         # seconds; small shapes, nothing written
    python -m experiments.bench_galore --sections svd,bytes

Sections (each its own part `bench_galore_<name>` of docs/benchmarks.md, raw numbers in
docs/bench_results/bench_galore_<name>.json, so sections can be rerun alone):
  bytes   optimizer-state bytes of the paper's 60M..7B LLaMA configs via jax.eval_shape, each
          against its closed form (AdamW, GaLore std / reverse_std, optax.contrib.galore, 8-bit GaLore).
  step    full train step (forward, backward, update) of the 60M-width LLaMA, GaLore / AdamW,
          refresh amortized over T = 200.
  optax   lorank GaLore optimizer step vs optax.contrib.galore at the same placement (reverse_std).
  torch   lorank GaLore optimizer step vs galore-torch's GaLoreAdamW (torch CPU), same shapes.
  svd     randomized vs exact SVD refresh of a real 4096 x 11008 LLaMA gradient (the up_proj
          kernel of a 7B-width layer) at ranks 128, 512, 1024: time and captured energy; plus the
          energy at rank 128 on every projected gradient of the 60M model.
  signs   byte-level LM training with frequent refreshes: canonical signs vs aligned signs vs
          first-moment re-projection vs adaptive (lazy) refresh, against AdamW.

All timings are medians of interleaved repeats, reported as ratios measured in the same run.
"""

from __future__ import annotations

import os

# jaxlib's CPU SVD and QR call LAPACK from scipy's OpenBLAS. Its worker threads compete with XLA's
# for the cores, and on a busy 2-core machine small SVDs slow down by orders of magnitude. One thread each.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from experiments import benchlib  # noqa: E402
from lorank.data import text  # noqa: E402
from lorank.models import llama  # noqa: E402
from lorank.models.llama import Llama, LlamaConfig, param_count  # noqa: E402
from lorank.optim import (ProjectorState, find_galore_states, galore_adamw, galore_adamw_8bit,  # noqa: E402
                          galore_metrics, tree_nbytes)
from lorank.optim import svd as svd_lib  # noqa: E402

SECTIONS = ("bytes", "step", "optax", "torch", "svd", "signs")
# The paper's configurations (hidden, intermediate, heads, layers) and GaLore ranks.
PAPER = {
    "60M": (512, 1376, 8, 8, 128),
    "130M": (768, 2048, 12, 12, 256),
    "350M": (1024, 2736, 16, 24, 256),
    "1B": (2048, 5461, 32, 24, 512),
    "7B": (4096, 11008, 32, 32, 1024),
}
VOCAB, SEQ, GAP = 32000, 256, 200


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each fn, timed round-robin so load changes hit all of them alike."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(benchlib.time_fn(fn, repeats=1, warmup=0))
    return {k: float(np.median(v)) for k, v in times.items()}


def llama_config(name: str, layers: int | None = None, vocab: int = VOCAB) -> LlamaConfig:
    d, f, h, n_layers, _ = PAPER[name]
    return LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=f, num_heads=h,
                       num_layers=layers or n_layers, max_len=SEQ)


def abstract_params(cfg: LlamaConfig) -> Any:
    """jax.ShapeDtypeStruct params of the model: no allocation."""
    boxed = jax.eval_shape(lambda: Llama(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    return nn.meta.unbox(boxed)["params"]


def real_params(cfg: LlamaConfig, seed: int = 0) -> Any:
    init = jax.jit(lambda k: nn.meta.unbox(Llama(cfg).init(k, jnp.zeros((1, 8), jnp.int32)))["params"])
    return init(jax.random.PRNGKey(seed))


def corpus_batches(batch: int, seq: int, seed: int):
    """Random windows of the embedded Tiny Shakespeare as byte tokens: step -> int32 [batch, seq + 1]."""
    data = text.ByteTokenizer().encode(text.read_corpus())
    cut = int(0.9 * len(data))
    train, valid = data[:cut], data[cut:]

    def sample(split, step):
        rng = np.random.default_rng((seed, step))
        starts = rng.integers(0, len(split) - seq - 1, size=batch)
        return jnp.asarray(np.stack([split[s:s + seq + 1] for s in starts]).astype(np.int32))

    return (lambda step: sample(train, step)), (lambda step: sample(valid, 10**6 + step))


def lm_loss(model: Llama):
    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return loss


# --------------------------------------------------------------------------- state bytes


def q_bytes(size: int, block: int = 256, min_size: int = 4096) -> int:
    """One 8-bit moment: codes + float32 block scales, or float32 below min_size."""
    return size + 4 * math.ceil(size / block) if size >= min_size else 4 * size


def closed_forms(name: str) -> dict[str, int]:
    """Optimizer-state bytes from the configuration alone."""
    d, f, _, layers, r = PAPER[name]
    matrices = layers * ([(d, d)] * 4 + [(d, f)] * 2 + [(f, d)])  # projected: attn + mlp kernels
    others = [VOCAB * d, d * VOCAB, d] + [d, d] * layers  # embedding, lm head, final norm, 2 norms per layer
    p_total = param_count(llama_config(name))
    assert p_total == sum(m * n for m, n in matrices) + sum(others)
    int32 = 4
    out = {"AdamW": 8 * p_total + int32}  # mu, nu float32; Adam count
    full_rank_adam = 8 * sum(others)
    galore_scalars = 3 * int32 + len(matrices) * 4 * int32 + int32  # count, nonfinite, last; per leaf; Adam count
    out["GaLore std"] = (sum(4 * r * min(m, n) + 8 * r * max(m, n) for m, n in matrices)
                         + full_rank_adam + galore_scalars)
    out["GaLore reverse_std"] = (sum(4 * r * max(m, n) + 8 * r * min(m, n) for m, n in matrices)
                                 + full_rank_adam + galore_scalars)
    out["optax.contrib.galore"] = (sum(4 * r * max(m, n) + 8 * r * min(m, n) for m, n in matrices)
                                   + full_rank_adam + 2 * int32)
    out["8-bit GaLore std"] = (sum(4 * r * min(m, n) + 2 * q_bytes(r * max(m, n)) for m, n in matrices)
                               + sum(2 * q_bytes(s) for s in others) + galore_scalars)
    return out


def measured_bytes(name: str) -> dict[str, int]:
    params = abstract_params(llama_config(name))
    mask = llama.galore_mask(params)
    r = PAPER[name][4]
    dims = jax.tree.map(lambda sel: optax.contrib.GaLoreDimensionNumbers() if sel else None, mask)
    txs = {
        "AdamW": optax.adamw(1e-3),
        "GaLore std": galore_adamw(1e-3, r, galore_mask=mask),
        "GaLore reverse_std": galore_adamw(1e-3, r, proj_type="reverse_std", galore_mask=mask),
        "optax.contrib.galore": optax.contrib.galore(1e-3, r, weight_dimension_numbers=dims),
        "8-bit GaLore std": galore_adamw_8bit(1e-3, r, galore_mask=mask),
    }
    return {k: tree_nbytes(jax.eval_shape(tx.init, params)) for k, tx in txs.items()}


def section_bytes(args) -> tuple[str, dict]:
    names = ["60M", "130M"] if args.smoke else list(PAPER)
    rows, results = [], {}
    for name in names:
        log(f"bytes {name}")
        measured, expected = measured_bytes(name), closed_forms(name)
        results[name] = {"params": param_count(llama_config(name)), "measured": measured, "closed_form": expected}
        for k in measured:
            assert measured[k] == expected[k], (name, k, measured[k], expected[k])
        rows.append([name, f"{param_count(llama_config(name)) / 1e6:.1f}M", PAPER[name][4]]
                    + [f"{measured[k] / 2**30:.3f}" for k in measured]
                    + [f"{measured['8-bit GaLore std'] / measured['AdamW']:.3f}"])
    header = ["model", "params", "rank"] + [f"{k} (GiB)" for k in measured] + ["8-bit GaLore / AdamW"]
    body = ("Optimizer-state bytes from `jax.eval_shape(tx.init, params)` of `lorank.models.llama` at the "
            "paper's shapes (vocab 32000), attention and MLP kernels projected "
            "(`lorank.models.llama.galore_mask`), everything else full-rank Adam. Every figure equals its closed form "
            "(computed from the shapes alone in the benchmark; the run asserts equality): AdamW 8P; GaLore "
            "per projected [m, n]: std 4r min(m,n) + 8r max(m,n), reverse_std and optax.contrib.galore "
            "4r max(m,n) + 8r min(m,n); 8-bit: codes + float32 scale per 256 values for moments of at "
            "least 4096 values.\n\n" + benchlib.markdown_table(header, rows))
    return body, results


# --------------------------------------------------------------------------- train step


def section_step(args) -> tuple[str, dict]:
    layers = 2 if args.smoke else args.layers
    cfg = llama_config("60M", layers=layers)
    if args.smoke:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_heads=4, num_layers=2,
                          max_len=64)
    batch, seq = (2, 64) if args.smoke else (args.batch, SEQ)
    model = Llama(cfg)
    params = real_params(cfg)
    train, _ = corpus_batches(batch, seq, seed=0)
    tokens = train(0)
    loss = lm_loss(model)
    rank = 32 if args.smoke else 128
    txs = {"AdamW": optax.adamw(1e-3),
           "GaLore": galore_adamw(1e-3, rank, GAP, galore_mask=llama.galore_mask),
           "GaLore randomized": galore_adamw(1e-3, rank, GAP, galore_mask=llama.galore_mask, svd="randomized")}
    fns = {}
    for name, tx in txs.items():
        log(f"step: compile {name}")

        def step(params, state, tokens, tx=tx):
            value, grads = jax.value_and_grad(loss)(params, tokens)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, value

        step = jax.jit(step)
        s0 = tx.init(params)
        _, s1, _ = jax.block_until_ready(step(params, s0, tokens))  # compile + first (refresh) step
        fns[name] = (step, s0, s1)
    repeats = 2 if args.smoke else args.repeats
    log("step: timing")
    steady = interleaved({k: (lambda f=f: f[0](params, f[2], tokens)) for k, f in fns.items()}, repeats)
    refresh = interleaved({k: (lambda f=f: f[0](params, f[1], tokens)) for k, f in fns.items() if k != "AdamW"},
                          max(1, repeats // 2))
    rows, results = [], {"config": {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "batch": batch,
                                    "seq": seq, "rank": rank, "T": GAP}, "steady_s": steady, "refresh_s": refresh}
    base = steady["AdamW"]
    rows.append(["AdamW", base, "-", base, 1.0])
    for k in refresh:
        amortized = ((GAP - 1) * steady[k] + refresh[k]) / GAP
        results[f"{k} / AdamW"] = amortized / base
        rows.append([k, steady[k], refresh[k], amortized, amortized / base])
    body = (f"Train step (forward, backward, update; one jitted function) of `lorank.models.llama` at the 60M "
            f"width (hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, {cfg.num_layers} layers, "
            f"vocab {cfg.vocab_size}), batch {batch} x {seq} tokens, GaLore rank {rank} on attention and MLP "
            f"kernels, T = {GAP}. Amortized = ((T - 1) steady + refresh) / T. Target: GaLore / AdamW <= 1.10.\n\n"
            + benchlib.markdown_table(["optimizer", "steady step (s)", "refresh step (s)", "amortized (s)",
                                       "/ AdamW"], rows))
    return body, results


# --------------------------------------------------------------------------- optimizer step vs others


def update_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state
    return jax.jit(step)


def optimizer_setup(args):
    if args.smoke:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_heads=4, num_layers=2,
                          max_len=64)
        rank = 32
    else:
        cfg, rank = llama_config("60M"), PAPER["60M"][4]
    params = real_params(cfg)
    key = jax.random.PRNGKey(1)
    grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(jax.random.fold_in(key, p.size), p.shape), params)
    return cfg, rank, params, grads


def time_jax_optimizers(txs: dict, params, grads, repeats: int) -> tuple[dict, dict]:
    fns = {}
    for name, tx in txs.items():
        log(f"compile {name}")
        step = update_step(tx)
        s0 = tx.init(params)
        _, s1 = jax.block_until_ready(step(params, s0, grads))
        fns[name] = (step, s0, s1)
    steady = interleaved({k: (lambda f=f: f[0](params, f[2], grads)) for k, f in fns.items()}, repeats)
    refresh = interleaved({k: (lambda f=f: f[0](params, f[1], grads)) for k, f in fns.items()},
                          max(1, repeats // 2))
    return steady, refresh


def section_optax(args) -> tuple[str, dict]:
    cfg, rank, params, grads = optimizer_setup(args)
    mask = llama.galore_mask(params)
    dims = jax.tree.map(lambda sel: optax.contrib.GaLoreDimensionNumbers() if sel else None, mask)
    txs = {"optax.contrib.galore": optax.contrib.galore(1e-3, rank, GAP, scale=0.25, weight_dimension_numbers=dims),
           "lorank reverse_std": galore_adamw(1e-3, rank, GAP, proj_type="reverse_std", galore_mask=mask),
           "lorank reverse_std randomized": galore_adamw(1e-3, rank, GAP, proj_type="reverse_std",
                                                         galore_mask=mask, svd="randomized")}
    steady, refresh = time_jax_optimizers(txs, params, grads, 2 if args.smoke else args.repeats)
    amort = {k: ((GAP - 1) * steady[k] + refresh[k]) / GAP for k in txs}
    base = amort["optax.contrib.galore"]
    rows = [[k, steady[k], refresh[k], amort[k], amort[k] / base] for k in txs]
    body = (f"Optimizer step (update + apply) on the 60M model's parameters ({cfg.num_layers} layers), rank "
            f"{rank}, projector on the larger dimension in both (optax.contrib.galore's placement = "
            f"reverse_std), same parameters selected, T = {GAP}. Target: lorank / optax.contrib <= 1.0.\n\n"
            + benchlib.markdown_table(["optimizer", "steady (s)", "refresh (s)", "amortized (s)",
                                       "/ optax.contrib"], rows))
    return body, {"steady_s": steady, "refresh_s": refresh, "amortized_s": amort,
                  "ratio": {k: amort[k] / base for k in txs}}


TORCH_WORKER = r"""
import json, sys, time
import numpy as np
import torch
from galore_torch import GaLoreAdamW
spec = json.loads(sys.stdin.read())
torch.manual_seed(0)
torch.set_num_threads(spec["threads"])
params = [torch.nn.Parameter(0.02 * torch.randn(*shape)) for shape, _ in spec["leaves"]]
for p in params:
    p.grad = 1e-3 * torch.randn_like(p)
galore = [p for p, (_, sel) in zip(params, spec["leaves"]) if sel]
groups = [{"params": [p for p, (_, sel) in zip(params, spec["leaves"]) if not sel]},
          {"params": galore, "rank": spec["rank"], "update_proj_gap": spec["gap"], "scale": 0.25,
           "proj_type": "std"}]
opt = GaLoreAdamW(groups, lr=1e-3, weight_decay=0.0, no_deprecation_warning=True)
opt.step()  # state allocation and the step-0 refresh

def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start

def refresh():
    for p in galore:
        opt.state[p]["step"] = spec["gap"]  # the next project() sees iter % T == 0
    opt.step()

steady = [timed(opt.step) for _ in range(spec["repeats"])]
fresh = [timed(refresh) for _ in range(max(1, spec["repeats"] // 2))]
print(json.dumps({"steady": float(np.median(steady)), "refresh": float(np.median(fresh)),
                  "torch": torch.__version__, "threads": torch.get_num_threads()}))
"""


def section_torch(args) -> tuple[str, dict]:
    """galore-torch runs in its own process: torch's OpenMP threads and XLA's must not share one."""
    import importlib.util
    import json
    import subprocess

    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("galore_torch") is None:
        return "Skipped: torch and galore-torch are not installed.", {"skipped": True}
    cfg, rank, params, grads = optimizer_setup(args)
    mask = llama.galore_mask(params)
    leaves = [[list(p.shape), bool(m)] for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))]
    repeats = 2 if args.smoke else args.repeats
    log("torch: galore-torch in a subprocess")
    spec = {"leaves": leaves, "rank": rank, "gap": GAP, "repeats": repeats, "threads": os.cpu_count() or 1}
    out = subprocess.run([sys.executable, "-c", TORCH_WORKER], input=json.dumps(spec), capture_output=True,
                         text=True, check=True)
    torch_res = json.loads(out.stdout.strip().splitlines()[-1])
    log("torch: lorank")
    jax_tx = galore_adamw(1e-3, rank, GAP, galore_mask=mask)
    step = update_step(jax_tx)
    s0 = jax_tx.init(params)
    _, s1 = jax.block_until_ready(step(params, s0, grads))
    steady = {"galore-torch": torch_res["steady"],
              "lorank": interleaved({"x": lambda: step(params, s1, grads)}, repeats)["x"]}
    refresh = {"galore-torch": torch_res["refresh"],
               "lorank": interleaved({"x": lambda: step(params, s0, grads)}, max(1, repeats // 2))["x"]}
    amort = {k: ((GAP - 1) * steady[k] + refresh[k]) / GAP for k in steady}
    rows = [[k, steady[k], refresh[k], amort[k], amort[k] / amort["galore-torch"]] for k in steady]
    body = (f"Optimizer step on the 60M model's parameter shapes ({cfg.num_layers} layers), rank {rank}, "
            f"proj_type std, T = {GAP}: lorank `galore_adamw` (jitted update + apply, float32) vs galore-torch "
            f"GaLoreAdamW.step() on torch {torch_res['torch']} CPU ({torch_res['threads']} threads), each in "
            "its own process (sharing one with XLA's thread pool slowed torch 20-fold). Target: "
            "lorank / galore-torch < 1.0.\n\n"
            + benchlib.markdown_table(["implementation", "steady (s)", "refresh (s)", "amortized (s)",
                                       "/ galore-torch"], rows))
    return body, {"steady_s": steady, "refresh_s": refresh, "amortized_s": amort,
                  "ratio": amort["lorank"] / amort["galore-torch"], "torch": torch_res}


# --------------------------------------------------------------------------- SVD


def energy(g: jax.Array, u_r: jax.Array, s: jax.Array) -> float:
    """||U_r^T G||^2 / (sum of the top-r squared singular values)."""
    r = u_r.shape[1]
    captured = jnp.sum(jnp.square(u_r.T @ g))
    return float(captured / jnp.sum(jnp.square(s[:r])))


def big_gradient(args) -> tuple[jax.Array, str]:
    """The up_proj kernel gradient [hidden, intermediate] of a 1-layer LLaMA at the 7B width (byte vocab)."""
    if args.smoke:
        cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_heads=4, num_layers=1,
                          max_len=64)
        batch, seq = 4, 64
    else:
        cfg = LlamaConfig(vocab_size=256, hidden_size=4096, intermediate_size=11008, num_heads=32, num_layers=1,
                          max_len=SEQ)
        batch, seq = args.svd_batch, SEQ
    model = Llama(cfg)
    params = real_params(cfg)
    train, _ = corpus_batches(batch, seq, seed=3)
    loss = lm_loss(model)
    grad_fn = jax.jit(lambda p, t: jax.grad(loss)(p, t)["layers_0"]["mlp"]["up_proj"]["kernel"])
    log(f"svd: gradient of a {cfg.hidden_size}x{cfg.intermediate_size} kernel from {batch}x{seq} tokens")
    g = jax.block_until_ready(grad_fn(params, train(0)))
    desc = (f"the `layers_0/mlp/up_proj/kernel` gradient [{cfg.hidden_size}, {cfg.intermediate_size}] of a "
            f"1-layer LLaMA at the 7B width (byte vocabulary, initialization), {batch} x {seq} Tiny Shakespeare "
            "tokens")
    return g, desc


def section_svd(args) -> tuple[str, dict]:
    g, desc = big_gradient(args)
    g = g.astype(jnp.float32)
    ranks = (16, 64) if args.smoke else (128, 512, 1024)
    exact = jax.jit(lambda x: jnp.linalg.svd(x, full_matrices=False))
    exact_c = exact.lower(g).compile()
    log("svd: exact")
    start = time.perf_counter()
    u, s, _ = jax.block_until_ready(exact_c(g))  # once: it is the slow one; outputs give the reference energy
    t_exact = time.perf_counter() - start
    results = {"gradient": desc, "exact_s": t_exact, "ranks": {}}
    rows = []
    for r in ranks:
        rand = jax.jit(lambda x, k, r=r: svd_lib.randomized_top_singular(x, r, k))
        key = jax.random.PRNGKey(r)
        rand_c = rand.lower(g, key).compile()
        log(f"svd: randomized rank {r}")
        t_rand = benchlib.time_fn(lambda f=rand_c, k=key: f(g, k), repeats=2 if r < 1024 else 1, warmup=0)
        p, _ = rand_c(g, key)
        e = energy(g, p, s)
        results["ranks"][r] = {"randomized_s": t_rand, "speedup": t_exact / t_rand, "energy": e}
        rows.append([r, t_exact, t_rand, t_exact / t_rand, f"{100 * e:.4f}%", f"{1 - e:.1e}"])
    body = (f"Refresh of {desc}: exact `jnp.linalg.svd` vs `svd=\"randomized\"` (oversample "
            f"{svd_lib.DEFAULT_OVERSAMPLE}, {svd_lib.DEFAULT_POWER_ITERS} power iterations). Energy = "
            "||P^T G||^2 / ||U_r^T G||^2. Target at rank 128: speedup >= 10, energy >= 99%.\n\n"
            + benchlib.markdown_table(["rank", "exact (s)", "randomized (s)", "speedup", "energy", "1 - energy"],
                                      rows))

    # Energy on every projected gradient of the 60M model after a few AdamW steps.
    cfg = llama_config("60M", layers=2 if args.smoke else 8)
    if args.smoke:
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_heads=4, num_layers=2,
                          max_len=64)
    model = Llama(cfg)
    params = real_params(cfg)
    train, _ = corpus_batches(2, cfg.max_len, seed=5)
    loss = lm_loss(model)
    tx = optax.adamw(1e-3)
    state = tx.init(params)

    @jax.jit
    def train_step(params, state, tokens):
        grads = jax.grad(loss)(params, tokens)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    log("svd: 60M gradients")
    for i in range(args.warm_steps):
        params, state = train_step(params, state, train(i))
    grads = jax.jit(jax.grad(loss))(params, train(args.warm_steps))
    mask = llama.galore_mask(params)
    r60 = 16 if args.smoke else 128
    randomized = jax.jit(lambda x: svd_lib.randomized_top_singular(x, r60, jax.random.PRNGKey(0)))
    energies = []
    for g_leaf, sel in zip(jax.tree.leaves(grads), jax.tree.leaves(mask)):
        if not sel:
            continue
        _, s_l, _ = exact(g_leaf)
        p, _ = randomized(g_leaf)
        energies.append(energy(g_leaf, p, s_l))
    results["llama60m"] = {"batch": "2 x 256","rank": r60, "warm_steps": args.warm_steps, "min_energy": min(energies),
                           "mean_energy": float(np.mean(energies)), "matrices": len(energies)}
    body += (f"\n\nOn all {len(energies)} projected gradients of the 60M model ({cfg.num_layers} layers, vocab "
             f"{cfg.vocab_size}) after {args.warm_steps} AdamW steps on Tiny Shakespeare (batch 2 x "
             f"{cfg.max_len}), rank {r60}: energy min "
             f"{100 * min(energies):.4f}% (1 - energy = {1 - min(energies):.1e}), mean "
             f"{100 * np.mean(energies):.4f}%.")
    return body, results


# --------------------------------------------------------------------------- signs


def _projector_leaves(opt_state) -> list[jax.Array]:
    """Every projector matrix (P or Q) in the state, as float32 NumPy arrays."""
    out = []
    for g in find_galore_states(opt_state):
        for p in jax.tree.leaves(g.projectors, is_leaf=lambda x: isinstance(x, ProjectorState)):
            if isinstance(p, ProjectorState):
                out += [np.asarray(p.left, np.float32)] if p.left is not None else []
                out += [np.asarray(p.right, np.float32).T] if p.right is not None else []
    return out


def _vector_cosines(old: list, new: list) -> list[float]:
    """Per projector: mean over its r vectors (columns) of |cos(new_i, old_i)|."""
    return [float(np.mean(np.abs(np.sum(a * b, axis=0)))) for a, b in zip(old, new)]


def section_signs(args) -> tuple[str, dict]:
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_heads=4, num_layers=2,
                      max_len=64)
    steps = 60 if args.smoke else args.sign_steps
    gap, rank = 10, 16
    model = Llama(cfg)
    loss = lm_loss(model)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, steps // 10, steps, 3e-4)
    common = dict(galore_mask=llama.galore_mask, scale=1.0)
    variants = {
        "AdamW": lambda: optax.adamw(schedule),
        "GaLore, canonical signs": lambda: galore_adamw(schedule, rank, gap, **common),
        "GaLore, aligned signs": lambda: galore_adamw(schedule, rank, gap, align_signs=True, **common),
        "GaLore, re-projected moments": lambda: galore_adamw(schedule, rank, gap, reproject_moments=True, **common),
        "GaLore, lazy refresh (0.25)": lambda: galore_adamw(schedule, rank, gap, lazy_threshold=0.25, **common),
    }
    seeds = (0,) if args.smoke else (0, 1)
    results, rows, similarities = {}, [], []
    for name, make in variants.items():
        finals, evals, svds = [], [], []
        for seed in seeds:
            tx = make()
            params = real_params(cfg, seed)
            state = tx.init(params)
            train, valid = corpus_batches(16, cfg.max_len, seed)

            @jax.jit
            def step(params, state, tokens, tx=tx):
                value, grads = jax.value_and_grad(loss)(params, tokens)
                updates, state = tx.update(grads, state, params)
                return optax.apply_updates(params, updates), state, value

            losses = []
            for i in range(steps):
                before = _projector_leaves(state) if name == "GaLore, canonical signs" and i % gap == 0 else None
                params, state, value = step(params, state, train(i))
                losses.append(float(value))
                if before is not None and i > 0:
                    similarities.extend(_vector_cosines(before, _projector_leaves(state)))
            eval_fn = jax.jit(loss)
            evals.append(float(np.mean([eval_fn(params, valid(i)) for i in range(8)])))
            finals.append(float(np.mean(losses[-20:])))
            metrics = galore_metrics(state)
            svds.append(int(metrics["galore/refreshes"]) if metrics else 0)
        log(f"signs: {name}: train {np.mean(finals):.4f} eval {np.mean(evals):.4f} SVDs {np.mean(svds):.0f}")
        results[name] = {"train_loss": finals, "eval_loss": evals, "svds": svds}
        rows.append([name, float(np.mean(finals)), float(np.mean(evals)), float(np.ptp(evals)),
                     float(np.mean(svds))])
    sim = np.asarray(similarities)
    results["refresh_mean_abs_cosine"] = {"median": float(np.median(sim)), "p10": float(np.percentile(sim, 10)),
                                          "p90": float(np.percentile(sim, 90)), "count": int(sim.size)}
    body = (f"Byte-level LM on Tiny Shakespeare (LLaMA hidden {cfg.hidden_size}, {cfg.num_layers} layers, batch "
            f"16 x {cfg.max_len}), {steps} steps, warmup-cosine learning rate 3e-3, GaLore rank {rank} with a "
            f"short refresh interval T = {gap} so that moments cross many refreshes; mean over seeds "
            f"{list(seeds)}. Train loss: mean of the last 20 steps; eval: 8 held-out batches; SVDs: leaf "
            "refreshes performed.\n\n"
            + benchlib.markdown_table(["optimizer", "train loss", "eval loss", "eval spread over seeds", "SVDs"],
                                      rows)
            + f"\n\nHow far the subspace moves between refreshes (canonical-sign runs, {sim.size} leaf refreshes "
            f"after the first): mean over the {rank} vectors of |cos(new_i, old_i)| has median {np.median(sim):.2f}, "
            f"10th-90th percentile {np.percentile(sim, 10):.2f}-{np.percentile(sim, 90):.2f}.")
    return body, results


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, seconds; writes nothing")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    parser.add_argument("--layers", type=int, default=8, help="layers of the 60M model in the step timing")
    parser.add_argument("--batch", type=int, default=4, help="sequences per train step (x 256 tokens)")
    parser.add_argument("--repeats", type=int, default=4, help="timing repeats (median)")
    parser.add_argument("--svd-batch", type=int, default=6, help="sequences for the 7B-width gradient")
    parser.add_argument("--warm-steps", type=int, default=5, help="AdamW steps before the 60M gradients")
    parser.add_argument("--sign-steps", type=int, default=240, help="steps of each sign-handling run")
    args = parser.parse_args(argv)
    chosen = [s for s in args.sections.split(",") if s]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    runners = {"bytes": section_bytes, "step": section_step, "optax": section_optax, "torch": section_torch,
               "svd": section_svd, "signs": section_signs}
    titles = {"bytes": "Optimizer-state bytes", "step": "Train step: GaLore vs AdamW",
              "optax": "Optimizer step: lorank vs optax.contrib.galore",
              "torch": "Optimizer step: lorank vs galore-torch", "svd": "Randomized vs exact SVD refresh",
              "signs": "Sign handling and adaptive refresh"}
    command = "python -m experiments.bench_galore" + "".join(
        " " + a for a in (sys.argv[1:] if argv is None else argv))
    start = time.perf_counter()
    for name in SECTIONS:
        if name not in chosen:
            continue
        t0 = time.perf_counter()
        body, res = runners[name](args)
        res["section_seconds"] = time.perf_counter() - t0
        text_md = f"**{titles[name]}**\n\n{body}"
        print(f"\n{text_md}\n", flush=True)
        if not args.smoke:
            benchlib.write_section(f"bench_galore_{name}", command, text_md, res)
    log(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
