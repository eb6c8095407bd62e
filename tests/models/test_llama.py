"""The LLaMA-style model: causality, parameter count, rotary embeddings, options, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorank.models import llama, lora

SMALL = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_layers=2,
                          max_len=16)


def _init(cfg, seq=12):
    model = llama.Llama(cfg)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((2, seq), jnp.int32))["params"])
    return model, params


def test_changing_token_t_never_changes_logits_before_t():
    model, params = _init(SMALL)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, SMALL.vocab_size)
    base = model.apply({"params": params}, tokens)
    for t in (0, 5, 11):
        changed = tokens.at[:, t].set((tokens[:, t] + 7) % SMALL.vocab_size)
        out = model.apply({"params": params}, changed)
        np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
        assert not np.allclose(out[:, t], base[:, t])  # the position itself does see the change


@pytest.mark.parametrize("shape", [(64, 32, 48, 4, 2), (256, 192, 512, 6, 3), (1000, 48, 100, 2, 1)])
def test_parameter_count_matches_closed_form(shape):
    v, d, f, h, n_layers = shape
    cfg = llama.LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=f, num_heads=h, num_layers=n_layers)
    abstract = jax.eval_shape(lambda k: llama.Llama(cfg).init(k, jnp.zeros((1, 4), jnp.int32)), jax.random.key(0))
    counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract["params"])))
    # Written out by hand: embedding + per layer (q,k,v,o + gate,up,down + 2 norms) + final norm + head.
    expected = v * d + n_layers * (4 * d * d + 3 * d * f + 2 * d) + d + d * v
    assert counted == expected == llama.param_count(cfg)


def test_train_flops_per_token_matches_a_hand_count():
    cfg = llama.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_heads=4, num_layers=4,
                            max_len=64)
    # Per layer q, k, v, o: 4 * 128 * 128 = 65,536 and gate, up, down: 3 * 128 * 384 = 147,456;
    # 4 layers: 851,968; head 128 * 256 = 32,768; matmul parameters 884,736.
    assert llama.matmul_param_count(cfg) == 884_736
    # 6 * 884,736 = 5,308,416, plus attention 12 * 4 layers * 64 positions * 128 = 393,216.
    assert llama.train_flops_per_token(cfg, 64) == 5_701_632
    assert llama.train_flops_per_token(cfg, 32) == 5_308_416 + 196_608  # attention scales with seq_len


def test_matmul_params_are_the_model_kernels_but_the_embedding():
    abstract = jax.eval_shape(lambda k: llama.Llama(SMALL).init(k, jnp.zeros((1, 4), jnp.int32)), jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract["params"]))[0]
    kernels = sum(int(np.prod(x.shape)) for path, x in flat if "kernel" in jax.tree_util.keystr(path))
    assert kernels == llama.matmul_param_count(SMALL)


def test_train_flops_per_token_is_xlas_count_less_the_elementwise_work():
    """XLA's cost analysis of the compiled gradient counts every op; ours counts the matmuls only."""
    cfg = llama.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_heads=4, num_layers=4,
                            max_len=64)
    model = llama.Llama(cfg)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 64), jnp.int32))["params"])

    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    cost = jax.jit(jax.grad(loss)).lower(params, jnp.zeros((2, 65), jnp.int32)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_per_token = cost["flops"] / (2 * 64)
    ours = llama.train_flops_per_token(cfg, 64)
    assert ours <= xla_per_token <= 1.1 * ours


def test_train_flops_per_token_rejects_a_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len"):
        llama.train_flops_per_token(SMALL, 0)


def _rope_reference(x, positions, theta):
    """float64 NumPy RoPE: pair (i, i + d/2) rotated by angle p * theta^(-2i/d)."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    out = np.empty_like(x)
    for p_idx, p in enumerate(positions):
        for i in range(half):
            angle = p * theta ** (-2.0 * i / x.shape[-1])
            c, s = np.cos(angle), np.sin(angle)
            a, b = x[:, p_idx, :, i], x[:, p_idx, :, i + half]
            out[:, p_idx, :, i] = a * c - b * s
            out[:, p_idx, :, i + half] = b * c + a * s
    return out


def test_rotary_embedding_matches_numpy_float64_reference():
    x = np.random.default_rng(0).normal(size=(2, 9, 3, 8))
    positions = np.arange(9) * 37  # large positions stress the angle computation
    got = llama.rotary_embedding(jnp.asarray(x, jnp.float32), jnp.asarray(positions), 10000.0)
    np.testing.assert_allclose(np.asarray(got), _rope_reference(x, positions, 10000.0), rtol=2e-5, atol=2e-5)


def test_rotary_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(1, 1, 1, 16)), rng.normal(size=(1, 1, 1, 16))
    rot = lambda x, p: np.asarray(llama.rotary_embedding(jnp.asarray(x, jnp.float32), jnp.asarray([p])))
    score = lambda pq, pk: float(np.sum(rot(q, pq) * rot(k, pk)))
    assert score(5, 2) == pytest.approx(score(103, 100), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


def test_remat_gives_the_same_loss_and_gradients():
    model, params = _init(SMALL)
    remat_model = llama.Llama(llama.LlamaConfig(**{**SMALL.__dict__, "remat": "full"}))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, SMALL.vocab_size)
    loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, tokens) ** 2)
    g1 = jax.grad(loss(model))(params)
    g2 = jax.grad(loss(remat_model))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


def test_bfloat16_compute_keeps_float32_params_and_close_logits():
    cfg16 = llama.LlamaConfig(**{**SMALL.__dict__, "dtype": "bfloat16"})
    model, params = _init(SMALL)
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, SMALL.vocab_size)
    out32 = llama.Llama(SMALL).apply({"params": params}, tokens)
    out16 = llama.Llama(cfg16).apply({"params": params}, tokens)
    assert out16.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    np.testing.assert_allclose(np.asarray(out16), np.asarray(out32), atol=0.05)


def test_parameters_carry_logical_axes():
    boxed = llama.Llama(SMALL).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["layers_0"]["attn"]["q_proj"]["kernel"]) == ("embed", "joined_kv")
    assert tuple(specs["layers_1"]["mlp"]["down_proj"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden_size": 30, "num_heads": 4}, "hidden_size=30"),
    ({"hidden_size": 12, "num_heads": 4}, "head dimension"),
    ({"num_layers": 0}, "num_layers"),
    ({"dtype": "float8"}, "float8"),
    ({"remat": "sometimes"}, "sometimes"),
])
def test_bad_config_is_rejected_with_the_value_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        llama.LlamaConfig(**kwargs)


def test_too_long_sequence_is_rejected():
    model, params = _init(SMALL)
    with pytest.raises(ValueError, match="max_len=16"):
        model.apply({"params": params}, jnp.zeros((1, 17), jnp.int32))


# ----------------------------------------------------------------------------- grouped-query attention, tied embeddings

GQA = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2,
                        num_layers=2, max_len=16)


def _replace(cfg, **changes):
    return llama.LlamaConfig(**{**cfg.__dict__, **changes})


def _count(params):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _abstract_params(cfg):
    abstract = jax.eval_shape(lambda k: llama.Llama(cfg).init(k, jnp.zeros((1, 4), jnp.int32)), jax.random.key(0))
    return nn.unbox(abstract["params"])


def test_as_many_kv_heads_as_heads_is_exactly_the_multi_head_model():
    model, params = _init(SMALL)
    same = llama.Llama(_replace(SMALL, num_kv_heads=SMALL.num_heads))
    same_params = nn.unbox(same.init(jax.random.key(0), jnp.zeros((2, 12), jnp.int32))["params"])
    assert jax.tree.structure(same_params) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, same_params, params)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, SMALL.vocab_size)
    np.testing.assert_array_equal(np.asarray(same.apply({"params": params}, tokens)),
                                  np.asarray(model.apply({"params": params}, tokens)))


def _forward_reference(cfg, params, tokens):
    """float64 NumPy forward of lorank's parameters ([in, out] kernels), key/value heads repeated explicitly."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    h, kv, hd = cfg.num_heads, cfg.kv_heads, cfg.head_dim

    def norm(x, scale):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps) * scale

    def rope(x):  # [B, T, heads, hd], pair (i, i + hd/2) rotated by t * theta^(-2i/hd)
        t = np.arange(x.shape[1])[:, None] * cfg.rope_theta ** (-np.arange(0, hd, 2) / hd)[None, :]
        cos, sin = np.cos(t)[None, :, None, :], np.sin(t)[None, :, None, :]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    x = p["embed"]["embedding"][np.asarray(tokens)]
    b, t, _ = x.shape
    mask = np.tril(np.ones((t, t), bool))
    for i in range(cfg.num_layers):
        layer = p[f"layers_{i}"]
        a = layer["attn"]
        y = norm(x, layer["attn_norm"]["scale"])
        q = rope((y @ a["q_proj"]["kernel"]).reshape(b, t, h, hd))
        k = rope((y @ a["k_proj"]["kernel"]).reshape(b, t, kv, hd))
        v = (y @ a["v_proj"]["kernel"]).reshape(b, t, kv, hd)
        k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)  # query head j -> kv head j // (h/kv)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        scores = np.where(mask, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, h * hd)
        x = x + out @ a["o_proj"]["kernel"]
        m = layer["mlp"]
        y = norm(x, layer["mlp_norm"]["scale"])
        gate = y @ m["gate_proj"]["kernel"]
        x = x + (gate / (1 + np.exp(-gate)) * (y @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
    x = norm(x, p["final_norm"]["scale"])
    head = p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
    return x @ head


@pytest.mark.parametrize("kv_heads, tied", [(2, False), (1, False), (2, True), (None, True)])
def test_gqa_and_tied_logits_match_a_numpy_float64_repeat_kv_reference(kv_heads, tied):
    cfg = _replace(GQA, num_kv_heads=kv_heads, tie_embeddings=tied, init_std=0.2)
    model, params = _init(cfg)
    tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, cfg.vocab_size)
    got = np.asarray(model.apply({"params": params}, tokens))
    expected = _forward_reference(cfg, params, tokens)
    assert got.shape == (2, 12, cfg.vocab_size)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_kv_heads_are_shared_by_consecutive_query_heads():
    """Query heads 2j and 2j + 1 of a 4-head, 2-kv-head model read kv head j: giving q heads 0 and 1 the
    same weights makes their outputs equal, and heads 0 and 2 (different kv heads) differ."""
    model, params = _init(GQA)
    cfg = GQA
    q = np.array(params["layers_0"]["attn"]["q_proj"]["kernel"]).reshape(cfg.hidden_size, cfg.num_heads, -1)
    q[:, 1] = q[:, 0]
    q[:, 2] = q[:, 0]
    x = jax.random.normal(jax.random.key(5), (1, 6, cfg.hidden_size))
    layer = {**params["layers_0"]["attn"], "q_proj": {"kernel": jnp.asarray(q.reshape(cfg.hidden_size, -1))},
             "o_proj": {"kernel": jnp.eye(cfg.hidden_size)}}
    captured = np.asarray(llama.Attention(cfg).apply({"params": layer}, x)).reshape(1, 6, cfg.num_heads, -1)
    np.testing.assert_allclose(captured[:, :, 1], captured[:, :, 0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(captured[:, 1:, 2], captured[:, 1:, 0], atol=1e-3)


@pytest.mark.parametrize("kv_heads, tied", [(2, False), (1, True), (None, True), (4, False)])
def test_counts_equal_the_parameters_of_gqa_and_tied_models(kv_heads, tied):
    cfg = _replace(GQA, num_kv_heads=kv_heads, tie_embeddings=tied)
    v, d, f, n_layers = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    kv = (kv_heads or cfg.num_heads) * cfg.head_dim
    params = _abstract_params(cfg)
    assert ("lm_head" in params) == (not tied)
    if tied:
        assert "lm_head" not in jax.eval_shape(lambda k: llama.Llama(cfg).init(k, jnp.zeros((1, 4), jnp.int32)),
                                               jax.random.key(0))["params"]
    # By hand: embedding + per layer (q, o: d d; k, v: d kv; gate, up, down: d f; 2 norms) + final norm + head.
    expected = v * d + n_layers * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d + (0 if tied else d * v)
    assert _count(params) == expected == llama.param_count(cfg)
    assert params["layers_0"]["attn"]["k_proj"]["kernel"].shape == (d, kv)
    assert params["layers_1"]["attn"]["v_proj"]["kernel"].shape == (d, kv)

    rank = 4
    lowrank = jax.eval_shape(lambda p: lora.lowrank_init(p, jax.random.key(0), rank=rank, init_std=0.02,
                                                         pattern=llama.GALORE_PATTERN), params)
    assert _count(lowrank) == llama.lowrank_param_count(cfg, rank)
    lora_tree = jax.eval_shape(lambda p: lora.lora_init(p, jax.random.key(0), rank=rank,
                                                        pattern=llama.GALORE_PATTERN), params)
    for train_others in (False, True):
        labels = jax.tree.leaves(lora.lora_labels(lora_tree, train_others=train_others))
        trainable = sum(int(np.prod(x.shape)) for x, lab in zip(jax.tree.leaves(lora_tree), labels)
                        if lab == lora.TRAINABLE)
        assert llama.lora_param_count(cfg, rank, train_others=train_others) == (_count(lora_tree), trainable)

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    kernels = sum(int(np.prod(x.shape)) for path, x in flat if "kernel" in jax.tree_util.keystr(path))
    # The tied head is a matmul with the [V, D] embedding: its D V is still multiplied.
    assert llama.matmul_param_count(cfg) == kernels + (v * d if tied else 0)


def test_rank_of_the_smaller_kv_kernels_is_checked():
    cfg = _replace(GQA, num_kv_heads=1)  # k, v kernels [32, 8]
    with pytest.raises(ValueError, match="rank=9 exceeds min"):
        llama.lowrank_param_count(cfg, 9)
    assert llama.lowrank_param_count(cfg, 8) > 0


def test_gqa_kv_kernels_keep_their_logical_axes_and_tied_models_have_no_head():
    boxed = llama.Llama(_replace(GQA, tie_embeddings=True)).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    specs = nn.get_partition_spec(boxed["params"])
    assert tuple(specs["layers_0"]["attn"]["k_proj"]["kernel"]) == ("embed", "joined_kv")
    assert tuple(specs["layers_0"]["attn"]["v_proj"]["kernel"]) == ("embed", "joined_kv")
    assert set(specs) == {"embed", "layers_0", "layers_1", "final_norm"}


@pytest.mark.parametrize("kwargs, message", [
    ({"num_kv_heads": 3}, "num_kv_heads=3 does not divide num_heads=4"),
    ({"num_kv_heads": 0}, "num_kv_heads"),
    ({"num_kv_heads": 8}, "num_kv_heads=8 does not divide"),
    ({"num_kv_heads": 2.0}, "num_kv_heads"),
    ({"tie_embeddings": "yes"}, "tie_embeddings='yes'"),
])
def test_bad_kv_heads_or_tying_is_rejected_with_the_value_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        llama.LlamaConfig(num_heads=4, **kwargs)


def test_per_layer_stages_need_untied_embeddings():
    with pytest.raises(ValueError, match="untied embeddings"):
        llama.per_layer_stages(_replace(GQA, tie_embeddings=True), inputs_of=lambda b: b, loss_of=lambda x, b: x)
    stages = llama.per_layer_stages(GQA, inputs_of=lambda b: b, loss_of=lambda logits, b: logits)
    model, params = _init(GQA)
    tokens = jax.random.randint(jax.random.key(6), (2, 12), 0, GQA.vocab_size)
    x = None
    for stage in stages:
        x = stage.apply({k: params[k] for k in stage.keys}, x, tokens)
    np.testing.assert_allclose(np.asarray(x), np.asarray(model.apply({"params": params}, tokens)), rtol=1e-6,
                               atol=1e-6)
