"""Low-rank factorization, LoRA and ReLoRA as parameter-space transformations of the LLaMA model."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lorank.models import llama, lora

SMALL = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_layers=1,
                          max_len=16)
PROJECTIONS = [f"layers_{i}/{m}" for i in range(1) for m in
               ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
                "mlp/down_proj")]


@functools.lru_cache(maxsize=None)
def _boxed_params(cfg):
    model = llama.Llama(cfg)
    return jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


class _JitModel:
    """Llama(cfg) whose apply is jitted once (the tests run on shared CPUs)."""

    def __init__(self, cfg):
        self.module = llama.Llama(cfg)
        self.jitted = jax.jit(self.module.apply)

    def apply(self, variables, tokens):
        return self.jitted(variables, tokens)


@functools.lru_cache(maxsize=None)
def _model(cfg):
    return _JitModel(cfg)


def _model_params(cfg=SMALL, boxed=False):
    params = _boxed_params(cfg)
    return _model(cfg), (params if boxed else nn.unbox(params))


def _lora_init(params, key, rank):
    return jax.jit(functools.partial(lora.lora_init, rank=rank, pattern=llama.GALORE_PATTERN))(params, key)


def _lowrank_init(params, key, rank, init_std=0.02):
    init = functools.partial(lora.lowrank_init, rank=rank, init_std=init_std, pattern=llama.GALORE_PATTERN)
    return jax.jit(init)(params, key)


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _tokens(cfg=SMALL, shape=(2, 12), seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size)


def _randomize_b(params, key, std=0.05):
    """LoRA tree with every lora_b replaced by random values (so a b != 0)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        if lora._key_str(path[-1]) == "lora_b":
            leaf = std * jax.random.normal(jax.random.fold_in(key, i), leaf.shape)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _toy_params():
    """A small tree with two selected kernels and one full-rank leaf (cheap to compile)."""
    rng = np.random.default_rng(0)
    return {"layers_0": {"attn": {"q_proj": {"kernel": jnp.asarray(rng.normal(size=(16, 12)) * 0.3, jnp.float32)}},
                         "mlp": {"down_proj": {"kernel": jnp.asarray(rng.normal(size=(12, 16)) * 0.3,
                                                                       jnp.float32)}}},
            "embed": {"embedding": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)}}


def _toy_loss(p, x):
    h = jnp.tanh(x @ p["layers_0"]["attn"]["q_proj"]["kernel"]) @ p["layers_0"]["mlp"]["down_proj"]["kernel"]
    return jnp.mean((h - p["embed"]["embedding"][0]) ** 2)


# ----------------------------------------------------------------------------- low-rank factorization


@pytest.mark.parametrize("shape,rank", [((64, 32, 48, 4, 2), 4), ((256, 192, 512, 6, 3), 16),
                                        ((1000, 48, 100, 2, 1), 48)])
def test_lowrank_parameter_count_matches_closed_form(shape, rank):
    v, d, f, h, n_layers = shape
    cfg = llama.LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=f, num_heads=h, num_layers=n_layers)

    def init(key):
        params = nn.unbox(llama.Llama(cfg).init(key, jnp.zeros((1, 4), jnp.int32))["params"])
        return lora.lowrank_init(params, key, rank=rank, init_std=cfg.init_std, pattern=llama.GALORE_PATTERN)

    counted = _count(jax.eval_shape(init, jax.random.key(0)))
    # By hand: embedding + per layer (q,k,v,o: r(d+d) each; gate, up, down: r(d+f) each; 2 norms) + norm + head.
    expected = v * d + n_layers * (4 * rank * (d + d) + 3 * rank * (d + f) + 2 * d) + d + d * v
    assert counted == expected == llama.lowrank_param_count(cfg, rank)


def test_lowrank_materialize_is_the_product_and_keeps_other_leaves():
    _, params = _model_params()
    factored = _lowrank_init(params, jax.random.key(3), 4, 0.02)
    full = lora.materialize(factored)
    for p in PROJECTIONS:
        a = np.asarray(_get(factored, p + "/kernel/lowrank_a"), np.float64)
        b = np.asarray(_get(factored, p + "/kernel/lowrank_b"), np.float64)
        assert a.shape[1] == b.shape[0] == 4
        np.testing.assert_allclose(np.asarray(_get(full, p + "/kernel")), a @ b, rtol=1e-5, atol=1e-8)
    for p in ("embed/embedding", "lm_head/kernel", "final_norm/scale", "layers_0/attn_norm/scale"):
        np.testing.assert_array_equal(np.asarray(_get(full, p)), np.asarray(_get(params, p)))
    assert jax.tree.structure(full) == jax.tree.structure(params)


def test_lowrank_init_product_has_the_full_rank_init_variance():
    params = {f"layers_{i}": {"attn": {"q_proj": {"kernel": jnp.zeros((256, 256))}}} for i in range(4)}
    init_std, rank = 0.02, 16
    factored = _lowrank_init(params, jax.random.key(0), rank, init_std)
    products = [np.asarray(v, np.float64) for v in jax.tree.leaves(lora.materialize(factored))]
    var = np.mean([np.mean(p ** 2) for p in products])
    assert var == pytest.approx(init_std ** 2, rel=0.1)
    a = np.asarray(factored["layers_0"]["attn"]["q_proj"]["kernel"]["lowrank_a"])
    assert np.std(a) == pytest.approx(math.sqrt(init_std / math.sqrt(rank)), rel=0.05)


def test_lowrank_gradients_follow_the_chain_rule():
    factored = _lowrank_init(_toy_params(), jax.random.key(3), 4, 0.3)
    x = jax.random.normal(jax.random.key(4), (6, 16))
    grads = jax.jit(jax.grad(lora.factored_loss(_toy_loss)))(factored, x)
    full_grads = jax.jit(jax.grad(_toy_loss))(lora.materialize(factored), x)
    for p in ("layers_0/attn/q_proj/kernel", "layers_0/mlp/down_proj/kernel"):
        g = np.asarray(_get(full_grads, p), np.float64)  # dL/dK, K = a b
        a = np.asarray(_get(factored, p + "/lowrank_a"), np.float64)
        b = np.asarray(_get(factored, p + "/lowrank_b"), np.float64)
        assert np.abs(g).max() > 0
        np.testing.assert_allclose(np.asarray(_get(grads, p + "/lowrank_a")), g @ b.T, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(np.asarray(_get(grads, p + "/lowrank_b")), a.T @ g, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(grads["embed"]["embedding"], full_grads["embed"]["embedding"], rtol=1e-6)


def test_boxed_factors_carry_the_kernel_axis_names():
    _, boxed = _model_params(boxed=True)
    tree = jax.eval_shape(functools.partial(lora.lora_init, rank=4, pattern=llama.GALORE_PATTERN), boxed,
                          jax.random.key(0))
    node = tree["layers_0"]["mlp"]["down_proj"]["kernel"]
    assert tuple(node["lora_a"].names) == ("mlp", None)
    assert tuple(node["lora_b"].names) == (None, "embed")
    assert tuple(node["lora_base"].names) == ("mlp", "embed")
    low = jax.eval_shape(functools.partial(lora.lowrank_init, rank=4, init_std=0.02, pattern=llama.GALORE_PATTERN),
                         boxed, jax.random.key(0))
    assert tuple(low["layers_0"]["attn"]["q_proj"]["kernel"]["lowrank_a"].names) == ("embed", None)
    assert tuple(low["layers_0"]["attn"]["q_proj"]["kernel"]["lowrank_b"].names) == (None, "joined_kv")


# ----------------------------------------------------------------------------- LoRA


def test_lora_parameter_count_matches_closed_form():
    _, params = _model_params()
    tree = _lora_init(params, jax.random.key(0), 4)
    d, f, v, n_layers, r = 32, 48, 64, 1, 4
    factors = n_layers * (4 * r * 2 * d + 3 * r * (d + f))
    full = v * d + n_layers * (4 * d * d + 3 * d * f + 2 * d) + d + d * v
    labels = lora.lora_labels(tree, train_others=False)
    trainable = sum(int(np.prod(x.shape)) for x, lab in zip(jax.tree.leaves(tree), jax.tree.leaves(labels))
                    if lab == "trainable")
    assert _count(tree) == full + factors
    assert trainable == factors
    assert llama.lora_param_count(SMALL, r, train_others=False) == (full + factors, factors)
    assert llama.lora_param_count(SMALL, r)[1] == factors + v * d + n_layers * 2 * d + d + d * v


def test_lora_at_init_computes_exactly_the_base_model():
    model, params = _model_params()
    tree = _lora_init(params, jax.random.key(5), 4)
    assert float(jnp.abs(_get(tree, "layers_0/attn/q_proj/kernel/lora_a")).max()) > 0
    tokens = _tokens()
    base = model.apply({"params": params}, tokens)
    out = model.apply({"params": lora.materialize(tree, scale=lora.lora_scale(16, 4))}, tokens)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


def test_merged_lora_matches_the_unmerged_computation():
    model, params = _model_params()
    scale = lora.lora_scale(8.0, 4)
    tree = _randomize_b(_lora_init(params, jax.random.key(5), 4), jax.random.key(6))
    merged = lora.merge_lora(tree, scale=scale)
    rng = np.random.default_rng(0)
    for p in PROJECTIONS:
        node = {k: np.asarray(v, np.float64) for k, v in _get(tree, p + "/kernel").items()}
        x = rng.normal(size=(5, node["lora_base"].shape[0]))
        unmerged = x @ node["lora_base"] + scale * (x @ node["lora_a"]) @ node["lora_b"]  # h = W0 x + s B A x
        np.testing.assert_allclose(x @ np.asarray(_get(merged, p + "/kernel"), np.float64), unmerged,
                                   rtol=1e-5, atol=1e-6)
    # The model on the merged tree equals the model on float64-merged kernels, and on the unmerged tree.
    ref = jax.tree.map(lambda v: v, params)
    for p in PROJECTIONS:
        node = {k: np.asarray(v, np.float64) for k, v in _get(tree, p + "/kernel").items()}
        _get(ref, p)["kernel"] = jnp.asarray(node["lora_base"] + scale * node["lora_a"] @ node["lora_b"],
                                             jnp.float32)
    tokens = _tokens()
    logits = model.apply({"params": merged}, tokens)
    np.testing.assert_allclose(logits, model.apply({"params": ref}, tokens), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, model.apply({"params": lora.materialize(tree, scale=scale)}, tokens),
                               rtol=1e-6, atol=1e-6)
    assert not np.allclose(logits, model.apply({"params": params}, tokens), atol=1e-4)


def test_lora_base_gets_no_gradient_and_factor_gradients_follow_the_chain_rule():
    model, params = _model_params()
    scale = 2.0
    tree = _randomize_b(_lora_init(params, jax.random.key(5), 4), jax.random.key(6))
    tokens = _tokens()

    def base_loss(p, x):
        return jnp.sum(model.apply({"params": p}, x) ** 2) / x.size

    grads = jax.jit(jax.grad(lora.factored_loss(base_loss, scale=scale)))(tree, tokens)
    full = jax.jit(jax.grad(base_loss))(lora.merge_lora(tree, scale=scale), tokens)
    p = "layers_0/attn/v_proj/kernel"
    g = np.asarray(_get(full, p), np.float64)
    a = np.asarray(_get(tree, p + "/lora_a"), np.float64)
    b = np.asarray(_get(tree, p + "/lora_b"), np.float64)
    np.testing.assert_array_equal(np.asarray(_get(grads, p + "/lora_base")), 0.0)
    np.testing.assert_allclose(_get(grads, p + "/lora_a"), scale * g @ b.T, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(_get(grads, p + "/lora_b"), scale * a.T @ g, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("train_others", [True, False])
def test_frozen_base_does_not_change_under_adamw_with_weight_decay(train_others):
    model, params = _model_params()
    tree = _lora_init(params, jax.random.key(5), 4)
    tx = lora.freeze_base(optax.adamw(1e-2, weight_decay=0.1), train_others=train_others)
    loss = lora.factored_loss(lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2), scale=1.0)
    state = tx.init(tree)

    @jax.jit
    def step(tree, state, x):
        updates, state = tx.update(jax.grad(loss)(tree, x), state, tree)
        return optax.apply_updates(tree, updates), state

    new = tree
    for i in range(3):
        new, state = step(new, state, _tokens(seed=i))
    for p in PROJECTIONS:
        np.testing.assert_array_equal(np.asarray(_get(new, p + "/kernel/lora_base")),
                                      np.asarray(_get(tree, p + "/kernel/lora_base")))
        assert float(jnp.abs(_get(new, p + "/kernel/lora_b")).max()) > 0
    embed_changed = not np.array_equal(np.asarray(new["embed"]["embedding"]), np.asarray(tree["embed"]["embedding"]))
    assert embed_changed == train_others


# ----------------------------------------------------------------------------- ReLoRA


def test_relora_merge_and_reinit_preserves_the_function():
    model, params = _model_params()
    scale = 0.5
    tree = _randomize_b(_lora_init(params, jax.random.key(5), 4), jax.random.key(6))
    reset = jax.jit(lambda t, k: lora.relora_merge_and_reinit(t, k, scale=scale))(tree, jax.random.key(9))
    tokens = _tokens()
    before = model.apply({"params": lora.materialize(tree, scale=scale)}, tokens)
    after = model.apply({"params": lora.materialize(reset, scale=scale)}, tokens)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    for p in PROJECTIONS:
        node, old = _get(reset, p + "/kernel"), _get(tree, p + "/kernel")
        np.testing.assert_array_equal(np.asarray(node["lora_b"]), 0.0)
        assert not np.allclose(node["lora_a"], old["lora_a"])
        m = node["lora_a"].shape[0]
        assert np.std(np.asarray(node["lora_a"])) == pytest.approx(1 / math.sqrt(m), rel=0.35)
        expected = (np.asarray(old["lora_base"], np.float64)
                    + scale * np.asarray(old["lora_a"], np.float64) @ np.asarray(old["lora_b"], np.float64))
        np.testing.assert_allclose(node["lora_base"], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("keep_fraction", [0.25, 0.1, 0.0])
def test_prune_opt_state_keeps_exactly_the_largest_fraction(keep_fraction):
    _, params = _model_params()
    tree = _lora_init(params, jax.random.key(5), 4)
    tx = optax.chain(optax.clip_by_global_norm(1.0), lora.freeze_base(optax.adam(1e-3)))
    state = tx.init(tree)
    # Fill every state leaf with distinct random values so magnitudes have no ties.
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(0)
    leaves = [jnp.asarray(rng.normal(size=x.shape), x.dtype) if x.ndim else x for x in leaves]
    state = jax.tree.unflatten(treedef, leaves)
    pruned = lora.prune_opt_state(state, lora.lora_factor_mask(tree), keep_fraction)

    checked = 0
    for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(pruned)):
        names = [lora._key_str(k) for k in path]
        old, new = np.asarray(old), np.asarray(new)
        if names[-1] in ("lora_a", "lora_b"):
            k = int(math.floor(keep_fraction * old.size + 0.5))  # e.g. 0.25 * 128 = 32
            assert np.count_nonzero(new) == k
            if k:
                threshold = np.sort(np.abs(old).ravel())[::-1][k - 1]
                np.testing.assert_array_equal(new, np.where(np.abs(old) >= threshold, old, 0.0))
            checked += 1
        else:
            np.testing.assert_array_equal(new, old)  # embeddings, norms, head, counts untouched
    assert checked == 2 * 2 * len(PROJECTIONS)  # mu and nu of a and b at 7 kernels


def _envelope(t, peak=1.0, total=100, warmup=10, end=0.1):
    if t < warmup:
        return peak * t / warmup
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def test_jagged_cosine_schedule_restarts_at_the_reset_steps():
    sched = lora.jagged_cosine_schedule(1.0, total_steps=100, warmup_steps=10, reset_every=30,
                                        restart_warmup_steps=5, end_value=0.1)
    expected = {
        0: 0.0, 5: 0.5, 10: 1.0,
        29: 0.1 + 0.45 * (1 + math.cos(math.pi * 19 / 90)),
        30: 0.0,  # reset: back to zero
        32: 2 / 5 * (0.1 + 0.45 * (1 + math.cos(math.pi * 25 / 90))),  # ramp towards envelope(35)
        35: 0.1 + 0.45 * (1 + math.cos(math.pi * 25 / 90)),
        45: 0.1 + 0.45 * (1 + math.cos(math.pi * 35 / 90)),
        60: 0.0, 61: 1 / 5 * _envelope(65), 90: 0.0, 94: 4 / 5 * _envelope(95), 99: _envelope(99),
    }
    for t, value in expected.items():
        assert float(sched(t)) == pytest.approx(value, abs=1e-6), t
    jitted = jax.jit(sched)(jnp.arange(100))
    np.testing.assert_allclose(jitted, [float(sched(t)) for t in range(100)], atol=1e-6)
    assert [t for t in range(1, 100) if float(sched(t)) == 0.0] == [30, 60, 90]


def test_relora_wrapper_merges_every_reset_and_matches_plain_lora_before_the_merge():
    scale = 2.0
    tree = _lora_init(_toy_params(), jax.random.key(5), 4)
    loss = lora.factored_loss(_toy_loss, scale=scale)
    inner = lora.freeze_base(optax.adam(1e-2))
    wrapped = lora.relora(inner, reset_every=2, scale=scale, keep_fraction=0.0, seed=0)
    xs = [jax.random.normal(jax.random.key(10 + i), (6, 16)) for i in range(3)]

    def run(tx, steps):
        @jax.jit
        def step(t, s, x):
            u, s = tx.update(jax.grad(loss)(t, x), s, t)
            return optax.apply_updates(t, u), s

        t, s = tree, tx.init(tree)
        history = []
        for i in range(steps):
            t, s = step(t, s, xs[i])
            history.append((t, s))
        return history

    plain = run(inner, 2)
    (relora1, _), (relora2, state2), (relora3, _) = run(wrapped, 3)
    for p in ("layers_0/attn/q_proj/kernel", "layers_0/mlp/down_proj/kernel"):
        # Step 1: no merge yet, identical to plain LoRA.
        np.testing.assert_array_equal(np.asarray(_get(relora1, p + "/lora_base")),
                                      np.asarray(_get(tree, p + "/lora_base")))
        np.testing.assert_allclose(_get(relora1, p + "/lora_b"), _get(plain[0][0], p + "/lora_b"), atol=1e-7)
        assert float(jnp.abs(_get(relora1, p + "/lora_b")).max()) > 0
        # Step 2: merged (b zero, base changed); the effective weights equal plain LoRA's after 2 steps.
        np.testing.assert_array_equal(np.asarray(_get(relora2, p + "/lora_b")), 0.0)
        assert not np.allclose(_get(relora2, p + "/lora_base"), _get(tree, p + "/lora_base"))
        np.testing.assert_allclose(_get(lora.materialize(relora2, scale=scale), p),
                                   _get(lora.materialize(plain[1][0], scale=scale), p), rtol=1e-5, atol=1e-6)
        assert not np.allclose(_get(relora2, p + "/lora_a"), _get(plain[1][0], p + "/lora_a"))  # re-drawn
        # Step 3: training continues from the merged base; no merge.
        np.testing.assert_array_equal(np.asarray(_get(relora3, p + "/lora_base")),
                                      np.asarray(_get(relora2, p + "/lora_base")))
        assert float(jnp.abs(_get(relora3, p + "/lora_b")).max()) > 0
    adam_state = state2.inner.inner_states["trainable"].inner_state[0]
    for name in ("lora_a", "lora_b"):  # keep_fraction 0: the factors' moments are reset
        np.testing.assert_array_equal(np.asarray(adam_state.mu["layers_0"]["attn"]["q_proj"]["kernel"][name]), 0.0)
        np.testing.assert_array_equal(np.asarray(adam_state.nu["layers_0"]["mlp"]["down_proj"]["kernel"][name]), 0.0)
    assert float(jnp.abs(adam_state.mu["embed"]["embedding"]).max()) > 0  # full-rank leaves keep their moments
    assert int(state2.count) == 2


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    _, params = _model_params()
    with pytest.raises(ValueError, match="rank=40 exceeds"):
        _lora_init(params, jax.random.key(0), 40)
    with pytest.raises(ValueError, match="rank must be an integer >= 1, got 0"):
        lora.lowrank_init(params, jax.random.key(0), rank=0, init_std=0.02, pattern=llama.GALORE_PATTERN)
    with pytest.raises(ValueError, match="matches no parameter path"):
        lora.lora_init(params, jax.random.key(0), rank=2, pattern=r"nothing/here")
    with pytest.raises(ValueError, match="only 2-D kernels"):
        lora.lora_init(params, jax.random.key(0), rank=2, pattern=r"final_norm/scale")
    with pytest.raises(ValueError, match="keep_fraction"):
        lora.prune_opt_state({}, {}, 1.5)
    with pytest.raises(ValueError, match="restart_warmup_steps=30"):
        lora.jagged_cosine_schedule(1.0, 100, 10, reset_every=30, restart_warmup_steps=30)
    with pytest.raises(ValueError, match="rank=64 exceeds"):
        llama.lowrank_param_count(SMALL, 64)
