"""A LLaMA-style decoder-only transformer in flax.linen.

RMSNorm (pre-norm), rotary position embeddings (rotate-half convention), causal
multi-head attention with optional grouped-query attention (`num_kv_heads` key/value
heads, each shared by num_heads / num_kv_heads query heads), SwiGLU MLP and an LM
head that is its own matrix or, with `tie_embeddings`, the transposed embedding.
The layout and numerics are those of Hugging Face's LlamaForCausalLM, so
`lorank.models.hf` reads and writes its checkpoints. Every kernel is a plain
2-D matrix (one `nn.Dense` per projection, as in the reference PyTorch models),
so GaLore and LoRA see the same matrices the papers project, and every
parameter carries logical axis names for sharding. `FAMILY` describes the model
to the generic layers: its logical-axis rules, the kernels GaLore projects, the
layer kind of every parameter and the stages of the per-layer update.

Parameter paths (V vocab, D hidden, F intermediate, L layers, K = num_kv_heads * head_dim,
which is D without grouped-query attention):

    embed/embedding                         [V, D]  ('vocab', 'embed')
    layers_{i}/attn_norm/scale              [D]     ('norm',)
    layers_{i}/attn/q_proj/kernel           [D, D]  ('embed', 'joined_kv')
    layers_{i}/attn/{k,v}_proj/kernel       [D, K]  ('embed', 'joined_kv')
    layers_{i}/attn/o_proj/kernel           [D, D]  ('joined_kv', 'embed')
    layers_{i}/mlp_norm/scale               [D]     ('norm',)
    layers_{i}/mlp/{gate,up}_proj/kernel    [D, F]  ('embed', 'mlp')
    layers_{i}/mlp/down_proj/kernel         [F, D]  ('mlp', 'embed')
    final_norm/scale                        [D]     ('norm',)
    lm_head/kernel                          [D, V]  ('embed', 'vocab'); absent with tie_embeddings
                                                    (logits = x embedding^T)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorank import checks
from lorank.models.family import ModelFamily, Stage

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


# logical axis -> mesh axis of the data/fsdp/tensor mesh (`lorank.train.mesh`), None: replicated.
AXIS_RULES = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("joined_kv", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("length", None),
    ("head_dim", None),
)
# The attention and MLP kernels, layers_{i}/attn/{q,k,v,o}_proj/kernel and layers_{i}/mlp/{gate,up,down}_proj/kernel:
# what the GaLore paper projects; embeddings, the LM head and the RMSNorm scales stay full-rank.
GALORE_PATTERN = r"(^|.*/)layers_\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"
LAYER_KINDS = ("attention", "mlp", "embedding", "lm_head")  # what `layer_kind` returns, in reporting order


def _as_dtype(value: Any, field: str) -> Any:
    if isinstance(value, str):
        if value not in DTYPES:
            raise ValueError(f"{field}={value!r} is not one of {sorted(DTYPES)}")
        return DTYPES[value]
    return value


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and numerics of the model.

    `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters;
    either may be given as a string ("float32", "bfloat16"). `remat` is "none" or
    one of REMAT_POLICIES (True means "full"). `num_kv_heads` is the number of
    key/value heads (None: num_heads, plain multi-head attention); it divides
    num_heads, and query head h attends with key/value head h // (num_heads / num_kv_heads).
    `tie_embeddings` computes the logits with the transposed embedding instead of an
    lm_head kernel.
    """

    vocab_size: int = 256
    hidden_size: int = 256
    intermediate_size: int = 688
    num_heads: int = 4
    num_layers: int = 4
    max_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: Any = "none"
    num_kv_heads: int | None = None
    tie_embeddings: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_layers", "max_len"):
            checks.integer(f"LlamaConfig.{name}", getattr(self, name), minimum=1)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"head dimension hidden_size/num_heads={self.hidden_size // self.num_heads} must be even for "
                "rotary embeddings")
        if self.num_kv_heads is not None:
            checks.integer("LlamaConfig.num_kv_heads", self.num_kv_heads, minimum=1)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(
                    f"num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings={self.tie_embeddings!r} is not a bool")
        object.__setattr__(self, "dtype", _as_dtype(self.dtype, "dtype"))
        object.__setattr__(self, "param_dtype", _as_dtype(self.param_dtype, "param_dtype"))
        remat = {True: "full", False: "none"}.get(self.remat, self.remat)
        if remat != "none" and remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not 'none' or one of {sorted(REMAT_POLICIES)}")
        object.__setattr__(self, "remat", remat)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads: num_kv_heads, or num_heads when that is None."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def kv_size(self) -> int:
        """K = kv_heads * head_dim, the output width of k_proj and v_proj."""
        return self.kv_heads * self.head_dim


def _kernel_shapes(cfg: LlamaConfig) -> list[tuple[int, int]]:
    """Shapes of one block's kernels: q, k, v, o, gate, up, down."""
    d, f, k = cfg.hidden_size, cfg.intermediate_size, cfg.kv_size
    return [(d, d), (d, k), (d, k), (d, d), (d, f), (d, f), (f, d)]


def _outside_blocks(cfg: LlamaConfig) -> int:
    """Parameters outside the blocks' kernels: embedding V D, L x 2 D norm scales, final norm D, LM head D V
    (none with tied embeddings)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    return v * d + cfg.num_layers * 2 * d + d + (0 if cfg.tie_embeddings else d * v)


def param_count(cfg: LlamaConfig) -> int:
    """Closed-form number of parameters: embeddings, L blocks, final norm, LM head.

    Per block: q and o 2 D^2, k and v 2 D K (K = num_kv_heads * head_dim), gate, up, down 3 D F,
    two norms 2 D; plus the embedding V D, the final norm D and the LM head D V (none when tied).
    """
    return cfg.num_layers * sum(m * n for m, n in _kernel_shapes(cfg)) + _outside_blocks(cfg)


def _check_factor_rank(cfg: LlamaConfig, rank: int) -> None:
    checks.integer("rank", rank, minimum=1)
    for shape in _kernel_shapes(cfg):
        if rank > min(shape):
            raise ValueError(f"rank={rank} exceeds min{shape}={min(shape)} of a kernel of shape {shape}")


def lowrank_param_count(cfg: LlamaConfig, rank: int) -> int:
    """Closed-form parameter count with every projection factored at rank r (the low-rank baseline).

    Per layer: r (m + n) for each kernel [m, n], i.e. 2 r (D + D) for q and o, 2 r (D + K) for
    k and v, 3 r (D + F) for the MLP, and 2 D norms; plus embeddings V D, final norm D and
    LM head D V (none when tied).
    """
    _check_factor_rank(cfg, rank)
    factors = cfg.num_layers * sum(rank * (m + n) for m, n in _kernel_shapes(cfg))
    return factors + _outside_blocks(cfg)


def lora_param_count(cfg: LlamaConfig, rank: int, *, train_others: bool = True) -> tuple[int, int]:
    """(total, trainable) parameters with LoRA of rank r on every projection.

    Total = full model + L sum_kernels r (m + n) (see `lowrank_param_count`); trainable = the
    factors, plus embeddings, norms and LM head (when untied) when `train_others`.
    """
    _check_factor_rank(cfg, rank)
    factors = cfg.num_layers * sum(rank * (m + n) for m, n in _kernel_shapes(cfg))
    return param_count(cfg) + factors, factors + (_outside_blocks(cfg) if train_others else 0)


def matmul_param_count(cfg: LlamaConfig) -> int:
    """Parameters that multiply activations in a matmul: L blocks of q and o (2 D^2), k and v (2 D K,
    K = num_kv_heads * head_dim) and gate, up, down (3 D F), and the LM head (D V). The embedding
    (a row lookup) and the norm scales are left out; with tied embeddings the head's D V is still
    counted, since the logits are a matmul with the transposed embedding."""
    d, v = cfg.hidden_size, cfg.vocab_size
    return cfg.num_layers * sum(m * n for m, n in _kernel_shapes(cfg)) + d * v


def train_flops_per_token(cfg: LlamaConfig, seq_len: int) -> int:
    """Floating-point operations of one training step (forward and backward) per token at `seq_len`.

    6 per matmul parameter (`matmul_param_count`): a multiply-add is 2 flops in the
    forward pass, and the backward pass does it twice (the gradient of the input and
    of the weight). Attention adds, per layer and token, the scores Q K^T and the
    weighted sum P V, 2 * seq_len * D flops each in the forward pass (every query head attends,
    so grouped-query attention does not change them), times 3 with the
    backward pass: 12 * L * seq_len * D. The full seq_len x seq_len score matrix is
    counted, as XLA computes it (the causal mask skips no work). Norms, rotary
    embeddings, softmax, SiLU, the loss and the optimizer are O(D) per token and left
    out. This is the count of nanoGPT's `estimate_mfu` and the PaLM paper's appendix B.
    """
    checks.integer("seq_len", seq_len, minimum=1)
    return 6 * matmul_param_count(cfg) + 12 * cfg.num_layers * seq_len * cfg.hidden_size


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotates query/key features by position (RoPE, rotate-half convention).

    Feature pair (i, i + d/2) at position p is rotated by the angle
    p * theta^(-2i/d), so the dot product of a rotated query and key depends only
    on their relative position.

    Args:
      x: [batch, seq, heads, head_dim] queries or keys; head_dim even.
      positions: [seq] integer positions.
      theta: the base of the geometric frequency sequence.
    Returns:
      [batch, seq, heads, head_dim], same dtype as `x` (angles in float32).
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [seq, half]
    cos = jnp.cos(angles)[None, :, None, :]
    sin = jnp.sin(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def _dense(features: int, axes: tuple[str, str], cfg: LlamaConfig, name: str) -> nn.Dense:
    init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)
    return nn.Dense(features, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=init, name=name)


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32. x: [..., D] -> [..., D]."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary embeddings. [B, T, D] -> [B, T, D].

    q: [B, T, num_heads, head_dim]; k, v: [B, T, kv_heads, head_dim]. With fewer key/value
    heads, `jax.nn.dot_product_attention` groups the query heads: query head h uses key/value
    head h // (num_heads / kv_heads), Hugging Face's `repeat_kv`.
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        b, t, d = x.shape
        q = _dense(d, ("embed", "joined_kv"), cfg, "q_proj")(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
        kv_shape = (b, t, cfg.kv_heads, cfg.head_dim)
        k = _dense(cfg.kv_size, ("embed", "joined_kv"), cfg, "k_proj")(x).reshape(kv_shape)
        v = _dense(cfg.kv_size, ("embed", "joined_kv"), cfg, "v_proj")(x).reshape(kv_shape)
        positions = jnp.arange(t)
        q = rotary_embedding(q, positions, cfg.rope_theta)
        k = rotary_embedding(k, positions, cfg.rope_theta)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # softmax in float32
        return _dense(d, ("joined_kv", "embed"), cfg, "o_proj")(out.reshape(b, t, d))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)). [B, T, D] -> [B, T, D]."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = _dense(cfg.intermediate_size, ("embed", "mlp"), cfg, "gate_proj")(x)
        up = _dense(cfg.intermediate_size, ("embed", "mlp"), cfg, "up_proj")(x)
        return _dense(cfg.hidden_size, ("mlp", "embed"), cfg, "down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)
        x = x + Attention(cfg, name="attn")(norm("attn_norm")(x))
        return x + SwiGLU(cfg, name="mlp")(norm("mlp_norm")(x))


class Llama(nn.Module):
    """Decoder-only LM. tokens: int [B, T] with T <= max_len -> logits float32 [B, T, V]."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, tokens):
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
        if tokens.shape[1] > cfg.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len={cfg.max_len}")
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
                         name="embed")
        x = embed(tokens)
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=True)
        for i in range(cfg.num_layers):
            x = block(cfg, name=f"layers_{i}")(x)
        x = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = _dense(cfg.vocab_size, ("embed", "vocab"), cfg, "lm_head")(x)
        return logits.astype(jnp.float32)


def layer_kind(path: tuple) -> str | None:
    """Layer kind of a parameter path: attention, mlp, embedding, lm_head, or None (norm scales)."""
    names = [str(getattr(k, "key", k)) for k in path]
    if "attn" in names:
        return "attention"
    if "mlp" in names:
        return "mlp"
    if names and names[0] == "embed":
        return "embedding"
    if names and names[0] == "lm_head":
        return "lm_head"
    return None


def per_layer_stages(cfg: LlamaConfig, *, inputs_of: Callable[[Any], jax.Array],
                     loss_of: Callable[[jax.Array, Any], jax.Array]) -> list[Stage]:
    """The model as the per-layer update walks it: the embedding of `inputs_of(batch)` (int [B, T]),
    the blocks layers_0 .. layers_{L-1}, then the final norm and LM head, whose float32 logits
    [B, T, V] go to `loss_of(logits, batch)`. The same function as `Llama(cfg)` without remat.

    Raises:
      ValueError: `cfg.tie_embeddings`: the head would need the embedding stage's parameters, and
        each stage owns its parameters, so the per-layer update needs untied embeddings.
    """
    if cfg.tie_embeddings:
        raise ValueError("tie_embeddings=True: the per-layer update needs untied embeddings (the LM head "
                         "stage would use the embedding stage's parameters)")
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    block = Block(cfg)
    norm = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype)
    lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    def head(params, x, batch):
        x = norm.apply({"params": params["final_norm"]}, x)
        return loss_of(lm_head.apply({"params": params["lm_head"]}, x).astype(jnp.float32), batch)

    blocks = [Stage((f"layers_{i}",), lambda params, x, batch, name=f"layers_{i}": block.apply(
        {"params": params[name]}, x)) for i in range(cfg.num_layers)]
    return [Stage(("embed",), lambda params, x, batch: embed.apply({"params": params["embed"]}, inputs_of(batch))),
            *blocks, Stage(("final_norm", "lm_head"), head)]


FAMILY = ModelFamily(name="llama", axis_rules=AXIS_RULES, projected=GALORE_PATTERN, layer_kind=layer_kind,
                     stages=per_layer_stages)


def galore_mask(params: Any) -> Any:
    """True at the attention and MLP kernels of `Llama` parameters (`FAMILY.galore_mask`), e.g.
    `lorank.optim.galore_adamw(lr, rank, galore_mask=lorank.models.llama.galore_mask)`."""
    return FAMILY.galore_mask(params)
