"""The dynamics transformer: attention rows, causality, a float64 NumPy forward, init, errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorank.models import attention

SMALL = dict(vocab_size=23, width=12, num_heads=3, mlp_ratio=2.0, max_len=10)


def _model(**overrides):
    cfg = attention.TransformerConfig(**{**SMALL, **overrides})
    model = attention.Transformer(cfg)
    params = nn.unbox(attention.init_params(model, jax.random.key(0), 4))
    return model, params


def _tokens(batch=3, length=7, vocab=SMALL["vocab_size"], seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


# ----------------------------------------------------------------------------- NumPy float64 reference


def _layer_norm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p):
    return x @ p["kernel"] + p["bias"]


def _gelu_exact(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def reference_forward(cfg, params, tokens):
    """The model written out in float64 NumPy: (logits [B, T, V], [probs [B, H, T, T] per layer])."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    d, h = cfg.width, cfg.num_heads
    hd = d // h
    x = p["embed"]["embedding"][tokens] * (math.sqrt(d) if cfg.embed_scale else 1.0)
    if cfg.positional == "sinusoidal":
        pe = np.zeros((t, d))
        for pos in range(t):
            for i in range(d):
                angle = pos / 10000 ** ((i - i % 2) / d)  # features 2k and 2k + 1 share a frequency
                pe[pos, i] = math.sin(angle) if i % 2 == 0 else math.cos(angle)
        x = x + pe
    elif cfg.positional == "learned":
        x = x + p["pos_embed"][:t]
    act = (lambda z: np.maximum(z, 0.0)) if cfg.activation == "relu" else _gelu_exact
    maps = []
    for layer in range(cfg.num_layers):
        lp = p[f"layers_{layer}"]

        def attn(z, lp=lp):
            q, k, v = (_dense(z, lp["attn"][f"{n}_proj"]).reshape(b, t, h, hd) for n in "qkv")
            scores = np.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
            if cfg.causal:
                scores = np.where(np.tril(np.ones((t, t))) > 0, scores, -np.inf)
            scores = scores - scores.max(-1, keepdims=True)
            probs = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
            maps.append(probs)
            out = np.einsum("bhij,bjhd->bihd", probs, v).reshape(b, t, d)
            return _dense(out, lp["attn"]["o_proj"])

        def mlp(z, lp=lp):
            return _dense(act(_dense(z, lp["mlp"]["up"])), lp["mlp"]["down"])

        for name, f in (("attn", attn), ("mlp", mlp)):
            if cfg.norm == "pre":
                x = x + f(_layer_norm(x, lp[f"{name}_norm"], cfg.layer_norm_eps))
            elif cfg.norm == "post":
                x = _layer_norm(x + f(x), lp[f"{name}_norm"], cfg.layer_norm_eps)
            else:
                x = x + f(x)
    if cfg.norm == "pre":
        x = _layer_norm(x, p["final_norm"], cfg.layer_norm_eps)
    return _dense(x, p["lm_head"]), maps


@pytest.mark.parametrize("overrides", [
    dict(num_layers=1),  # the paper's block: post-LN, ReLU, sinusoidal positions, scaled embeddings
    dict(num_layers=2, norm="pre", positional="learned", activation="gelu"),
    dict(num_layers=2, norm="none", positional="none", embed_scale=False, causal=False, init="normal",
         init_std=0.3),
])
def test_forward_matches_a_float64_numpy_reference(overrides):
    model, params = _model(**overrides)
    if model.cfg.positional == "learned":  # the learned table starts near zero: make it matter
        params["pos_embed"] = jax.random.normal(jax.random.key(5), params["pos_embed"].shape)
    tokens = _tokens()
    logits, maps = attention.apply_with_attention(model, params, tokens)
    ref_logits, ref_maps = reference_forward(model.cfg, params, tokens)
    np.testing.assert_allclose(np.asarray(logits, np.float64), ref_logits, rtol=2e-4, atol=2e-5)
    assert len(maps) == len(ref_maps) == model.cfg.num_layers
    for got, want in zip(maps, ref_maps):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-4, atol=1e-6)


def test_sinusoidal_encoding_by_hand():
    pe = attention.sinusoidal_encoding(3, 4)
    # position 0: sin 0 = 0 on even features, cos 0 = 1 on odd ones
    np.testing.assert_allclose(pe[0], [0.0, 1.0, 0.0, 1.0], atol=1e-7)
    # position 2: frequencies 1 and 10000^(-1/2) = 0.01
    np.testing.assert_allclose(pe[2], [math.sin(2), math.cos(2), math.sin(0.02), math.cos(0.02)], rtol=1e-6)
    odd = attention.sinusoidal_encoding(2, 5)  # odd width: the last feature is a sine
    np.testing.assert_allclose(odd[1], [math.sin(1), math.cos(1), math.sin(0.01 ** 0.8), math.cos(0.01 ** 0.8),
                                        math.sin(1e-4 ** 0.8)], rtol=1e-5)


def test_two_token_attention_by_hand():
    """T = 2, causal: query 0 sees only key 0; query 1 splits by softmax(q1.k0, q1.k1) / sqrt(hd)."""
    model, params = _model(num_layers=1, num_heads=1, positional="none", norm="none")
    tokens = jnp.array([[3, 8]])
    (probs,) = attention.attention_maps(model, params, tokens)
    a = params["layers_0"]["attn"]
    x = np.asarray(params["embed"]["embedding"], np.float64)[[3, 8]] * math.sqrt(SMALL["width"])
    q = x[1] @ np.asarray(a["q_proj"]["kernel"]) + np.asarray(a["q_proj"]["bias"])
    k = x @ np.asarray(a["k_proj"]["kernel"]) + np.asarray(a["k_proj"]["bias"])
    s = k @ q / math.sqrt(SMALL["width"])
    p1 = math.exp(s[1]) / (math.exp(s[0]) + math.exp(s[1]))
    np.testing.assert_allclose(np.asarray(probs[0, 0]), [[1.0, 0.0], [1.0 - p1, p1]], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("norm", attention.NORMS)
def test_attention_rows_sum_to_one_and_are_causal(norm):
    model, params = _model(num_layers=2, norm=norm)
    maps = attention.attention_maps(model, params, _tokens(batch=2, length=9))
    assert len(maps) == 2
    upper = np.triu(np.ones((9, 9), bool), k=1)
    for probs in maps:
        probs = np.asarray(probs)
        assert probs.shape == (2, SMALL["num_heads"], 9, 9)
        assert probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
        assert np.all(probs[..., upper] == 0.0)
        assert np.all(probs[..., ~upper] > 0.0)


def test_non_causal_attention_sees_the_future():
    model, params = _model(num_layers=1, causal=False)
    (probs,) = attention.attention_maps(model, params, _tokens(length=6))
    probs = np.asarray(probs)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert np.all(probs[..., np.triu(np.ones((6, 6), bool), k=1)] > 0.0)


def test_changing_token_t_never_changes_logits_before_t():
    model, params = _model(num_layers=2)
    tokens = _tokens(batch=2, length=8)
    base = model.apply({"params": params}, tokens)
    for t in (0, 4, 7):
        out = model.apply({"params": params}, tokens.at[:, t].set((tokens[:, t] + 5) % SMALL["vocab_size"]))
        np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
        assert not np.allclose(out[:, t], base[:, t])


def test_output_shapes_sown_maps_and_jit():
    model, params = _model(num_layers=3)
    tokens = _tokens(batch=2, length=5)
    logits, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
    assert logits.shape == (2, 5, SMALL["vocab_size"]) and logits.dtype == jnp.float32
    sown = [state["intermediates"][f"layers_{i}"]["attn"][attention.ATTENTION][0] for i in range(3)]
    jitted = jax.jit(lambda p, x: attention.attention_maps(model, p, x))(params, tokens)
    for a, b in zip(sown, jitted):
        assert a.shape == (2, SMALL["num_heads"], 5, 5)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_dropout_only_when_not_deterministic():
    model, params = _model(num_layers=1, dropout=0.5)
    tokens = _tokens()
    plain = model.apply({"params": params}, tokens)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(model.apply({"params": params}, tokens)))
    dropped = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(np.asarray(dropped), np.asarray(plain))


@pytest.mark.parametrize("norm, positional", [("post", "sinusoidal"), ("pre", "learned"), ("none", "none")])
def test_parameter_count_by_hand(norm, positional):
    v, d, f, n_layers, max_len = 23, 12, 24, 2, 10
    model, params = _model(num_layers=n_layers, norm=norm, positional=positional)
    counted = sum(x.size for x in jax.tree.leaves(params))
    per_layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + (4 * d if norm != "none" else 0)
    expected = v * d + n_layers * per_layer + (d * v + v) + (2 * d if norm == "pre" else 0) \
        + (max_len * d if positional == "learned" else 0)
    assert counted == expected


def test_torch_initialization_ranges():
    d = 64
    model = attention.Transformer(attention.TransformerConfig(vocab_size=50, width=d, num_heads=4, num_layers=1))
    p = nn.unbox(attention.init_params(model, jax.random.key(0)))
    a, m = p["layers_0"]["attn"], p["layers_0"]["mlp"]
    bounds = [(p["embed"]["embedding"], 0.1), (p["lm_head"]["kernel"], 0.1),
              (a["q_proj"]["kernel"], math.sqrt(6 / (4 * d))), (a["o_proj"]["kernel"], 1 / math.sqrt(d)),
              (m["up"]["kernel"], 1 / math.sqrt(d)), (m["up"]["bias"], 1 / math.sqrt(d)),
              (m["down"]["kernel"], 1 / math.sqrt(4 * d))]
    for value, limit in bounds:
        value = np.abs(np.asarray(value))
        assert value.max() <= limit and value.max() > 0.9 * limit  # uniform on (-limit, limit)
    for zero in (a["q_proj"]["bias"], a["o_proj"]["bias"], p["lm_head"]["bias"]):
        assert not np.any(np.asarray(zero))


@pytest.mark.parametrize("overrides, message", [
    (dict(width=10, num_heads=3), "width=10 is not divisible by num_heads=3"),
    (dict(num_layers=0), "num_layers must be an integer >= 1, got 0"),
    (dict(norm="sandwich"), "norm must be one of ('pre', 'post', 'none'), got 'sandwich'"),
    (dict(positional="rope"), "positional must be one of ('none', 'learned', 'sinusoidal'), got 'rope'"),
    (dict(activation="tanh"), "activation must be one of ('relu', 'gelu'), got 'tanh'"),
    (dict(dropout=1.0), "dropout must be a number in [0, 1), got 1.0"),
    (dict(init="xavier"), "init must be one of ('torch', 'normal'), got 'xavier'"),
])
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError) as err:
        attention.TransformerConfig(**{**SMALL, **overrides})
    assert message in str(err.value)


def test_too_long_or_badly_shaped_input_is_an_error():
    model, params = _model(num_layers=1)
    with pytest.raises(ValueError, match="sequence length 11 exceeds max_len=10"):
        model.apply({"params": params}, jnp.zeros((1, 11), jnp.int32))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, seq\]"):
        model.apply({"params": params}, jnp.zeros((4,), jnp.int32))


def test_family_kinds():
    _, params = _model(num_layers=1, norm="pre", positional="learned")
    kinds = {attention.layer_kind(tuple(path)) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert kinds == {"attention", "mlp", "embedding", "lm_head", None}
    mask = attention.FAMILY.galore_mask(params)
    assert mask["layers_0"]["attn"]["q_proj"]["kernel"] and mask["layers_0"]["mlp"]["down"]["kernel"]
    assert not mask["layers_0"]["attn"]["q_proj"]["bias"] and not mask["embed"]["embedding"]
