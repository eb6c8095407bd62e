"""Configs of the Scan&Snap figures (docs/scan_snap.md): the 1-layer transformer's (Y, Z) dynamics.

Commands (each variant has a `_smoke` twin that runs in seconds on a CPU):

  python -m experiments.scan_snap --config configs/scan_snap.py:all --workdir runs/scan_snap
  python -m experiments.scan_snap --config configs/scan_snap.py:syn_small --workdir runs/scan_snap_fig4
  python -m experiments.scan_snap --config configs/scan_snap.py:chi --workdir runs/scan_snap_fig3
  python -m experiments.scan_snap --config configs/scan_snap.py:h --workdir runs/scan_snap_fig8
  python -m experiments.scan_snap --config configs/scan_snap.py:b --workdir runs/scan_snap_fig9
  python -m experiments.scan_snap --config configs/scan_snap.py:syn_medium --workdir runs/scan_snap_fig6
  python -m experiments.bench_scan_snap --config configs/scan_snap.py:bench --workdir runs/bench_scan_snap

The paper's settings (Tian, Wang, Chen, Du, NeurIPS 2023 and its public runs): T = 128 tokens,
batch 128, SGD with momentum 0.9, 100 iterations; 10 common tokens, 10 distinct tokens per next
token with weights linspace(0.1, 1); Fig. 4: two queries with one next token each, zero init,
(eta_Y, eta_Z) = (1, 1) and (10, 1); Fig. 6: 1/3/5/10 queries with two next tokens each, uniform
init, eta_Z in {0.5, 1, 2, 3}, eta_Y / eta_Z in {1, 2, 5, 10}, 10 seeds.

Overrides: `--config.steps=200`, `--config.eta_z=(0.5, 1.0)`, ...
"""

import ml_collections

from lorank import config_files


def _world(c: ml_collections.ConfigDict, *, num_query: int, next_per_query: int, num_common: int,
           distinct_per_next: int) -> None:
    c.num_query = num_query  # queries (last tokens)
    c.next_per_query = next_per_query  # next tokens per query (K = num_query * next_per_query)
    c.num_common = num_common  # contextual tokens shared by every class
    c.common_per_query = 0  # contextual tokens shared by the classes of one query
    c.distinct_per_next = distinct_per_next  # contextual tokens of one class only
    c.seq_len = 128  # T, tokens per sequence including the query


def _train(c: ml_collections.ConfigDict, *, mode: str, steps: int, momentum: float, init: str) -> None:
    c.mode = mode  # "sampled" (batch of sequences), "population" (T -> infinity) or "one_class"
    c.steps = steps  # optimizer steps
    c.batch_size = 128  # sequences per step (sampled mode)
    c.optimizer = "sgd"  # "sgd" or "adam"
    c.momentum = momentum  # SGD momentum (0: plain gradient descent, the theory's regime)
    c.init = init  # "zero" (Y = Z = 0) or "uniform" (PyTorch's nn.Linear default)
    c.residual = False  # add the query's one-hot to the attention output (paper section 7)


def syn_small(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    _world(c, num_query=2, next_per_query=1, num_common=10, distinct_per_next=10)
    _train(c, mode="sampled", steps=40 if smoke else 100, momentum=0.9, init="zero")
    c.rates = ((1.0, 1.0), (10.0, 1.0))  # (eta_Y, eta_Z) of each panel
    c.record_every = 2  # steps between saved snapshots of Z
    c.seed = 2  # PRNG seed (the paper's run used seed 2)
    return c


def chi(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # One query, K = 10 next tokens, M = 9 + 10 * 98 + 1 + 10 = 1000 tokens (smoke: M = 9 + 10 * 8 + 11 = 100).
    _world(c, num_query=1, next_per_query=10, num_common=9, distinct_per_next=8 if smoke else 98)
    _train(c, mode="population", steps=300 if smoke else 3000, momentum=0.0, init="zero")
    c.eta_z = 0.5  # attention learning rate
    c.eta_y = (0.5, 1.0, 2.0, 5.0)  # decoder learning rates, one curve each
    c.record_every = 10 if smoke else 30  # steps between saves
    c.seed = 0  # PRNG seed
    return c


def h(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_tokens = (10, 100) if smoke else (10, 100, 1000)  # vocabulary sizes M, one panel each
    c.eta_y = (0.5, 2.0, 10.0)  # decoder learning rates, one curve each
    c.steps = 200 if smoke else 5000  # steps s of the recursion
    c.simulate_steps = 30 if smoke else 200  # steps of the simulated decoder (one_class, no common token)
    c.distinct_per_next = 5  # distinct tokens per class of the simulated world (one query)
    c.next_per_query = 3  # classes of the simulated world
    c.seed = 0  # PRNG seed
    return c


def b(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Theorem 4's setting: one shared query, a single common token.
    _world(c, num_query=1, next_per_query=5, num_common=1, distinct_per_next=10)
    _train(c, mode="population", steps=2000 if smoke else 20000, momentum=0.0, init="zero")
    c.ratios = (10.0, 1.0)  # eta_Y / eta_Z, one panel each
    c.eta_z = (0.1, 0.5, 1.0) if smoke else (0.05, 0.1, 0.5, 1.0, 2.0)  # attention learning rates, one curve each
    c.small_ratios = (1e-1, 1e-2) if smoke else (1e-1, 1e-2, 1e-3, 1e-4)  # eta_Z / eta_Y of the error table
    c.seq_lens = (32, 128) if smoke else (32, 128, 512)  # T of the finite-T (sampled, batch 128) rows
    c.record_every = 20 if smoke else 100  # steps between saves
    c.seed = 0  # PRNG seed
    return c


def syn_medium(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    _world(c, num_query=1, next_per_query=2, num_common=10, distinct_per_next=10)
    _train(c, mode="sampled", steps=20 if smoke else 100, momentum=0.9, init="uniform")
    c.num_queries = (1, 3) if smoke else (1, 3, 5, 10)  # queries of each panel (next_per_query each)
    c.eta_z = (0.5, 3.0) if smoke else (0.5, 1.0, 2.0, 3.0)  # attention learning rates
    c.ratios = (1.0, 10.0) if smoke else (1.0, 2.0, 5.0, 10.0)  # eta_Y / eta_Z
    c.num_seeds = 2 if smoke else 10  # seeds per setting
    if smoke:
        c.batch_size = 32  # smaller batches in the smoke run
        c.seq_len = 32  # shorter sequences in the smoke run
    c.record_every = c.steps  # only the end is used
    c.chunk_size = 8  # runs vmapped at a time inside the one program (bounds its working set)
    c.seed = 0  # PRNG seed of the first run
    return c


def all_figures(smoke: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.syn_small = syn_small(smoke)  # Fig. 4
    c.chi = chi(smoke)  # Fig. 3
    c.h = h(smoke)  # Fig. 8
    c.b = b(smoke)  # Fig. 9 and Theorem 4's error table
    c.syn_medium = syn_medium(smoke)  # Fig. 6
    return c


def bench(smoke: bool) -> ml_collections.ConfigDict:
    c = syn_medium(smoke)
    if smoke:
        c.num_queries = (1,)
        c.eta_z = (1.0,)
        c.ratios = (1.0, 2.0)
        c.num_seeds = 2
        c.steps = 10
        c.record_every = 10
    c.loop_runs = 4 if smoke else 64  # runs timed one by one in the Python loop (the rate is scaled to all)
    c.repeats = 1 if smoke else 3  # timing repeats of each contender (interleaved; median)
    return c


VARIANTS = {
    "all": all_figures,
    "syn_small": syn_small,
    "chi": chi,
    "h": h,
    "b": b,
    "syn_medium": syn_medium,
    "bench": bench,
}

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {
    "all_smoke": "experiments.scan_snap",
    "bench_smoke": "experiments.bench_scan_snap",
}


def get_config(arg: str = "all") -> ml_collections.ConfigDict:
    """`NAME` or `NAME_smoke` for NAME in VARIANTS."""
    name, smoke = config_files.smoke_variant(arg, VARIANTS)
    config = VARIANTS[name](smoke)
    config.figure = name  # which figure(s) experiments.scan_snap draws
    config.write_docs = not smoke  # rewrite docs/scan_snap.md's blocks and docs/figures/scan_snap_*.png
    return config
