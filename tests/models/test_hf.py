"""Hugging Face LLaMA checkpoints: round trips, logits against a NumPy float64 Hugging Face forward and
against transformers, sharded loading on a mesh, and errors that name the file."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

from lorank.models import hf, llama, lora
from lorank.train import mesh as mesh_lib

BASE = {  # a tiny LLaMA config.json: 4 query heads sharing 2 key/value heads
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
    "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
    "max_position_embeddings": 32, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rope_scaling": None, "torch_dtype": "float32",
    "bos_token_id": 1, "eos_token_id": 2,
}


def _config(**changes):
    return {**BASE, **changes}


def _tensor_shapes(c):
    """Hugging Face LlamaForCausalLM's state dict, written out from its published module tree."""
    v, d, f, n = c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd = d // c["num_attention_heads"]
    kv = (c.get("num_key_value_heads") or c["num_attention_heads"]) * hd
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(n):
        pre = f"model.layers.{i}"
        shapes.update({f"{pre}.self_attn.q_proj.weight": (d, d), f"{pre}.self_attn.k_proj.weight": (kv, d),
                       f"{pre}.self_attn.v_proj.weight": (kv, d), f"{pre}.self_attn.o_proj.weight": (d, d),
                       f"{pre}.mlp.gate_proj.weight": (f, d), f"{pre}.mlp.up_proj.weight": (f, d),
                       f"{pre}.mlp.down_proj.weight": (d, f), f"{pre}.input_layernorm.weight": (d,),
                       f"{pre}.post_attention_layernorm.weight": (d,)})
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _random_tensors(c, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in _tensor_shapes(c).items():
        if len(shape) == 1:  # norm weights near 1
            x = 1.0 + 0.2 * rng.normal(size=shape)
        elif "embed" in name or "lm_head" in name:
            x = rng.normal(size=shape)
        else:
            x = rng.normal(size=shape) / np.sqrt(shape[1])
        out[name] = x.astype(dtype)
    return out


def _write(directory, c, tensors, shards=1):
    """config.json plus model.safetensors, or `shards` files and model.safetensors.index.json."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(c))
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    names = list(tensors)
    weight_map = {}
    for s, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[i]: tensors[names[i]] for i in part}, str(directory / file), metadata={"format": "pt"})
        weight_map.update({names[i]: file for i in part})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return directory


def _read_all(directory):
    """Every tensor of a checkpoint directory, single file or sharded."""
    files = sorted(directory.glob("*.safetensors"))
    out = {}
    for file in files:
        with safe_open(str(file), framework="np") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def _hf_forward(c, tensors, tokens):
    """NumPy float64 LlamaForCausalLM forward from its published definition, on the stored [out, in] weights."""
    w = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    heads, d = c["num_attention_heads"], c["hidden_size"]
    kv_heads = c.get("num_key_value_heads") or heads
    hd, eps, n_rep = d // heads, c["rms_norm_eps"], heads // kv_heads

    def rms_norm(x, weight):
        return weight * (x * (1.0 / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps)))

    def rotate_half(x):
        return np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], axis=-1)

    b, t = tokens.shape
    inv_freq = 1.0 / (c["rope_theta"] ** (np.arange(0, hd, 2) / hd))
    freqs = np.arange(t)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb)[None, None], np.sin(emb)[None, None]  # [1, 1, T, hd]

    def repeat_kv(x):  # [B, kv, T, hd] -> [B, kv * n_rep, T, hd], as transformers' repeat_kv
        return np.broadcast_to(x[:, :, None], (b, kv_heads, n_rep, t, hd)).reshape(b, kv_heads * n_rep, t, hd)

    x = w["model.embed_tokens.weight"][tokens]
    causal = np.triu(np.full((t, t), -np.inf), k=1)
    for i in range(c["num_hidden_layers"]):
        pre = f"model.layers.{i}"
        h = rms_norm(x, w[f"{pre}.input_layernorm.weight"])
        q = (h @ w[f"{pre}.self_attn.q_proj.weight"].T).reshape(b, t, heads, hd).transpose(0, 2, 1, 3)
        k = (h @ w[f"{pre}.self_attn.k_proj.weight"].T).reshape(b, t, kv_heads, hd).transpose(0, 2, 1, 3)
        v = (h @ w[f"{pre}.self_attn.v_proj.weight"].T).reshape(b, t, kv_heads, hd).transpose(0, 2, 1, 3)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = repeat_kv(k), repeat_kv(v)
        scores = q @ k.transpose(0, 1, 3, 2) * hd ** -0.5 + causal
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        x = x + attn @ w[f"{pre}.self_attn.o_proj.weight"].T
        h = rms_norm(x, w[f"{pre}.post_attention_layernorm.weight"])
        gate, up = h @ w[f"{pre}.mlp.gate_proj.weight"].T, h @ w[f"{pre}.mlp.up_proj.weight"].T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[f"{pre}.mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T


def _tokens(c, shape=(2, 12), seed=1):
    return np.random.default_rng(seed).integers(0, c["vocab_size"], shape)


def _logits(model, params, tokens):
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens)))


# ----------------------------------------------------------------------------- round trips and logits


@pytest.mark.parametrize("tied, dtype, shards", [(False, np.float32, 1), (True, ml_dtypes.bfloat16, 3),
                                                 (True, np.float32, 1), (False, ml_dtypes.bfloat16, 4)])
def test_load_save_load_round_trips_exactly(tmp_path, tied, dtype, shards):
    c = _config(tie_word_embeddings=tied, torch_dtype="bfloat16" if dtype == ml_dtypes.bfloat16 else "float32")
    tensors = _random_tensors(c, dtype)
    model, params = hf.load_llama(_write(tmp_path / "src", c, tensors, shards))
    assert model.cfg.param_dtype == np.dtype(dtype) and model.cfg.tie_embeddings == tied
    assert model.cfg.kv_heads == 2 and ("lm_head" in params) == (not tied)
    size = sum(x.nbytes for x in tensors.values())
    written = hf.save_llama(tmp_path / "out", model, params, max_shard_bytes=size // shards + 1 if shards > 1
                            else hf.MAX_SHARD_BYTES)
    assert written[-1].name == "config.json"
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    if shards == 1:
        assert names == ["config.json", "model.safetensors"]
    else:
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        n = len({*index["weight_map"].values()})
        assert n > 1 and names == sorted(["config.json", "model.safetensors.index.json",
                                          *(f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1))])
        assert set(index["weight_map"]) == set(tensors) and index["metadata"]["total_size"] == size
    saved = _read_all(tmp_path / "out")
    assert set(saved) == set(tensors)
    for name, x in tensors.items():
        assert saved[name].dtype == x.dtype and saved[name].shape == x.shape, name
        np.testing.assert_array_equal(saved[name], x, err_msg=name)
    written_config = json.loads((tmp_path / "out" / "config.json").read_text())
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                  "num_hidden_layers", "max_position_embeddings", "rope_theta", "rms_norm_eps",
                  "tie_word_embeddings", "torch_dtype", "architectures", "model_type", "hidden_act"):
        assert written_config[field] == c[field], field
    model2, params2 = hf.load_llama(tmp_path / "out")
    assert model2.cfg == model.cfg
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("kv_heads, tied", [(2, False), (1, True), (4, False)])
def test_logits_match_a_numpy_float64_hugging_face_forward(tmp_path, kv_heads, tied):
    c = _config(num_key_value_heads=kv_heads, tie_word_embeddings=tied, rope_theta=500.0)
    tensors = _random_tensors(c)
    model, params = hf.load_llama(_write(tmp_path, c, tensors))
    tokens = _tokens(c, (2, 20))
    expected = _hf_forward(c, tensors, tokens)
    got = _logits(model, params, tokens)
    assert got.shape == (2, 20, 64) and got.dtype == np.float32
    assert np.abs(expected).max() > 1.0  # logits of order one: the tolerance is a float32 one
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_bfloat16_checkpoint_loads_as_float32_on_request_and_computes_the_stored_values(tmp_path):
    c = _config(torch_dtype="bfloat16")
    tensors = _random_tensors(c, ml_dtypes.bfloat16)
    model, params = hf.load_llama(_write(tmp_path, c, tensors), dtype="float32")
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    assert model.cfg.dtype == jnp.float32
    tokens = _tokens(c)
    expected = _hf_forward(c, tensors, tokens)  # the stored bfloat16 values, exactly representable in float32
    np.testing.assert_allclose(_logits(model, params, tokens), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    model16, params16 = hf.load_llama(tmp_path)
    assert {x.dtype for x in jax.tree.leaves(params16)} == {np.dtype(jnp.bfloat16)}
    assert model16.cfg.dtype == jnp.bfloat16  # computes in the checkpoint's dtype, as transformers does


def test_save_of_a_lorank_model_loads_back_with_its_config(tmp_path):
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=1,
                            num_layers=1, max_len=16, rope_theta=1234.0, norm_eps=1e-5, tie_embeddings=True)
    model = llama.Llama(cfg)
    boxed = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))  # {"params": boxed tree}
    hf.save_llama(tmp_path, model, boxed, dtype="bfloat16")
    loaded_model, loaded = hf.load_llama(tmp_path)
    assert loaded_model.cfg == llama.LlamaConfig(**{**cfg.__dict__, "dtype": "bfloat16", "param_dtype": "bfloat16"})
    expected = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), nn.unbox(boxed["params"]))
    jax.tree.map(np.testing.assert_array_equal, loaded, expected)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["head_dim"] == 8 and config["num_key_value_heads"] == 1


def test_a_smaller_save_removes_the_stale_shards_of_a_larger_one(tmp_path):
    c = _config()
    model, params = hf.load_llama(_write(tmp_path / "src", c, _random_tensors(c)))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tokenizer.json").write_text("{}")
    hf.save_llama(tmp_path / "out", model, params, max_shard_bytes=10_000)
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 2
    hf.save_llama(tmp_path / "out", model, params)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors",
                                                                    "tokenizer.json"]
    jax.tree.map(np.testing.assert_array_equal, hf.load_llama(tmp_path / "out")[1], params)


def test_mistral_without_a_sliding_window_loads_and_with_one_is_refused(tmp_path):
    c = _config(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
    tensors = _random_tensors(c)
    model, params = hf.load_llama(_write(tmp_path, c, tensors))
    tokens = _tokens(c)
    expected = _hf_forward(c, tensors, tokens)
    np.testing.assert_allclose(_logits(model, params, tokens), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    for window in ({"sliding_window": 4096}, {}):  # absent: transformers' Mistral default, 4096
        c2 = {k: v for k, v in c.items() if k != "sliding_window"} | window
        (tmp_path / "config.json").write_text(json.dumps(c2))
        with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'}: sliding_window=4096"):
            hf.load_llama(tmp_path)


def test_transformers_5_rope_parameters_are_read(tmp_path):
    c = {k: v for k, v in _config().items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    c.update(rope_parameters={"rope_type": "default", "rope_theta": 500.0}, dtype="float32")
    tensors = _random_tensors(c)
    model, params = hf.load_llama(_write(tmp_path, c, tensors))
    assert model.cfg.rope_theta == 500.0
    tokens = _tokens(c)
    expected = _hf_forward({**c, "rope_theta": 500.0}, tensors, tokens)
    np.testing.assert_allclose(_logits(model, params, tokens), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# ----------------------------------------------------------------------------- on a mesh


@pytest.mark.parametrize("axes", [{"data": 1, "fsdp": 8, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_loading_on_a_mesh_shards_every_parameter_by_its_logical_axes(tmp_path, monkeypatch, axes):
    c = _config(tie_word_embeddings=False)
    tensors = _random_tensors(c)
    directory = _write(tmp_path, c, tensors, shards=2)
    mesh = mesh_lib.make_mesh(axes)
    _, plain = hf.load_llama(directory)
    reads = []
    real_read = hf._read_block

    def recording_read(handle, name, index, transpose, dtype):
        block = real_read(handle, name, index, transpose, dtype)
        reads.append((name, block.shape))
        return block

    monkeypatch.setattr(hf, "_read_block", recording_read)
    model, params = hf.load_llama(directory, mesh=mesh)
    expected_specs = {  # AXIS_RULES: vocab, joined_kv, mlp -> tensor; embed -> fsdp; norms replicated
        ("embed", "embedding"): P("tensor", "fsdp"),
        ("layers_0", "attn", "q_proj", "kernel"): P("fsdp", "tensor"),
        ("layers_1", "attn", "k_proj", "kernel"): P("fsdp", "tensor"),
        ("layers_0", "attn", "o_proj", "kernel"): P("tensor", "fsdp"),
        ("layers_0", "mlp", "up_proj", "kernel"): P("fsdp", "tensor"),
        ("layers_1", "mlp", "down_proj", "kernel"): P("tensor", "fsdp"),
        ("layers_0", "attn_norm", "scale"): P(None),
        ("final_norm", "scale"): P(None),
        ("lm_head", "kernel"): P("fsdp", "tensor"),
    }
    for path, spec in expected_specs.items():
        leaf = params
        for key in path:
            leaf = leaf[key]
        assert leaf.sharding.mesh == mesh and leaf.sharding.spec == spec, path
    for name, x in tensors.items():  # every device's block is its slice of the stored tensor
        entry = hf.hf_layout(model.cfg)[name]
        leaf = params
        for key in entry.path:
            leaf = leaf[key]
        full = x.T if entry.transpose else x
        for shard in leaf.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index], err_msg=name)
            if name == "model.layers.0.self_attn.k_proj.weight":
                assert shard.data.shape == (32 // (axes["fsdp"]), 16 // axes["tensor"])
    # Each sharded tensor was read in device-sized blocks, never whole.
    k_reads = {shape for name, shape in reads if name == "model.layers.0.self_attn.k_proj.weight"}
    assert k_reads == {(32 // axes["fsdp"], 16 // axes["tensor"])}
    tokens = _tokens(c, (8, 12))
    np.testing.assert_allclose(_logits(model, params, tokens), _logits(model, plain, tokens), rtol=1e-5, atol=1e-5)


def test_a_mesh_that_does_not_divide_a_dimension_is_refused_before_reading(tmp_path, monkeypatch):
    c = _config(vocab_size=60)  # the vocab axis goes to `tensor`: 60 rows do not split 8 ways
    directory = _write(tmp_path, c, _random_tensors(c))
    monkeypatch.setattr(hf, "_read_block", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(ValueError, match="model.embed_tokens.weight .* cannot be laid out on mesh"):
        hf.load_llama(directory, mesh=mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 8}))


# ----------------------------------------------------------------------------- errors, before any tensor is read


def _damaged(tmp_path, monkeypatch, *, config=None, tensors=None, shards=1):
    c = config or _config()
    directory = _write(tmp_path, c, tensors if tensors is not None else _random_tensors(c), shards)
    monkeypatch.setattr(hf, "_read_block", lambda *a: pytest.fail("a tensor was read"))
    return directory


def test_a_misshapen_tensor_is_named_with_its_file_and_the_shape_config_json_implies(tmp_path, monkeypatch):
    tensors = _random_tensors(_config())
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)
    directory = _damaged(tmp_path, monkeypatch, tensors=tensors)
    message = (f"model.layers.0.self_attn.k_proj.weight has shape (32, 32) in {directory / 'model.safetensors'}; "
               f"{directory / 'config.json'} implies (16, 32)")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hf.load_llama(directory)


def test_an_unexpected_tensor_is_named_with_its_shard(tmp_path, monkeypatch):
    tensors = _random_tensors(_config()) | {"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}
    directory = _damaged(tmp_path, monkeypatch, tensors=tensors, shards=2)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.bias in .*model-0000\d-of-00002"):
        hf.load_llama(directory)


def test_a_stored_head_of_a_tied_config_is_unexpected_with_a_hint(tmp_path, monkeypatch):
    tensors = _random_tensors(_config())  # untied tensors, tied config
    directory = _damaged(tmp_path, monkeypatch, config=_config(tie_word_embeddings=True), tensors=tensors)
    with pytest.raises(ValueError, match="lm_head.weight in .*tie_word_embeddings true"):
        hf.load_llama(directory)


def test_rotary_inverse_frequency_buffers_are_skipped(tmp_path):
    c = _config()
    tensors = _random_tensors(c) | {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}
    model, params = hf.load_llama(_write(tmp_path, c, tensors))
    assert "rotary_emb" not in str(jax.tree_util.tree_structure(params))


@pytest.mark.parametrize("shards, file", [(1, "model.safetensors"), (2, "model.safetensors.index.json")])
def test_a_missing_tensor_is_named_with_the_file_that_lacks_it(tmp_path, monkeypatch, shards, file):
    tensors = _random_tensors(_config())
    del tensors["model.norm.weight"]
    directory = _damaged(tmp_path, monkeypatch, tensors=tensors, shards=shards)
    with pytest.raises(ValueError, match=rf"{directory / file} lacks model.norm.weight"):
        hf.load_llama(directory)


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures=\\['GPT2LMHeadModel'\\] is not supported"),
    ({"architectures": None, "model_type": "gpt2"}, "no architectures and model_type='gpt2'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling=.*llama3.* is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters=.*yarn"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"mlp_bias": True}, "mlp_bias=True is not supported"),
    ({"head_dim": 16}, "head_dim=16 is not hidden_size / num_attention_heads = 8"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide"),
    ({"hidden_size": 30}, "hidden_size=30 is not divisible"),
    ({"vocab_size": None}, "has no vocab_size"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings='yes'"),
])
def test_a_config_lorank_does_not_compute_is_refused_naming_config_json(tmp_path, monkeypatch, changes, message):
    directory = _damaged(tmp_path, monkeypatch, tensors=_random_tensors(_config()))
    (directory / "config.json").write_text(json.dumps(_config(**changes)))
    with pytest.raises(ValueError, match=f"{directory / 'config.json'}.*{message}"):
        hf.load_llama(directory)


def test_missing_or_damaged_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
        hf.load_llama(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_config()))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "model.safetensors")):
        hf.load_llama(tmp_path)
    _write(tmp_path, _config(), _random_tensors(_config()), shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "model-00002-of-00002.safetensors")):
        hf.load_llama(tmp_path)
    _write(tmp_path, _config(), _random_tensors(_config()), shards=2)
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ValueError, match=f"{tmp_path / 'model-00001-of-00002.safetensors'} is not a readable"):
        hf.load_llama(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'} is not valid JSON"):
        hf.load_llama(tmp_path)


def test_a_bad_dtype_is_refused(tmp_path):
    directory = _write(tmp_path, _config(), _random_tensors(_config()))
    with pytest.raises(ValueError, match="dtype='float8'"):
        hf.load_llama(directory, dtype="float8")


def test_save_refuses_lora_factors_and_points_to_the_export(tmp_path):
    c = _config()
    model, params = hf.load_llama(_write(tmp_path / "src", c, _random_tensors(c)))
    factored = lora.lora_init(params, jax.random.key(0), rank=2, pattern=llama.GALORE_PATTERN)
    with pytest.raises(ValueError, match=r"factors \['lora_a', 'lora_b', 'lora_base'\] at layers_0/attn/k_proj/kernel"
                                         r".*method.export\(params\)"):
        hf.save_llama(tmp_path / "out", model, factored)
    assert not (tmp_path / "out").exists()
    merged = lora.merge_lora(factored, scale=2.0)  # what method.export gives: a plain tree, saved as such
    hf.save_llama(tmp_path / "out", model, merged)
    jax.tree.map(np.testing.assert_array_equal, hf.load_llama(tmp_path / "out")[1], merged)


@pytest.mark.parametrize("change, kwargs, message", [
    (lambda p: p["layers_0"]["attn"].pop("v_proj"), {}, "lacks layers_0/attn/v_proj/kernel"),
    (lambda p: p.update(extra={"kernel": jnp.zeros(3)}), {}, "has extra/kernel"),
    (lambda p: p["layers_1"]["mlp"]["up_proj"].update(kernel=jnp.zeros((48, 32))), {},
     r"layers_1/mlp/up_proj/kernel has shape \(48, 32\)"),
    (lambda p: None, {"dtype": "int8"}, "dtype='int8'"),
    (lambda p: None, {"max_shard_bytes": 0}, "max_shard_bytes"),
])
def test_save_refuses_parameters_that_do_not_fit_the_model(tmp_path, change, kwargs, message):
    c = _config()
    model, params = hf.load_llama(_write(tmp_path / "src", c, _random_tensors(c)))
    params = jax.tree.map(lambda x: x, params)
    change(params)
    with pytest.raises(ValueError, match=message):
        hf.save_llama(tmp_path / "out", model, params, **kwargs)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- against transformers


@pytest.mark.parametrize("tied, via_save", [(False, False), (True, False), (False, True)])
def test_logits_match_transformers_llama_for_causal_lm(tmp_path, tied, via_save):
    try:
        import torch
        import transformers
    except ImportError:
        pytest.skip("needs the bench extra: torch and transformers")
    c = _config(tie_word_embeddings=tied)
    tensors = _random_tensors(c)
    directory = _write(tmp_path / "src", c, tensors)
    model, params = hf.load_llama(directory)
    if via_save:  # transformers reads what save_llama writes
        hf.save_llama(tmp_path / "out", model, params)
        directory = tmp_path / "out"
    reference = transformers.LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    reference.eval()
    assert reference.config.num_key_value_heads == 2 and reference.config.tie_word_embeddings == tied
    tokens = _tokens(c, (2, 20))
    with torch.no_grad():
        expected = reference(torch.as_tensor(tokens)).logits.double().numpy()
    got = _logits(model, params, tokens)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
