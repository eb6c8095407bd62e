"""The Scan&Snap runs a config describes: its world, its `RunConfig`, and the Syn-Medium grid of runs.

Shared by `experiments.scan_snap` (the figures) and `experiments.bench_scan_snap` (the sweep's
benchmark). Config fields read: the world's (num_query, next_per_query, num_common,
common_per_query, distinct_per_next, seq_len), the run's (steps, mode, batch_size, optimizer,
momentum, init, residual, record_every) and, for the grid, num_queries, eta_z, ratios, num_seeds, seed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lorank.data import synthetic
from lorank.dynamics import scan_snap as ss


def world_of(c, num_query: int | None = None) -> synthetic.SeqWorld:
    """The sequence-class world of config `c` (optionally with another number of queries)."""
    return synthetic.seq_world(c.num_query if num_query is None else num_query, c.next_per_query,
                               num_common=c.num_common, common_per_query=c.common_per_query,
                               distinct_per_next=c.distinct_per_next, seq_len=c.seq_len)


def run_config(c, **overrides) -> ss.RunConfig:
    """The `RunConfig` of config `c`."""
    fields = dict(steps=c.steps, mode=c.mode, batch_size=c.batch_size, seq_len=c.seq_len, optimizer=c.optimizer,
                  momentum=c.momentum, init=c.init, residual=c.residual, record_every=c.record_every)
    return ss.check_run(ss.RunConfig(**(fields | overrides)))


def keys(seed: int, n: int) -> jax.Array:
    """n PRNG keys from `seed`."""
    return jax.random.split(jax.random.key(seed), n)


def take(tree, i: int):
    """Run i of a swept pytree."""
    return jax.tree.map(lambda a: a[i], tree)


def syn_medium_runs(c) -> tuple[ss.Problem, np.ndarray, np.ndarray, jax.Array, list[tuple]]:
    """Every run of the Syn-Medium sweep: (stacked problems [R], eta_y [R], eta_z [R], keys [R], labels)."""
    problems = [ss.as_problem(world_of(c, q)) for q in c.num_queries]
    stacked = ss.stack_problems(problems)
    labels = [(qi, ez, ratio, seed) for qi in range(len(c.num_queries)) for ez in c.eta_z for ratio in c.ratios
              for seed in range(c.num_seeds)]
    index = np.array([lab[0] for lab in labels])
    eta_z = np.array([lab[1] for lab in labels], np.float32)
    eta_y = np.array([lab[1] * lab[2] for lab in labels], np.float32)
    return (jax.tree.map(lambda a: a[index], stacked), eta_y, eta_z, keys(c.seed, len(labels)), labels)


def final_distinct_entropy(rec: ss.Record, problems: ss.Problem) -> np.ndarray:
    """Mean over classes of the distinct-token entropy of c_n at the last save: [R]."""
    c = ss.attention_mass(rec.z_query[:, -1], problems.probs)
    ent = ss.distinct_entropy(c, problems)
    return np.asarray(jnp.sum(ent * problems.class_weight, -1))
