"""Text corpora as fixed-length token sequences.

The byte-level tokenizer needs no download: every byte is a token (vocab 256).
A corpus is one or more text files (by default the embedded Tiny Shakespeare,
shipped inside the package), tokenized and split into train (first 90%) and
validation (last 10%). Training batches are a pure function of (seed, step), so
a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import pathlib
import sysconfig
from typing import Sequence

import numpy as np

from lorank import checks

EMBEDDED_CORPUS = "tinyshakespeare.txt"


def embedded_corpus_path() -> str:
    """Filesystem path of the Tiny Shakespeare copy shipped with lorank."""
    return str(importlib.resources.files("lorank.data").joinpath(EMBEDDED_CORPUS))


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, lossless on any text."""

    vocab_size = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        """str or bytes -> uint8 [len(bytes)]."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).copy()

    def decode(self, tokens: Sequence[int] | np.ndarray) -> str:
        """Token ids in [0, 256) -> str; invalid UTF-8 is replaced, never raised."""
        ids = np.asarray(tokens)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"byte token ids must lie in [0, 256), got range [{ids.min()}, {ids.max()}]")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def read_corpus(paths: Sequence[str] | str | None = None) -> bytes:
    """Concatenated bytes of the given text files (the embedded corpus if none).

    Raises:
      FileNotFoundError: a path does not exist (named in the message).
      ValueError: a file is empty (named in the message).
    """
    if paths is None or paths == "" or paths == ():
        paths = [embedded_corpus_path()]
    elif isinstance(paths, str):
        paths = [p for p in paths.split(",") if p]
    chunks = []
    for path in paths:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"corpus file not found: {path}")
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            raise ValueError(f"corpus file is empty: {path}")
        chunks.append(data)
    return b"\n".join(chunks)


# Folders of the standard library left out of `python_source_files`: installed packages and test suites.
NOT_STDLIB_SOURCE = ("site-packages", "dist-packages", "test", "tests", "idle_test")


def python_source_files(root: str | os.PathLike | None = None) -> list[str]:
    """The Python standard library's own source files: every .py file under `root` (default: this
    interpreter's stdlib folder, `sysconfig.get_paths()["stdlib"]`) outside NOT_STDLIB_SOURCE, sorted
    by relative path, so the list is the same on every machine with the same Python version."""
    root = pathlib.Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"Python source folder not found: {root}")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                   if not set(p.relative_to(root).parts[:-1]) & set(NOT_STDLIB_SOURCE))
    if not files:
        raise ValueError(f"no .py files under {root}")
    return [str(root / f) for f in files]


def split_files(files: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) files: every k-th file (k = round(1 / val_fraction)) is held out whole, so no
    held-out file is seen in training."""
    checks.number("val_fraction", val_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    every = max(2, int(round(1.0 / val_fraction)))
    held_out = [f for i, f in enumerate(files) if i % every == every - 1]
    train = [f for i, f in enumerate(files) if i % every != every - 1]
    if not held_out or not train:
        raise ValueError(f"{len(files)} files cannot be split with val_fraction={val_fraction}")
    return train, held_out


def read_files_upto(files: Sequence[str], max_bytes: int = 0) -> bytes:
    """The files' bytes joined by newlines, in order, stopping after the file that passes `max_bytes`
    (0: all of them); each file is read whole."""
    checks.integer("max_bytes", max_bytes, minimum=0)
    chunks, total = [], 0
    for path in files:
        with open(path, "rb") as f:
            chunks.append(f.read())
        total += len(chunks[-1]) + 1
        if max_bytes and total >= max_bytes:
            break
    return b"\n".join(chunks)


def train_val_split(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """First (1 - val_fraction) of the tokens for training, the rest for validation."""
    checks.number("val_fraction", val_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    cut = int(round(len(tokens) * (1.0 - val_fraction)))
    return tokens[:cut], tokens[cut:]


@dataclasses.dataclass(frozen=True)
class SequenceSampler:
    """Fixed-length windows of a token stream, shuffled per epoch from a seed.

    Each epoch cuts the stream into non-overlapping windows of `seq_len + 1`
    tokens (inputs and next-token targets) starting at an epoch-specific offset,
    and visits them in an epoch-specific random order. `batch(step)` depends only
    on (seed, step): resuming at step s reproduces the uninterrupted data order.
    """

    tokens: np.ndarray  # [N] int
    seq_len: int
    batch_size: int
    seed: int = 0

    def __post_init__(self):
        checks.integer("seq_len", self.seq_len, minimum=1)
        checks.integer("batch_size", self.batch_size, minimum=1)
        if self.windows_per_epoch < self.batch_size:
            raise ValueError(
                f"{len(self.tokens)} tokens give {self.windows_per_epoch} windows of {self.seq_len + 1} tokens, "
                f"fewer than batch_size={self.batch_size}; use a larger corpus or smaller seq_len/batch_size")

    @property
    def windows_per_epoch(self) -> int:
        # One window of slack for the random epoch offset.
        return (len(self.tokens) - self.seq_len) // (self.seq_len + 1)

    @property
    def batches_per_epoch(self) -> int:
        return self.windows_per_epoch // self.batch_size

    def _epoch_plan(self, epoch: int) -> tuple[int, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        offset = int(rng.integers(0, self.seq_len + 1))
        return offset, rng.permutation(self.windows_per_epoch)

    def batch(self, step: int, rows: np.ndarray | None = None) -> np.ndarray:
        """int32 [batch_size, seq_len + 1] for global training step `step`, or only its rows `rows`
        (int indices into the batch: [len(rows), seq_len + 1])."""
        epoch, index = divmod(step, self.batches_per_epoch)
        offset, order = self._epoch_plan(epoch)
        picks = order[index * self.batch_size:(index + 1) * self.batch_size]
        if rows is not None:
            picks = picks[rows]
        starts = offset + picks * (self.seq_len + 1)
        rows = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        return self.tokens[rows].astype(np.int32)


def eval_sequences(tokens: np.ndarray, seq_len: int, max_sequences: int | None = None) -> np.ndarray:
    """Validation windows in order: int32 [num, seq_len + 1], non-overlapping from token 0."""
    num = (len(tokens) - 1) // (seq_len + 1)
    if num < 1:
        raise ValueError(f"validation split has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    if max_sequences is not None:
        num = min(num, max_sequences)
    return tokens[: num * (seq_len + 1)].reshape(num, seq_len + 1).astype(np.int32)
