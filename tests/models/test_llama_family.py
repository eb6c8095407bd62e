"""The LLaMA family's description: projected kernels, layer kinds, per-layer stages; path selection."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import numpy as np

from lorank.models import llama
from lorank.models.llama import Llama, LlamaConfig
from lorank.optim import galore_adamw, label_by_path, mask_by_path, path_str, tree_nbytes


def llama_params(layers=2):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=2, num_layers=layers,
                      max_len=16)
    boxed = jax.eval_shape(lambda: Llama(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    return nn.meta.unbox(boxed)["params"]


def selected_paths(mask):
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    return sorted(path_str(p) for p, v in flat if v)


def test_llama_mask_selects_attention_and_mlp_kernels_only():
    params = llama_params(layers=2)
    expected = sorted(f"layers_{i}/{m}/{k}_proj/kernel" for i in range(2)
                      for m, ks in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for k in ks)
    assert selected_paths(llama.galore_mask(params)) == expected
    # also under a {"params": ...} wrapper
    assert len(selected_paths(llama.galore_mask({"params": params}))) == 14
    labels = jax.tree.leaves(label_by_path(params, [(llama.GALORE_PATTERN, "galore")], "adamw"))
    assert labels.count("galore") == 14 and labels.count("adamw") == len(labels) - 14


def test_galore_with_llama_mask_projects_only_selected_kernels():
    params = llama_params(layers=1)
    tx = galore_adamw(1e-3, rank=8, galore_mask=llama.galore_mask)
    state = jax.eval_shape(tx.init, params)[0]
    is_proj = lambda x: isinstance(x, optax.MaskedNode) or hasattr(x, "refreshes")  # noqa: E731
    projected = [path_str(p) for p, v in jax.tree_util.tree_flatten_with_path(state.projectors, is_leaf=is_proj)[0]
                 if not isinstance(v, optax.MaskedNode)]
    assert sorted(projected) == selected_paths(llama.galore_mask(params))
    assert state.inner_state.mu["embed"]["embedding"].shape == (64, 32)  # full-rank AdamW
    assert state.inner_state.mu["layers_0"]["mlp"]["down_proj"]["kernel"].shape == (48, 8)  # [F, D] std: right
    assert tree_nbytes(state) < tree_nbytes(jax.eval_shape(optax.adam(1e-3).init, params))


def test_mask_and_label_by_path():
    tree = {"a": {"kernel": jnp.zeros(2), "bias": jnp.zeros(2)}, "b": [jnp.zeros(1), jnp.zeros(1)]}
    assert mask_by_path(tree, r".*/kernel") == {"a": {"kernel": True, "bias": False}, "b": [False, False]}
    assert label_by_path(tree, [(r"b/\d+", "list"), (r"a/.*", "a")], "other") == {
        "a": {"kernel": "a", "bias": "a"}, "b": ["list", "list"]}


def test_per_layer_stages_compute_the_models_loss():
    """Applying the stages in order gives the loss of the model itself (same logits), and their
    keys partition the parameters in forward order."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=2, num_layers=2, max_len=16)
    model = Llama(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 64)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens[:, :-1]))["params"]
    stages = llama.per_layer_stages(cfg, inputs_of=lambda b: b[:, :-1], loss_of=lambda logits, b: logits)
    assert [s.keys for s in stages] == [("embed",), ("layers_0",), ("layers_1",), ("final_norm", "lm_head")]
    x = None
    for stage in stages:
        x = stage.apply({k: params[k] for k in stage.keys}, x, tokens)
    np.testing.assert_allclose(x, model.apply({"params": params}, tokens[:, :-1]), rtol=1e-6, atol=1e-6)


def test_layer_kinds():
    params = llama_params(layers=1)
    kinds = {path_str(p): llama.layer_kind(tuple(p)) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert kinds["layers_0/attn/q_proj/kernel"] == "attention" and kinds["layers_0/mlp/up_proj/kernel"] == "mlp"
    assert kinds["embed/embedding"] == "embedding" and kinds["lm_head/kernel"] == "lm_head"
    assert kinds["layers_0/attn_norm/scale"] is None and kinds["final_norm/scale"] is None
