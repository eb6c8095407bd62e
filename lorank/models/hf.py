"""Hugging Face LLaMA checkpoints in and out: `load_llama` and `save_llama`.

A Hugging Face checkpoint directory holds `config.json` and the weights as
`model.safetensors`, or as shards `model-00001-of-0000N.safetensors` listed by
`model.safetensors.index.json` (its `weight_map`: tensor name -> shard file).
`load_llama` turns one into a `lorank.models.llama.Llama` and its parameters;
`save_llama` writes the parameters back in that format, which
`transformers.LlamaForCausalLM.from_pretrained` reads.

Layout (L layers; Hugging Face stores a linear layer's weight as [out, in], y = x W^T,
lorank's `nn.Dense` kernel is [in, out], y = x K, so K = W^T):

    Hugging Face tensor                                   lorank parameter
    model.embed_tokens.weight               [V, D]        embed/embedding                  [V, D]
    model.layers.{i}.input_layernorm.weight [D]           layers_{i}/attn_norm/scale       [D]
    model.layers.{i}.self_attn.q_proj.weight [D, D]       layers_{i}/attn/q_proj/kernel    [D, D]   transposed
    model.layers.{i}.self_attn.{k,v}_proj.weight [K, D]   layers_{i}/attn/{k,v}_proj/kernel [D, K]  transposed
    model.layers.{i}.self_attn.o_proj.weight [D, D]       layers_{i}/attn/o_proj/kernel    [D, D]   transposed
    model.layers.{i}.post_attention_layernorm.weight [D]  layers_{i}/mlp_norm/scale        [D]
    model.layers.{i}.mlp.{gate,up}_proj.weight [F, D]     layers_{i}/mlp/{gate,up}_proj/kernel [D, F] transposed
    model.layers.{i}.mlp.down_proj.weight   [D, F]        layers_{i}/mlp/down_proj/kernel  [F, D]   transposed
    model.norm.weight                       [D]           final_norm/scale                 [D]
    lm_head.weight                          [V, D]        lm_head/kernel                   [D, V]   transposed
                                                          (absent when the embeddings are tied)

with K = num_key_value_heads * head_dim. Hugging Face's q_proj and k_proj rows are
already in the order of its rotate-half RoPE (feature i pairs with i + head_dim/2),
which is what `llama.rotary_embedding` computes, so no permutation is applied.

Loading reads one tensor at a time (`safetensors.safe_open(..., framework="np")`
and `get_slice`). With a `mesh`, each parameter's sharding comes from its logical
axes and `llama.AXIS_RULES`, and `jax.make_array_from_callback` reads from the
file only the block each local device holds, so host memory holds at most one
tensor's blocks at a time, never a second copy of the model. safetensors' NumPy
backend reads and writes BF16 tensors as `ml_dtypes.bfloat16` arrays directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import re
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from lorank import checks
from lorank.models import llama, lora

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
MAX_SHARD_BYTES = 5_000_000_000  # transformers' default max_shard_size, "5GB"
# safetensors dtype codes -> NumPy dtypes (bfloat16: ml_dtypes, as JAX uses).
STORED_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                 "BF16": np.dtype(jnp.bfloat16)}
# Buffers some checkpoints carry that the model recomputes from rope_theta: skipped when present.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class Entry(NamedTuple):
    """Where one Hugging Face tensor goes: lorank parameter path, the tensor's [out, in] shape, transposed?"""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    transpose: bool


def hf_layout(cfg: llama.LlamaConfig) -> dict[str, Entry]:
    """The Hugging Face tensors of the model `cfg` describes, in the model's order: name -> `Entry`."""
    d, f, v, k = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.kv_size
    out = {"model.embed_tokens.weight": Entry(("embed", "embedding"), (v, d), False)}
    for i in range(cfg.num_layers):
        hf, lo = f"model.layers.{i}", f"layers_{i}"
        for name, shape in (("q_proj", (d, d)), ("k_proj", (k, d)), ("v_proj", (k, d)), ("o_proj", (d, d))):
            out[f"{hf}.self_attn.{name}.weight"] = Entry((lo, "attn", name, "kernel"), shape, True)
        for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
            out[f"{hf}.mlp.{name}.weight"] = Entry((lo, "mlp", name, "kernel"), shape, True)
        out[f"{hf}.input_layernorm.weight"] = Entry((lo, "attn_norm", "scale"), (d,), False)
        out[f"{hf}.post_attention_layernorm.weight"] = Entry((lo, "mlp_norm", "scale"), (d,), False)
    out["model.norm.weight"] = Entry(("final_norm", "scale"), (d,), False)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = Entry(("lm_head", "kernel"), (v, d), True)
    return out


# ----------------------------------------------------------------------------- config.json


def _dtype(value: Any, what: str) -> np.dtype:
    """A parameter dtype (float32, bfloat16, float16) from its name or a dtype."""
    if isinstance(value, str):
        if value not in llama.DTYPES:
            raise ValueError(f"{what}={value!r} is not one of {sorted(llama.DTYPES)}")
        return np.dtype(llama.DTYPES[value])
    dtype = np.dtype(value)
    if dtype not in {np.dtype(x) for x in llama.DTYPES.values()}:
        raise ValueError(f"{what}={dtype} is not one of {sorted(llama.DTYPES)}")
    return dtype


def _dtype_name(dtype: np.dtype) -> str:
    return next(name for name, d in llama.DTYPES.items() if np.dtype(d) == dtype)


def _rope_theta(hf: Mapping, source: Any) -> float:
    """rope_theta of a config, refusing any RoPE variant but the default one.

    transformers < 5 writes `rope_theta` and `rope_scaling` (null for plain RoPE);
    transformers >= 5 writes `rope_parameters` = {"rope_type": "default", "rope_theta": ...}.
    """
    theta = hf.get("rope_theta")
    for field in ("rope_scaling", "rope_parameters"):
        params = hf.get(field)
        if params is None:
            continue
        kind = params.get("rope_type", params.get("type")) if isinstance(params, Mapping) else params
        extra = set(params) - {"rope_type", "type", "rope_theta"} if isinstance(params, Mapping) else set()
        if kind not in (None, "default") or extra:
            raise ValueError(f"{source}: {field}={params!r} is not supported: lorank's LLaMA computes plain "
                             "RoPE only (rope_type 'default', no scaling)")
        if "rope_theta" in params:
            if theta is not None and float(theta) != float(params["rope_theta"]):
                raise ValueError(f"{source}: rope_theta={theta!r} disagrees with {field}.rope_theta="
                                 f"{params['rope_theta']!r}")
            theta = params["rope_theta"]
    theta = 10000.0 if theta is None else theta
    return float(checks.number(f"{source}: rope_theta", theta, low=0.0, low_open=True))


def config_from_hf(hf: Mapping, *, source: Any = CONFIG_FILE, param_dtype: Any = jnp.float32) -> llama.LlamaConfig:
    """The `LlamaConfig` of a Hugging Face LLaMA (or sliding-window-free Mistral) config.json dict.

    vocab_size, hidden_size, intermediate_size, num_attention_heads -> num_heads,
    num_key_value_heads -> num_kv_heads (absent or null: num_heads), num_hidden_layers ->
    num_layers, max_position_embeddings -> max_len, rope_theta, rms_norm_eps -> norm_eps,
    tie_word_embeddings -> tie_embeddings, initializer_range -> init_std. Absent optional fields
    take transformers' LlamaConfig defaults. The model computes in `param_dtype`, as transformers does.

    Raises:
      ValueError naming `source` and the field: an architecture other than LlamaForCausalLM or
        MistralForCausalLM, Mistral with a sliding window, hidden_act other than silu, attention or
        MLP biases, RoPE scaling, head_dim other than hidden_size / num_attention_heads, quantized
        weights, or a missing or bad size.
    """
    if not isinstance(hf, Mapping):
        raise ValueError(f"{source} holds {type(hf).__name__}, not a JSON object")
    archs = hf.get("architectures")
    if archs is None:
        if hf.get("model_type") not in MODEL_TYPES:
            raise ValueError(f"{source} has no architectures and model_type={hf.get('model_type')!r} is not one of "
                             f"{sorted(MODEL_TYPES)}")
        archs = [MODEL_TYPES[hf["model_type"]]]
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ValueError(f"{source}: architectures={archs!r} is not supported; expected one of {list(ARCHITECTURES)}")
    if archs[0] == "MistralForCausalLM" and hf.get("sliding_window", 4096) is not None:
        raise ValueError(f"{source}: sliding_window={hf.get('sliding_window', 4096)!r} (transformers' Mistral default "
                         "when absent is 4096): lorank's LLaMA attends to the whole causal context; only Mistral "
                         "configs with sliding_window null are supported")

    def refuse(field, default, allowed, why):
        value = hf.get(field, default)
        if value not in allowed:
            raise ValueError(f"{source}: {field}={value!r} is not supported: {why}")

    refuse("hidden_act", "silu", ("silu",), "lorank's LLaMA MLP is SwiGLU, down(silu(gate) * up)")
    refuse("attention_bias", False, (False, None), "lorank's LLaMA projections have no biases")
    refuse("mlp_bias", False, (False, None), "lorank's LLaMA projections have no biases")
    refuse("quantization_config", None, (None,), "quantized weights are not read; use a float checkpoint")
    theta = _rope_theta(hf, source)

    def size(field, default=None):
        value = hf.get(field, default)
        if value is None:
            raise ValueError(f"{source} has no {field}")
        return checks.integer(f"{source}: {field}", value, minimum=1)

    hidden, heads = size("hidden_size"), size("num_attention_heads")
    kv_heads = heads if hf.get("num_key_value_heads") is None else size("num_key_value_heads")
    if hidden % heads:
        raise ValueError(f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    if heads % kv_heads:
        raise ValueError(f"{source}: num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}")
    if hf.get("head_dim") is not None and hf["head_dim"] != hidden // heads:
        raise ValueError(f"{source}: head_dim={hf['head_dim']!r} is not hidden_size / num_attention_heads = "
                         f"{hidden // heads}, which lorank's LLaMA computes")
    tie = hf.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ValueError(f"{source}: tie_word_embeddings={tie!r} is not true or false")
    eps = checks.number(f"{source}: rms_norm_eps", hf.get("rms_norm_eps", 1e-6), low=0.0, low_open=True)
    init_std = checks.number(f"{source}: initializer_range", hf.get("initializer_range", 0.02), low=0.0)
    sizes = dict(vocab_size=size("vocab_size"), intermediate_size=size("intermediate_size"),
                 num_layers=size("num_hidden_layers"), max_len=size("max_position_embeddings", 2048))
    try:
        return llama.LlamaConfig(
            hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads, rope_theta=theta, norm_eps=float(eps),
            init_std=float(init_std), tie_embeddings=tie, dtype=param_dtype, param_dtype=param_dtype, **sizes)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def hf_config(cfg: llama.LlamaConfig, *, dtype: Any = None) -> dict:
    """config.json of `cfg` for transformers' LlamaForCausalLM; `dtype` (default cfg.param_dtype) is
    written as torch_dtype (transformers < 5) and dtype (transformers >= 5), RoPE both as rope_theta
    with rope_scaling null and as rope_parameters."""
    name = _dtype_name(_dtype(cfg.param_dtype if dtype is None else dtype, "dtype"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "num_hidden_layers": cfg.num_layers,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_len,
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "rms_norm_eps": float(cfg.norm_eps),
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": float(cfg.init_std),
        "torch_dtype": name,
        "dtype": name,
    }


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


# ----------------------------------------------------------------------------- load


def _weight_files(root: pathlib.Path) -> tuple[pathlib.Path, dict[str, pathlib.Path] | None]:
    """(the file that names the weights, index weight_map or None). model.safetensors wins over an index,
    as in transformers."""
    single, index = root / WEIGHTS_FILE, root / INDEX_FILE
    if single.is_file():
        return single, None
    if not index.is_file():
        raise FileNotFoundError(f"no weights in {root}: neither {single} nor {index} exists")
    content = _read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index} has no weight_map of tensor name -> file name")
    files = {}
    for name, file in weight_map.items():
        shard = root / file
        if not shard.is_file():
            raise FileNotFoundError(f"{shard}, the file of {name} in {index}, does not exist")
        files[name] = shard
    return index, files


def _stored_tensors(handles: Mapping[pathlib.Path, Any], index: pathlib.Path,
                    weight_map: dict[str, pathlib.Path] | None) -> dict[str, tuple[pathlib.Path, tuple, str]]:
    """name -> (file, shape, safetensors dtype) from the files' headers (no tensor is read)."""
    stored = {}
    for file, handle in handles.items():
        for name in handle.keys():
            if name in stored:
                raise ValueError(f"{name} is stored twice, in {stored[name][0]} and {file}")
            sl = handle.get_slice(name)
            stored[name] = (file, tuple(int(n) for n in sl.get_shape()), sl.get_dtype())
    for name, file in (weight_map or {}).items():
        if name not in stored or stored[name][0] != file:
            raise ValueError(f"{index} lists {name} in {file}, which does not hold it")
    return stored


def _check_tensors(layout: dict[str, Entry], stored: dict, weights: pathlib.Path, config_path: pathlib.Path,
                   cfg: llama.LlamaConfig) -> None:
    """Every expected tensor present with its config.json shape and a float dtype, and no other."""
    missing = [name for name in layout if name not in stored]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"{weights} lacks {', '.join(missing[:3])}{more}, which {config_path} implies")
    for name, (file, shape, code) in stored.items():
        if name not in layout and not IGNORED.fullmatch(name):
            hint = (f" ({config_path} has tie_word_embeddings true: the head is the embedding)"
                    if name == "lm_head.weight" and cfg.tie_embeddings else "")
            raise ValueError(f"{name} in {file} is not a tensor of the model {config_path} describes{hint}")
        if name in layout and shape != layout[name].shape:
            raise ValueError(f"{name} has shape {shape} in {file}; {config_path} implies {layout[name].shape}")
        if name in layout and code not in STORED_DTYPES:
            raise ValueError(f"{name} in {file} has dtype {code}; expected one of {sorted(STORED_DTYPES)}")


def _param_dtype(dtype: Any, stored: dict, layout: dict, hf: Mapping, config_path: pathlib.Path) -> np.dtype:
    """`dtype` if given; else the tensors' common dtype; else config.json's torch_dtype / dtype."""
    if dtype is not None:
        return _dtype(dtype, "dtype")
    codes = sorted({stored[name][2] for name in layout})
    if len(codes) == 1 and STORED_DTYPES[codes[0]] in {np.dtype(x) for x in llama.DTYPES.values()}:
        return STORED_DTYPES[codes[0]]
    declared = hf.get("torch_dtype", hf.get("dtype"))
    if declared in llama.DTYPES:
        return np.dtype(llama.DTYPES[declared])
    raise ValueError(f"the tensors of {config_path.parent} have dtypes {codes} and {config_path} declares "
                     f"torch_dtype={declared!r}: pass dtype= (one of {sorted(llama.DTYPES)})")


def _open(file: pathlib.Path) -> Any:
    """safe_open of `file` (mapped, nothing read); a damaged header is a ValueError naming the file."""
    try:
        return safe_open(str(file), framework="np")
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from e


def _read_block(handle: Any, name: str, index: tuple, transpose: bool, dtype: np.dtype) -> np.ndarray:
    """The block `index` (slices in lorank's layout) of tensor `name`, read from the file alone."""
    index = tuple(index)[::-1] if transpose else tuple(index)
    block = handle.get_slice(name)[index]
    block = block.T if transpose else block
    return np.ascontiguousarray(block.astype(dtype, copy=False))


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def load_llama(path: str | pathlib.Path, *, dtype: Any = None, mesh: Mesh | None = None) -> tuple[llama.Llama, dict]:
    """A Hugging Face LLaMA checkpoint as (model, params).

    Args:
      path: checkpoint directory with config.json and model.safetensors, or shards listed by
        model.safetensors.index.json.
      dtype: parameter (and compute) dtype: "float32", "bfloat16", "float16" or a dtype; None keeps the
        checkpoint's dtype (the tensors' common dtype, else config.json's torch_dtype / dtype).
      mesh: a (data, fsdp, tensor) mesh (`lorank.train.mesh.make_mesh`): each parameter is placed with
        the sharding of its logical axes under `llama.AXIS_RULES`, every local device's block read
        straight from the file. None: plain arrays on the default device.
    Returns:
      model: `llama.Llama(cfg)` with the checkpoint's shapes, param_dtype and dtype `dtype`.
      params: plain nested dict with the paths of `model.init`, so that
        `model.apply({"params": params}, tokens)` gives float32 logits [batch, seq, vocab].
    Raises:
      FileNotFoundError: config.json or the weights (a shard) missing; the path is named.
      ValueError: a config.json lorank's model does not compute (see `config_from_hf`), a missing,
        unexpected or misshapen tensor (named with its file), or a dimension the mesh does not divide;
        all checked before any tensor is read.
    """
    root = pathlib.Path(path)
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a Hugging Face checkpoint directory holds config.json")
    if dtype is not None:
        _dtype(dtype, "dtype")
    if mesh is not None and not isinstance(mesh, Mesh):
        raise ValueError(f"mesh={mesh!r} is not a jax.sharding.Mesh")
    hf = _read_json(config_path)
    cfg = config_from_hf(hf, source=config_path)
    weights, weight_map = _weight_files(root)
    files = [weights] if weight_map is None else sorted(set(weight_map.values()))
    layout = hf_layout(cfg)
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(_open(file)) for file in files}
        stored = _stored_tensors(handles, weights, weight_map)
        _check_tensors(layout, stored, weights, config_path, cfg)
        param_dtype = _param_dtype(dtype, stored, layout, hf, config_path)
        cfg = dataclasses.replace(cfg, dtype=_dtype_name(param_dtype), param_dtype=_dtype_name(param_dtype))
        model = llama.Llama(cfg)
        shardings = None
        if mesh is not None:
            boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
            shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, llama.AXIS_RULES)
            for name, entry in layout.items():
                shape = entry.shape[::-1] if entry.transpose else entry.shape
                try:
                    _get(shardings, entry.path).shard_shape(shape)
                except ValueError as e:
                    raise ValueError(f"{name} ({'/'.join(entry.path)} {shape}) cannot be laid out on mesh "
                                     f"{dict(mesh.shape)}: {e}") from e
        params: dict = {}
        for name, entry in layout.items():
            handle = handles[stored[name][0]]
            shape = entry.shape[::-1] if entry.transpose else entry.shape
            read = lambda index, name=name, handle=handle, entry=entry: _read_block(  # noqa: E731
                handle, name, index, entry.transpose, param_dtype)
            if shardings is None:
                value = jax.device_put(read((slice(None),) * len(shape)))
            else:
                value = jax.make_array_from_callback(shape, _get(shardings, entry.path), read)
            _set(params, entry.path, value)
    return model, params


# ----------------------------------------------------------------------------- save


def _factor_node(tree: Any, prefix: str = "") -> tuple[str, list[str]] | None:
    """(path, keys) of the first dict holding LoRA or low-rank factors, or None."""
    if not isinstance(tree, Mapping):
        return None
    factor_keys = sorted(set(tree) & set(lora.LORA_KEYS + lora.LOWRANK_KEYS))
    if factor_keys:
        return prefix, factor_keys
    for key, value in tree.items():
        found = _factor_node(value, f"{prefix}/{key}" if prefix else str(key))
        if found:
            return found
    return None


def _flat(tree: Any, prefix: tuple = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, Mapping):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, (*prefix, str(key))))
        return out
    return {prefix: tree}


def _shard_plan(names: list[str], sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensors in order, a new shard whenever the next would pass max_bytes; a tensor larger than
    max_bytes alone in its shard (huggingface_hub's split_state_dict_into_shards)."""
    shards, current, current_size = [], [], 0
    for name in names:
        if sizes[name] > max_bytes:
            shards.append([name])
            continue
        if current and current_size + sizes[name] > max_bytes:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += sizes[name]
    if current:
        shards.append(current)
    return shards


def save_llama(path: str | pathlib.Path, model: llama.Llama, params: Any, *, dtype: Any = None,
               max_shard_bytes: int = MAX_SHARD_BYTES) -> list[pathlib.Path]:
    """Writes `params` of `model` as a Hugging Face LLaMA checkpoint directory.

    Writes config.json (`hf_config`) and model.safetensors, or, when the tensors pass
    `max_shard_bytes`, shards model-00001-of-0000N.safetensors with model.safetensors.index.json,
    in Hugging Face's [out, in] layout. Weight files of that naming left in `path` by an earlier save
    are removed; nothing else (tokenizer files, generation config) is written or touched. One shard's
    tensors are gathered to host memory at a time.

    Args:
      path: directory (created if missing).
      model: the `llama.Llama` whose config the parameters follow.
      params: its full parameters, boxed or plain (or {"params": ...}). Parameters of LoRA or the
        low-rank baseline must be multiplied out first: pass `method.export(params)`
        (`lorank.train.methods`), i.e. `lorank.models.lora.merge_lora(params, scale=alpha / rank)`.
      dtype: "float32", "bfloat16", "float16" or a dtype; None: the parameters' common dtype, else
        model.cfg.param_dtype.
      max_shard_bytes: most bytes of tensors per file (transformers' default 5 GB).
    Returns:
      The files written, config.json last.
    Raises:
      ValueError: factor nodes in `params`, a missing, unexpected or misshapen parameter (named),
        a bad dtype or max_shard_bytes; checked before anything is written.
    """
    cfg = model.cfg
    checks.integer("max_shard_bytes", max_shard_bytes, minimum=1)
    params = nn.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    found = _factor_node(params)
    if found:
        raise ValueError(f"params hold factors {found[1]} at {found[0]}: save the full parameters "
                         "`method.export(params)` (for LoRA, lorank.models.lora.merge_lora(params, scale=alpha / "
                         "rank); for the low-rank baseline, lorank.models.lora.materialize(params))")
    layout = hf_layout(cfg)
    flat = _flat(params)
    expected = {entry.path: (name, entry) for name, entry in layout.items()}
    for p, leaf in flat.items():
        if p not in expected:
            raise ValueError(f"params has {'/'.join(p)}, which the model of this config does not "
                             f"(tie_embeddings={cfg.tie_embeddings}, num_layers={cfg.num_layers})")
        entry = expected[p][1]
        shape = entry.shape[::-1] if entry.transpose else entry.shape
        if tuple(np.shape(leaf)) != shape:
            raise ValueError(f"params {'/'.join(p)} has shape {tuple(np.shape(leaf))}; the model's config implies "
                             f"{shape}")
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            raise ValueError(f"params {'/'.join(p)} is spread over several processes: gather it first "
                             "(jax.experimental.multihost_utils.process_allgather)")
    missing = [p for p in expected if p not in flat]
    if missing:
        raise ValueError(f"params lacks {', '.join('/'.join(p) for p in missing[:3])}"
                         f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}")
    if dtype is None:
        dtypes = {np.dtype(leaf.dtype) for leaf in flat.values()}
        dtype = dtypes.pop() if len(dtypes) == 1 else cfg.param_dtype
    dtype = _dtype(dtype, "dtype")

    root = pathlib.Path(path)
    root.mkdir(parents=True, exist_ok=True)
    names = list(layout)
    sizes = {name: int(np.prod(entry.shape)) * dtype.itemsize for name, entry in layout.items()}
    shards = _shard_plan(names, sizes, max_shard_bytes)
    files = ([WEIGHTS_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for stale in root.iterdir():
        if stale.name not in files and (stale.name in (WEIGHTS_FILE, INDEX_FILE) or _SHARD_NAME.fullmatch(stale.name)):
            stale.unlink()

    def host(name):
        entry = layout[name]
        value = np.asarray(jax.device_get(_get(params, entry.path))).astype(dtype, copy=False)
        return np.ascontiguousarray(value.T if entry.transpose else value)

    written = []
    for file, shard in zip(files, shards):
        save_file({name: host(name) for name in shard}, str(root / file), metadata={"format": "pt"})
        written.append(root / file)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {name: file for file, shard in zip(files, shards) for name in shard}}
        (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        written.append(root / INDEX_FILE)
    (root / CONFIG_FILE).write_text(json.dumps(hf_config(cfg, dtype=dtype), indent=2) + "\n")
    written.append(root / CONFIG_FILE)
    return written
