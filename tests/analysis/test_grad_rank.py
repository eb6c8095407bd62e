"""Gradient stable ranks grouped by LLaMA layer kind."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorank.analysis import grad_rank
from lorank.models import llama


def numpy_stable_rank(m):
    s = np.linalg.svd(np.asarray(m, np.float64), compute_uv=False)
    return float(np.sum(s**2) / s[0] ** 2)


def test_groups_of_llama_parameters():
    cfg = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_heads=2, num_layers=2)
    params = nn.unbox(jax.eval_shape(lambda k: llama.Llama(cfg).init(k, jnp.zeros((1, 4), jnp.int32)),
                                     jax.random.key(0))["params"])
    groups = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        groups.setdefault(llama.layer_kind(tuple(path)), []).append(jax.tree_util.keystr(path))
    assert len(groups["attention"]) == 8 and len(groups["mlp"]) == 6
    assert groups["embedding"] == ["['embed']['embedding']"] and groups["lm_head"] == ["['lm_head']['kernel']"]
    assert len(groups[None]) == 5  # 2 norms per layer + final norm


def test_group_means_match_numpy_float64():
    rng = np.random.default_rng(0)
    low = rng.normal(size=(20, 2)) @ rng.normal(size=(2, 12))  # rank 2
    full = rng.normal(size=(20, 12))
    grads = {"layers_0": {"attn": {"q_proj": {"kernel": low}, "k_proj": {"kernel": full}},
                          "attn_norm": {"scale": np.ones(12)}},
             "embed": {"embedding": full.T}}
    got = grad_rank.group_stable_ranks(jax.tree.map(jnp.asarray, grads), llama.layer_kind)
    assert set(got) == {"attention", "embedding"}
    np.testing.assert_allclose(float(got["attention"]), (numpy_stable_rank(low) + numpy_stable_rank(full)) / 2,
                               rtol=1e-4)
    np.testing.assert_allclose(float(got["embedding"]), numpy_stable_rank(full.T), rtol=1e-4)
    assert float(got["attention"]) < numpy_stable_rank(full)  # the rank-2 gradient pulls the mean down
