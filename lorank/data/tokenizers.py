"""Tokenizers with one interface: `vocab_size`, `encode(str) -> int array`, `decode(ids) -> str`.

`make_tokenizer("byte")` is `lorank.data.text.ByteTokenizer` (vocab 256, no
file); `make_tokenizer("path/to/spiece.model")` loads a SentencePiece model,
e.g. the T5 tokenizer (vocab 32,000) the GaLore paper pretrains with. Nothing
is downloaded: a SentencePiece model is a local file.
"""

from __future__ import annotations

import os
from typing import Sequence

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


def make_tokenizer(name_or_path: str, **kwargs) -> ByteTokenizer | SentencePieceTokenizer:
    """"byte" -> ByteTokenizer; a path to a SentencePiece `.model` file -> SentencePieceTokenizer(path, **kwargs).

    Raises:
      FileNotFoundError: a path (anything with a path separator or a `.model`
        suffix) that does not exist, named in the message.
      ValueError: any other name.
    """
    if name_or_path == "byte":
        if kwargs:
            raise ValueError(f"the byte tokenizer takes no options, got {sorted(kwargs)}")
        return ByteTokenizer()
    looks_like_path = os.sep in name_or_path or name_or_path.endswith(".model") or os.path.exists(name_or_path)
    if not looks_like_path:
        raise ValueError(f"unknown tokenizer {name_or_path!r}: use 'byte' or a path to a SentencePiece .model file")
    return SentencePieceTokenizer(name_or_path, **kwargs)
