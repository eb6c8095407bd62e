"""Tokenizers with one interface: `vocab_size`, `encode(str) -> int array`, `decode(ids) -> str`.

`make_tokenizer("byte")` is `lorank.data.text.ByteTokenizer` (vocab 256, no
file); `make_tokenizer("path/to/spiece.model")` loads a SentencePiece model,
e.g. the T5 tokenizer (vocab 32,000) the GaLore paper pretrains with;
`make_tokenizer("path/to/checkpoint")` (a directory holding `tokenizer.json`)
or `make_tokenizer("path/to/tokenizer.json")` loads a Hugging Face tokenizer
through the `tokenizers` library (`HFTokenizer`), with the special tokens and
chat template of the checkpoint's `tokenizer_config.json`. Nothing is
downloaded: every tokenizer is a local file.

SentencePiece and Hugging Face tokenizers also give `bos_id`, `eos_id` and
`pad_id` (-1 where the tokenizer has none) and add BOS/EOS only when asked
(`add_bos`, `add_eos`).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Sequence

import numpy as np

from lorank.data.text import ByteTokenizer


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("SentencePiece tokenizers need the `sentencepiece` package: pip install sentencepiece") from e
    return sentencepiece


class SentencePieceTokenizer:
    """A SentencePiece model file as a tokenizer.

    Args:
      path: the `.model` file (e.g. T5's spiece.model).
      add_bos: prepend the model's BOS id to every encoding (T5 has none).
      add_eos: append the model's EOS id (the T5 tokenizer does, as in the GaLore setup).

    Raises:
      FileNotFoundError: `path` does not exist (named in the message).
      ValueError: `path` is not a SentencePiece model (named), or add_bos/add_eos
        is asked of a model without that token.
    """

    def __init__(self, path: str | os.PathLike, *, add_bos: bool = False, add_eos: bool = False):
        path = os.path.expanduser(os.fspath(path))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePiece model file not found: {path}")
        spm = _sentencepiece()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a valid SentencePiece model: {e}") from e
        self.path = path
        if add_bos and self.bos_id < 0:
            raise ValueError(f"add_bos=True but {path} defines no BOS token")
        if add_eos and self.eos_id < 0:
            raise ValueError(f"add_eos=True but {path} defines no EOS token")
        self.add_bos, self.add_eos = add_bos, add_eos

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    @property
    def pad_id(self) -> int:
        """The padding id, -1 where the model defines none (T5: 0)."""
        return int(self._sp.pad_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    def encode(self, text: str | bytes) -> np.ndarray:
        """str (or UTF-8 bytes) -> int32 [num_tokens], with BOS/EOS if configured."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = self._sp.EncodeAsIds(text)
        if self.add_bos:
            ids = [self.bos_id] + ids
        if self.add_eos:
            ids = ids + [self.eos_id]
        return np.asarray(ids, dtype=np.int32)

    def decode(self, tokens: Sequence[int] | np.ndarray) -> str:
        """Token ids in [0, vocab_size) -> str (control tokens such as BOS/EOS/PAD decode to nothing)."""
        ids = np.asarray(tokens).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got range [{ids.min()}, {ids.max()}]")
        return self._sp.DecodeIds([int(i) for i in ids])


HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
HF_CHAT_TEMPLATE_FILE = "chat_template.jinja"
HF_SPECIAL_TOKENS = ("bos", "eos", "pad", "unk")


def _hf_tokenizers():
    try:
        import tokenizers as hf_tokenizers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Hugging Face tokenizers need the `tokenizers` package: pip install tokenizers") from e
    return hf_tokenizers


def _read_json_object(path: str) -> dict:
    """The JSON object in `path`, {} when the file does not exist; ValueError naming the file otherwise."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any, source: str, key: str) -> str | None:
    """A special token as written in a Hugging Face config: a string, {"content": str, ...} or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{source}: {key} must be a string or an object with a string 'content', got {value!r}")


def _default_chat_template(value: Any, source: str) -> str | None:
    """tokenizer_config.json's "chat_template": a string, or a list of {"name", "template"} (take "default")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for item in value:
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                    and isinstance(item.get("template"), str)):
                raise ValueError(f"{source}: every entry of chat_template must be an object with string 'name' and "
                                 f"'template', got {item!r}")
            named[item["name"]] = item["template"]
        if "default" not in named:
            raise ValueError(f"{source}: chat_template names the templates {sorted(named)}, none of them 'default'")
        return named["default"]
    raise ValueError(f"{source}: chat_template must be a string or a list of named templates, "
                     f"got {type(value).__name__}")


@functools.cache
def _chat_environment():
    """The Jinja environment Hugging Face renders chat templates in (transformers' `_compile_jinja_template`).

    A sandbox whose templates cannot modify their inputs, trim_blocks and lstrip_blocks, loop controls
    (`{% break %}`), `tojson` without HTML escaping, and `{% generation %}...{% endgeneration %}` (Hugging
    Face's marker of assistant text) rendered as its body. `raise_exception` is bound per template.
    No `strftime_now`: templates that print today's date fall back to their fixed default, so renders are
    deterministic.
    """
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    return env


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (a fast tokenizer) through the `tokenizers` library.

    Special tokens come from the checkpoint's `tokenizer_config.json` ("bos_token",
    "eos_token", "pad_token", "unk_token": a string or {"content": str, ...}),
    falling back to `special_tokens_map.json`; an id is -1 where neither file
    names the token. The chat template is tokenizer_config.json's "chat_template"
    (a string, or the one named "default" of a list of {"name", "template"}),
    else the file `chat_template.jinja`, else None.

    BOS/EOS are explicit: `encode` runs the tokenizer with
    `add_special_tokens=False`, so a post-processor in tokenizer.json that would
    prepend BOS (Llama's does) is not applied; BOS/EOS are added here exactly when
    `add_bos` / `add_eos` say so. Text that spells an added token ("</s>",
    "<|im_start|>") still encodes to that token, as in Hugging Face, which is how
    rendered chat templates get their special tokens.

    Args:
      path: a `tokenizer.json` file, or a checkpoint directory holding one. The
        tokenizer_config.json, special_tokens_map.json and chat_template.jinja read
        are those in the same directory.
      add_bos: prepend `bos_id` to every encoding.
      add_eos: append `eos_id` to every encoding.
      chat_template: a Jinja chat template to use instead of the checkpoint's.

    Attributes:
      path: the tokenizer.json read.
      chat_template: the template, None without one.
      chat_template_source: where it came from (the config file, chat_template.jinja or "the
        chat_template argument"), None without one.

    Raises:
      FileNotFoundError: `path` does not exist, or a directory holds no tokenizer.json (named).
      ValueError: the file is not a valid tokenizer.json, a config file is not valid JSON or
        names a special token that is not in the vocabulary (file named), or add_bos/add_eos is
        asked of a tokenizer without that token.
    """

    def __init__(self, path: str | os.PathLike, *, add_bos: bool = False, add_eos: bool = False,
                 chat_template: str | None = None):
        path = os.path.expanduser(os.fspath(path))
        if os.path.isdir(path):
            directory, file = path, os.path.join(path, HF_TOKENIZER_FILE)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"Hugging Face tokenizer file not found: {file} (the directory {path} "
                                        f"holds no {HF_TOKENIZER_FILE})")
        elif os.path.isfile(path):
            directory, file = os.path.dirname(path) or ".", path
        else:
            raise FileNotFoundError(f"Hugging Face tokenizer file not found: {path}")
        hf_tokenizers = _hf_tokenizers()
        try:
            self._tok = hf_tokenizers.Tokenizer.from_file(file)
        except Exception as e:  # the tokenizers library raises a bare Exception on a bad file
            raise ValueError(f"{file} is not a valid Hugging Face {HF_TOKENIZER_FILE}: {e}") from e
        self.path = file
        config_path = os.path.join(directory, HF_CONFIG_FILE)
        map_path = os.path.join(directory, HF_SPECIAL_TOKENS_FILE)
        config, special_map = _read_json_object(config_path), _read_json_object(map_path)
        self._special: dict[str, tuple[str | None, int]] = {}
        for name in HF_SPECIAL_TOKENS:
            key, source = f"{name}_token", config_path
            content = _token_content(config.get(key), config_path, key)
            if content is None:
                content, source = _token_content(special_map.get(key), map_path, key), map_path
            token_id = -1
            if content is not None:
                found = self._tok.token_to_id(content)
                if found is None:
                    raise ValueError(f"{source}: {key} {content!r} is not in the vocabulary of {file}")
                token_id = int(found)
            self._special[name] = (content, token_id)
        if chat_template is not None:
            if not isinstance(chat_template, str):
                raise ValueError(f"chat_template must be a string, got {type(chat_template).__name__}")
            self.chat_template_source = "the chat_template argument"
        else:
            chat_template = _default_chat_template(config.get("chat_template"), config_path)
            self.chat_template_source = config_path
            template_file = os.path.join(directory, HF_CHAT_TEMPLATE_FILE)
            if chat_template is None and os.path.isfile(template_file):
                with open(template_file, encoding="utf-8") as f:
                    chat_template, self.chat_template_source = f.read(), template_file
        self.chat_template: str | None = chat_template
        if chat_template is None:
            self.chat_template_source = None
        self._compiled = None
        if add_bos and self.bos_id < 0:
            raise ValueError(f"add_bos=True but {path} defines no BOS token (bos_token in {HF_CONFIG_FILE})")
        if add_eos and self.eos_id < 0:
            raise ValueError(f"add_eos=True but {path} defines no EOS token (eos_token in {HF_CONFIG_FILE})")
        self.add_bos, self.add_eos = add_bos, add_eos

    @property
    def vocab_size(self) -> int:
        """Tokens of the model and added tokens (special tokens included)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def bos_id(self) -> int:
        return self._special["bos"][1]

    @property
    def eos_id(self) -> int:
        return self._special["eos"][1]

    @property
    def pad_id(self) -> int:
        """The padding id, -1 where the checkpoint names no pad token (Llama's)."""
        return self._special["pad"][1]

    @property
    def bos_token(self) -> str | None:
        return self._special["bos"][0]

    @property
    def eos_token(self) -> str | None:
        return self._special["eos"][0]

    @property
    def pad_token(self) -> str | None:
        return self._special["pad"][0]

    def token_to_id(self, token: str) -> int:
        """The id of one token string, -1 where it is not in the vocabulary."""
        found = self._tok.token_to_id(token)
        return -1 if found is None else int(found)

    def encode(self, text: str | bytes) -> np.ndarray:
        """str (or UTF-8 bytes) -> int32 [num_tokens], without the post-processor; BOS/EOS if configured."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos:
            ids = [self.bos_id] + ids
        if self.add_eos:
            ids = ids + [self.eos_id]
        return np.asarray(ids, dtype=np.int32)

    def decode(self, tokens: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str:
        """Token ids in [0, vocab_size) -> str; special tokens decode to nothing unless skip_special_tokens=False."""
        ids = np.asarray(tokens).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got range [{ids.min()}, {ids.max()}]")
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
        """The chat template rendered on `messages` ([{"role": str, "content": str}, ...]) as Hugging Face does.

        The template sees `messages`, `add_generation_prompt` (open an assistant turn after the
        last message) and the special tokens `bos_token`, `eos_token`, `pad_token`, `unk_token`
        (those the checkpoint defines), in the environment of `_chat_environment`; its
        `raise_exception(message)` raises ValueError.

        Raises:
          ValueError: the tokenizer has no chat template, the template does not parse (its file
            named), messages is not a list of objects, or the template raised.
        """
        if self.chat_template is None:
            raise ValueError(f"{self.path} has no chat template (no chat_template in {HF_CONFIG_FILE} and no "
                             f"{HF_CHAT_TEMPLATE_FILE}); pass chat_template=... to HFTokenizer")
        if isinstance(messages, (str, bytes, dict)) or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"messages must be a list of {{'role', 'content'}} objects, got {messages!r}")
        if self._compiled is None:
            import jinja2

            source = self.chat_template_source

            def raise_exception(message):
                raise ValueError(f"the chat template of {source} raised: {message}")

            try:
                self._compiled = _chat_environment().from_string(
                    self.chat_template, globals={"raise_exception": raise_exception})
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"the chat template of {source} does not parse: {e}") from e
        variables = {f"{name}_token": content for name, (content, _) in self._special.items() if content is not None}
        return self._compiled.render(messages=list(messages), add_generation_prompt=bool(add_generation_prompt),
                                     **variables)


def make_tokenizer(name_or_path: str | os.PathLike, **kwargs
                   ) -> ByteTokenizer | SentencePieceTokenizer | HFTokenizer:
    """A tokenizer by name or path; kwargs go to the tokenizer's constructor.

    "byte" -> ByteTokenizer; a directory (a Hugging Face checkpoint holding
    tokenizer.json) or a file named *.json -> HFTokenizer(path, **kwargs); any
    other path -> SentencePieceTokenizer(path, **kwargs) (a `.model` file).

    Raises:
      FileNotFoundError: a path (anything with a path separator or a `.model` or
        `.json` suffix) that does not exist, or a directory without tokenizer.json,
        named in the message.
      ValueError: any other name.
    """
    name_or_path = os.fspath(name_or_path)
    if name_or_path == "byte":
        if kwargs:
            raise ValueError(f"the byte tokenizer takes no options, got {sorted(kwargs)}")
        return ByteTokenizer()
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path) or path.endswith(".json"):
        return HFTokenizer(path, **kwargs)
    looks_like_path = os.sep in name_or_path or name_or_path.endswith(".model") or os.path.exists(path)
    if not looks_like_path:
        raise ValueError(f"unknown tokenizer {name_or_path!r}: use 'byte', a path to a SentencePiece .model file, "
                         "a Hugging Face tokenizer.json or a checkpoint directory holding one")
    return SentencePieceTokenizer(path, **kwargs)
