"""A small decoder-only transformer for the dynamics experiments, with its attention maps in reach.

The model of the Scan&Snap paper's real-data runs (Tian et al. 2023, Appendix G, whose
code is PyTorch's `nn.TransformerEncoderLayer` language-model tutorial), configurable
enough for the JoMA experiments: token embedding (optionally scaled by sqrt(width)),
positional encoding ("none", "learned" or the tutorial's interleaved "sinusoidal"),
`num_layers` blocks of multi-head self-attention (causal or not) and a ReLU or GELU MLP
of width `mlp_ratio * width`, LayerNorm before ("pre") or after ("post") each residual
sum, or none, dropout on the attention probabilities and the residual branches, and a
linear LM head with bias. Initialization follows PyTorch's modules by default
(`init="torch"`), so the paper's SGD learning rate means the same here.

Every block records its attention probabilities, float32 [batch, heads, T, T], with
`self.sow("intermediates", "attention", ...)`; `attention_maps` and
`apply_with_attention` collect them, one array per layer, lowest layer first.

Parameter paths (V vocab, D width, F = mlp_ratio * D, P max_len):

    embed/embedding                          [V, D]   ('vocab', 'embed')
    pos_embed                                [P, D]   ('length', 'embed')   positional == "learned" only
    layers_{i}/attn/{q,k,v}_proj/kernel      [D, D]   ('embed', 'joined_kv'), bias [D]
    layers_{i}/attn/o_proj/kernel            [D, D]   ('joined_kv', 'embed'), bias [D]
    layers_{i}/{attn_norm,mlp_norm}/{scale,bias}  [D] ('norm',)            norm != "none"
    layers_{i}/mlp/up/kernel                 [D, F]   ('embed', 'mlp'), bias [F]
    layers_{i}/mlp/down/kernel               [F, D]   ('mlp', 'embed'), bias [D]
    final_norm/{scale,bias}                  [D]      ('norm',)             norm == "pre" only
    lm_head/kernel                           [D, V]   ('embed', 'vocab'), bias [V]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorank import checks
from lorank.models.family import ModelFamily

NORMS = ("pre", "post", "none")
POSITIONALS = ("none", "learned", "sinusoidal")
ACTIVATIONS = {"relu": nn.relu, "gelu": functools.partial(nn.gelu, approximate=False)}  # exact GELU, as PyTorch
INITS = ("torch", "normal")
ATTENTION = "attention"  # the name attention probabilities are sown under, in collection "intermediates"

# logical axis -> mesh axis of the data/fsdp/tensor mesh (`lorank.train.mesh`); None: replicated.
AXIS_RULES = (("vocab", "tensor"), ("embed", "fsdp"), ("joined_kv", "tensor"), ("mlp", "tensor"),
              ("norm", None), ("length", None))
# The attention and MLP kernels: what GaLore would project, LoRA factor.
PROJECTED = r"(^|.*/)layers_\d+/(attn/(q|k|v|o)_proj|mlp/(up|down))/kernel"
LAYER_KINDS = ("attention", "mlp", "embedding", "lm_head")  # what `layer_kind` returns


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shapes and options of `Transformer`.

    Attributes:
      vocab_size: tokens V.
      width: residual stream width D.
      num_layers: blocks (at least 1).
      num_heads: attention heads; must divide `width`.
      mlp_ratio: MLP hidden width F = round(mlp_ratio * width) (the paper's model: 1, d_hid = emsize).
      activation: MLP nonlinearity, "relu" or "gelu".
      norm: LayerNorm placement: "pre" (x + f(LN(x)), and a final LN before the head),
        "post" (LN(x + f(x)), PyTorch's default and the paper's), or "none".
      positional: "none", "learned" (a [max_len, D] table) or "sinusoidal" (fixed; even
        features sin, odd features cos, as PyTorch's tutorial).
      causal: each query attends only to keys at or before it.
      max_len: longest sequence accepted.
      dropout: rate on the attention probabilities, on each residual branch and on the
        embedded input; active only when the model is applied with deterministic=False.
      embed_scale: multiply token embeddings by sqrt(width) (PyTorch's tutorial does).
      init: "torch" (PyTorch's default initializers of the paper's modules: embedding and
        head U(-0.1, 0.1), q/k/v Xavier-uniform of the packed [3D, D] in-projection, other
        kernels and MLP biases U(+-1/sqrt(fan_in)), attention and head biases 0) or
        "normal" (every kernel and embedding N(0, init_std^2), biases 0).
      init_std: standard deviation of init "normal" and of the learned positional table.
      layer_norm_eps: LayerNorm epsilon.
    """

    vocab_size: int = 256
    width: int = 64
    num_layers: int = 1
    num_heads: int = 1
    mlp_ratio: float = 4.0
    activation: str = "relu"
    norm: str = "post"
    positional: str = "sinusoidal"
    causal: bool = True
    max_len: int = 128
    dropout: float = 0.0
    embed_scale: bool = True
    init: str = "torch"
    init_std: float = 0.02
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "width", "num_layers", "num_heads", "max_len"):
            checks.integer(f"TransformerConfig.{name}", getattr(self, name), minimum=1)
        if self.width % self.num_heads:
            raise ValueError(f"TransformerConfig.width={self.width} is not divisible by "
                             f"num_heads={self.num_heads}")
        checks.number("TransformerConfig.mlp_ratio", self.mlp_ratio, low=0.0, low_open=True)
        if self.mlp_hidden < 1:
            raise ValueError(f"TransformerConfig.mlp_ratio={self.mlp_ratio} gives an MLP of width {self.mlp_hidden}")
        checks.one_of("TransformerConfig.activation", self.activation, tuple(ACTIVATIONS))
        checks.one_of("TransformerConfig.norm", self.norm, NORMS)
        checks.one_of("TransformerConfig.positional", self.positional, POSITIONALS)
        checks.one_of("TransformerConfig.init", self.init, INITS)
        checks.one_of("TransformerConfig.causal", self.causal, (True, False))
        checks.one_of("TransformerConfig.embed_scale", self.embed_scale, (True, False))
        checks.number("TransformerConfig.dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        checks.number("TransformerConfig.init_std", self.init_std, low=0.0, low_open=True)
        checks.number("TransformerConfig.layer_norm_eps", self.layer_norm_eps, low=0.0, low_open=True)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.mlp_ratio * self.width))


def sinusoidal_encoding(length: int, width: int) -> np.ndarray:
    """float32 [length, width]: PE[p, 2i] = sin(p w_i), PE[p, 2i + 1] = cos(p w_i), w_i = 10000^(-2i / width)."""
    positions = np.arange(length, dtype=np.float64)[:, None]
    freqs = np.exp(np.arange(0, width, 2, dtype=np.float64) * (-math.log(10000.0) / width))
    angles = positions * freqs[None, :]  # [length, ceil(width / 2)]
    pe = np.zeros((length, width), np.float64)
    pe[:, 0::2] = np.sin(angles)
    pe[:, 1::2] = np.cos(angles)[:, : width // 2]
    return pe.astype(np.float32)


def causal_mask(length: int) -> jax.Array:
    """bool [length, length]: True where key j <= query i (lower triangle with the diagonal)."""
    return jnp.tril(jnp.ones((length, length), bool))


def _uniform(limit: float):
    """U(-limit, limit) initializer."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def _boxed(init, axes):
    return nn.with_logical_partitioning(init, axes)


def _dense(cfg: TransformerConfig, features: int, axes: tuple[str, str], name: str, *, kernel_limit: float,
           bias_limit: float) -> nn.Dense:
    """A Dense layer with bias; under init "torch" U(+-kernel_limit) kernel and U(+-bias_limit) bias."""
    if cfg.init == "torch":
        kernel = _uniform(kernel_limit)
        bias = _uniform(bias_limit) if bias_limit > 0 else nn.initializers.zeros
    else:
        kernel, bias = nn.initializers.normal(cfg.init_std), nn.initializers.zeros
    return nn.Dense(features, kernel_init=_boxed(kernel, axes), bias_init=_boxed(bias, (axes[1],)), name=name)


def _layer_norm(cfg: TransformerConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, scale_init=_boxed(nn.initializers.ones, ("norm",)),
                        bias_init=_boxed(nn.initializers.zeros, ("norm",)), name=name)


class SelfAttention(nn.Module):
    """Multi-head self-attention. x [B, T, D] -> [B, T, D]; sows its probabilities [B, H, T, T] (float32).

    probs[b, h, i, j] = softmax_j(q_i . k_j / sqrt(D / H)) over the allowed keys j (j <= i when causal).
    """

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.cfg
        b, t, d = x.shape
        in_limit = math.sqrt(6.0 / (d + 3 * d))  # Xavier-uniform of PyTorch's packed [3D, D] in-projection
        heads = lambda y: y.reshape(b, t, cfg.num_heads, cfg.head_dim).transpose(0, 2, 1, 3)  # [B, H, T, hd]
        q, k, v = (heads(_dense(cfg, d, ("embed", "joined_kv"), f"{n}_proj", kernel_limit=in_limit,
                                bias_limit=0.0)(x)) for n in "qkv")
        scores = jnp.einsum("bhid,bhjd->bhij", q, k).astype(jnp.float32) / math.sqrt(cfg.head_dim)
        if cfg.causal:
            scores = jnp.where(causal_mask(t), scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)  # [B, H, T, T]
        self.sow("intermediates", ATTENTION, probs)
        probs = nn.Dropout(cfg.dropout)(probs, deterministic=deterministic)
        out = jnp.einsum("bhij,bhjd->bhid", probs.astype(v.dtype), v).transpose(0, 2, 1, 3).reshape(b, t, d)
        return _dense(cfg, d, ("joined_kv", "embed"), "o_proj", kernel_limit=1 / math.sqrt(d), bias_limit=0.0)(out)


class MLP(nn.Module):
    """down(act(up(x))), hidden width F. [B, T, D] -> [B, T, D]."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.cfg
        d, f = cfg.width, cfg.mlp_hidden
        h = _dense(cfg, f, ("embed", "mlp"), "up", kernel_limit=1 / math.sqrt(d), bias_limit=1 / math.sqrt(d))(x)
        h = nn.Dropout(cfg.dropout)(ACTIVATIONS[cfg.activation](h), deterministic=deterministic)
        return _dense(cfg, d, ("mlp", "embed"), "down", kernel_limit=1 / math.sqrt(f), bias_limit=1 / math.sqrt(f))(h)


class Block(nn.Module):
    """One residual block. norm "pre": x + f(LN(x)); "post": LN(x + f(x)); "none": x + f(x); f = attention, then MLP."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.cfg
        drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
        sublayers = (("attn", SelfAttention(cfg, name="attn")), ("mlp", MLP(cfg, name="mlp")))
        for name, layer in sublayers:
            if cfg.norm == "pre":
                x = x + drop(layer(_layer_norm(cfg, f"{name}_norm")(x), deterministic))
            elif cfg.norm == "post":
                x = _layer_norm(cfg, f"{name}_norm")(x + drop(layer(x, deterministic)))
            else:
                x = x + drop(layer(x, deterministic))
        return x


class Transformer(nn.Module):
    """Decoder-only LM. tokens int [B, T], T <= max_len -> logits float32 [B, T, V].

    Apply with `deterministic=False` and an rng stream "dropout" to train with dropout.
    """

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
        t = tokens.shape[1]
        if t > cfg.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={cfg.max_len}")
        embed_init = _uniform(0.1) if cfg.init == "torch" else nn.initializers.normal(cfg.init_std)
        x = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=_boxed(embed_init, ("vocab", "embed")),
                     name="embed")(tokens)
        if cfg.embed_scale:
            x = x * math.sqrt(cfg.width)
        if cfg.positional == "sinusoidal":
            x = x + jnp.asarray(sinusoidal_encoding(t, cfg.width))[None]
        elif cfg.positional == "learned":
            table = self.param("pos_embed", _boxed(nn.initializers.normal(cfg.init_std), ("length", "embed")),
                               (cfg.max_len, cfg.width))
            x = x + table[None, :t]
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        for i in range(cfg.num_layers):
            x = Block(cfg, name=f"layers_{i}")(x, deterministic)
        if cfg.norm == "pre":
            x = _layer_norm(cfg, "final_norm")(x)
        head_limit = 0.1
        logits = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head", kernel_limit=head_limit,
                        bias_limit=0.0)(x)
        return logits.astype(jnp.float32)


def init_params(model: Transformer, key: jax.Array, seq_len: int = 1) -> Any:
    """The model's parameters (boxed with logical axes; `nn.unbox` for plain arrays)."""
    return model.init(key, jnp.zeros((1, seq_len), jnp.int32))["params"]


def apply_with_attention(model: Transformer, params: Any, tokens: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """(logits float32 [B, T, V], [attention probabilities float32 [B, H, T, T] per layer, lowest first]).

    Deterministic (no dropout); `params` plain or boxed.
    """
    logits, state = model.apply({"params": nn.unbox(params)}, tokens, mutable=["intermediates"])
    inter = state["intermediates"]
    maps = [inter[f"layers_{i}"]["attn"][ATTENTION][0] for i in range(model.cfg.num_layers)]
    return logits, maps


def attention_maps(model: Transformer, params: Any, tokens: jax.Array) -> list[jax.Array]:
    """Each layer's attention probabilities on `tokens` int [B, T]: a list of num_layers float32 [B, H, T, T]."""
    return apply_with_attention(model, params, tokens)[1]


def layer_kind(path: tuple) -> str | None:
    """Layer kind of a parameter path: attention, mlp, embedding (token and positional), lm_head, or None (norms)."""
    names = [str(getattr(k, "key", k)) for k in path]
    if "attn" in names:
        return "attention"
    if "mlp" in names:
        return "mlp"
    if names and names[0] in ("embed", "pos_embed"):
        return "embedding"
    if names and names[0] == "lm_head":
        return "lm_head"
    return None


FAMILY = ModelFamily(name="attention", axis_rules=AXIS_RULES, projected=PROJECTED, layer_kind=layer_kind)
