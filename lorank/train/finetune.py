"""Fine-tuning a pretrained LLaMA-style model with any method of the pretraining experiment.

`run(config, workdir)` is the body of `python -m experiments.finetune`. The start is
`config.init`:

    init.source = "lorank"   the newest checkpoint of a lorank run in init.path (e.g. the main
                             job's workdir; LoRA runs are merged); with init.pretrain set
                             (a config "FILE:VARIANT") and no run there yet, that pretraining
                             runs in init.path first
    init.source = "hf"       a Hugging Face LLaMA checkpoint directory (`lorank.models.hf`),
                             read straight into the mesh's sharding

The model section of the saved config is the start's model, so a resumed run checks it.
Every method of `lorank.train.methods` applies but "lowrank", which replaces the pretrained
kernels by random factors. The held-out loss and perplexity are evaluated on the data's
held-out split and, with `eval.retain_corpus`, on the validation split of another corpus
(eval_loss/retain: how much of the pretraining the model keeps). The run ends with a
sample and, with `export.hf_path`, the model (LoRA merged) written as a Hugging Face
checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
from ml_collections import ConfigDict

from lorank import checks, config_files
from lorank.data import lm_sources, text
from lorank.models import hf, llama
from lorank.train import checkpoints, lm, loop as loop_lib, mesh as mesh_lib, pretrain

INIT_SOURCES = ("lorank", "hf")
REFUSED_METHODS = {"lowrank": "it replaces every pretrained attention and MLP kernel by random factors"}
START_DIR = "pretrained"  # where init.pretrain trains when init.path is empty, inside the workdir


def model_fields(cfg: llama.LlamaConfig) -> dict[str, Any]:
    """The `config.model` section that builds `cfg` (dtypes as their names, num_kv_heads None as 0)."""
    names = {v: k for k, v in llama.DTYPES.items()}
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    fields["num_kv_heads"] = fields["num_kv_heads"] or 0
    return {k: names.get(v, v) if k in ("dtype", "param_dtype") else v for k, v in fields.items()}


def start_path(config: ConfigDict, workdir: str) -> str:
    """init.path, or workdir/pretrained when it is empty and init.pretrain says what to train there."""
    path = config.init.path or (os.path.join(workdir, START_DIR) if config.init.pretrain else "")
    if not path:
        raise ValueError("init.path is empty: pass the workdir of a lorank run (init.source=lorank) or a Hugging "
                         "Face checkpoint directory (init.source=hf), or set init.pretrain to a config to train first")
    return os.path.expanduser(path)


def check_config(config: ConfigDict) -> None:
    """What can be checked before anything is read: the start's source and the method.

    Raises:
      ValueError: an unknown init.source, or a method that cannot fine-tune (named with why).
    """
    checks.one_of("init.source", config.init.source, INIT_SOURCES)
    if config.optim.name in REFUSED_METHODS:
        raise ValueError(f"optim.name={config.optim.name!r} cannot fine-tune: {REFUSED_METHODS[config.optim.name]}")
    if config.init.pretrain and config.init.source != "lorank":
        raise ValueError(f"init.pretrain={config.init.pretrain!r} needs init.source='lorank'")


def _has_run(path: str) -> bool:
    return os.path.isdir(os.path.join(path, loop_lib.CHECKPOINT_DIR)) and bool(
        checkpoints.open_manager(os.path.abspath(os.path.join(path, loop_lib.CHECKPOINT_DIR))).all_steps())


def load_start(config: ConfigDict, workdir: str, mesh, *, log=print) -> tuple[llama.Llama, Any, str]:
    """(model, unboxed parameters, tokenizer name) of the run's start (`config.init`).

    The tokenizer is `data.tokenizer` when given, otherwise the start's: a lorank run's own, or the
    tokenizer.json of a Hugging Face checkpoint directory.

    Raises:
      FileNotFoundError: no run, checkpoint or tokenizer file where the config points (named).
    """
    path = start_path(config, workdir)
    if config.init.source == "hf":
        model, params = hf.load_llama(path, dtype=config.init.dtype or None, mesh=mesh)
        tokenizer = config.data.tokenizer or path
        if not config.data.tokenizer and not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise FileNotFoundError(f"no tokenizer file {os.path.join(path, 'tokenizer.json')}: pass "
                                    "--config.data.tokenizer (byte, a SentencePiece .model or a tokenizer.json)")
        return model, params, tokenizer
    if config.init.pretrain and not _has_run(path):
        log(f"pretraining {config.init.pretrain} in {path} first")
        pretrain.run(config_files.load(config.init.pretrain), path, log=log)
    if not os.path.isfile(os.path.join(path, loop_lib.CONFIG_FILE)):
        raise FileNotFoundError(f"{path} holds no lorank run ({loop_lib.CONFIG_FILE} not found)")
    start_config, model, params = pretrain.load_run(path, warn=lambda m: log(f"warning: {m}"))
    # on the host: the run's init lays them out on its own mesh
    return model, jax.device_get(params), config.data.tokenizer or start_config.data.tokenizer


def boxed_init(model: llama.Llama, params: Any, seq_len: int):
    """key -> `params` boxed with the model's logical axes (the loop lays them out by these)."""
    abstract = jax.eval_shape(lm.init_params_fn(model, seq_len), jax.random.key(0))
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
    return lambda key: jax.tree.map(lambda box, value: box.replace_boxed(value) if is_box(box) else value,
                                    abstract, params, is_leaf=is_box)


def retain_rows(config: ConfigDict, tokenizer) -> dict:
    """{"retain": validation windows of eval.retain_corpus} ("embedded": the embedded corpus), or {}."""
    corpus = config.eval.retain_corpus
    if not corpus:
        return {}
    tokens = tokenizer.encode(text.read_corpus(None if corpus == "embedded" else corpus))
    _, val = text.train_val_split(tokens, config.data.val_fraction)
    return {"retain": text.eval_sequences(val, config.data.seq_len)}


def run(config: ConfigDict, workdir: str, *, stop_at: int | None = None, log=print) -> dict:
    """Fine-tunes per `config` in `workdir`; returns the summary of `pretrain.train_language_model` and
    "start" (where from) and "export" (the Hugging Face directory written, if any)."""
    mesh_lib.maybe_initialize_distributed()
    check_config(config)
    loop_config = loop_lib.LoopConfig.from_config(config.train)
    mesh = mesh_lib.make_mesh(config.mesh.to_dict())
    loop_lib.check_batch_divides_mesh(loop_config, mesh)
    say = log if loop_lib.is_primary() else (lambda _: None)
    model, params, tokenizer_name = load_start(config, workdir, mesh, log=say)
    config = ConfigDict(config.to_dict())
    config.model = ConfigDict(model_fields(model.cfg))
    config.data.tokenizer = tokenizer_name
    model = lm.build_llama(config)  # checks data.seq_len against the start's max_len
    pretrain.check_run_config(config, model, loop_config, mesh)

    tokenizer = lm_sources.load_tokenizer(config.data, config.model.vocab_size)
    data = lm_sources.load_lm_data(config.data, tokenizer, batch_size=loop_config.batch_size,
                                   num_val=config.train.eval_batches * loop_config.micro_batch)
    summary, state, method = pretrain.train_language_model(
        config, workdir, model, tokenizer, data, mesh, init_params=boxed_init(model, params, config.data.seq_len),
        other_val=retain_rows(config, tokenizer), perplexity=True, stop_at=stop_at, log=log)
    summary["start"] = f"{config.init.source}:{start_path(config, workdir)}"
    if config.export.hf_path and summary["steps"] == loop_config.steps:
        exported = pretrain.host_params(jax.jit(method.export)(state.params))
        if loop_lib.is_primary():
            hf.save_llama(config.export.hf_path, model, exported, dtype=config.export.dtype or None)
            say(f"wrote the Hugging Face checkpoint {config.export.hf_path}")
        summary["export"] = config.export.hf_path
    return summary
