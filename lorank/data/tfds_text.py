"""Fixed-length token sequences from tfds text datasets (C4, wikitext, lm1b, ...) through grain.

Datasets are read with the TF-free `tfds.data_source(name, split=...,
data_dir=..., download=False)` API, so they must already be prepared in
`data_dir` in a random-access file format (array_record), e.g. on a machine
with network access:

    tfds build c4/en --data_dir=/data/tfds --file_format=array_record

Nothing here downloads. A document becomes sequences of `seq_len + 1` tokens
(inputs x[:-1] and next-token targets x[1:], as `lorank.data.text`) in one of
three modes:

    "pad"   each document truncated to seq_len + 1 tokens, or right-padded with
            `pad_id` (the GaLore paper's C4 setup: T5 tokenizer, max_length,
            truncation, padding); the loss ignores targets equal to pad_id
            (`loss_mask`). Random access: batch(step) is a pure function of step.
    "drop"  documents shorter than seq_len + 1 tokens are dropped, longer ones
            truncated; no padding.
    "pack"  documents concatenated (each followed by `eos_id` if given) and cut
            into consecutive windows; the tail shorter than a window is dropped.

The document-to-sequence functions are pure NumPy (`truncate_or_pad`,
`pack_documents`) and `text_sequences` works on any in-memory sequence of
records, so the whole pipeline is testable without tfds.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

MODES = ("pad", "drop", "pack")


# ----------------------------------------------------------------------------- pure document -> sequence functions


def truncate_or_pad(tokens: np.ndarray, length: int, pad_id: int) -> np.ndarray:
    """The first `length` tokens of a document, right-padded with `pad_id`: int32 [length]."""
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    tokens = np.asarray(tokens).reshape(-1)[:length]
    out = np.full(length, pad_id, np.int32)
    out[: len(tokens)] = tokens
    return out


def pack_documents(documents: Iterable[np.ndarray], length: int, eos_id: int | None = None) -> Iterator[np.ndarray]:
    """Concatenates token documents (each followed by `eos_id` unless None) into int32 [length] windows.

    Windows are consecutive and non-overlapping; a document may span windows;
    the final partial window is dropped. Lazy: reads documents as needed.
    """
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    buffer = np.zeros(0, np.int32)
    eos = np.asarray([] if eos_id is None else [eos_id], np.int32)
    for doc in documents:
        buffer = np.concatenate([buffer, np.asarray(doc, np.int32).reshape(-1), eos])
        full = len(buffer) // length
        for i in range(full):
            yield buffer[i * length:(i + 1) * length].copy()
        buffer = buffer[full * length:]


def loss_mask(sequences: np.ndarray, pad_id: int) -> np.ndarray:
    """float32 [..., T]: 1 where the target sequences[..., 1:] is not padding, else 0.

    For "pad" mode; a pad_id that is also a real token (the byte tokenizer's 0)
    masks those tokens too.
    """
    return (np.asarray(sequences)[..., 1:] != pad_id).astype(np.float32)


# ----------------------------------------------------------------------------- records -> grain datasets


def record_text(record: Any, text_key: str = "text") -> str | bytes:
    """The text of a record: a str/bytes itself, or record[text_key] for a tfds feature dict."""
    if isinstance(record, (str, bytes)):
        return record
    if isinstance(record, dict):
        if text_key not in record:
            raise KeyError(f"record has no text feature {text_key!r}; its features are {sorted(record)}")
        value = record[text_key]
        return value.item() if isinstance(value, np.ndarray) else value
    raise TypeError(f"cannot read text from a record of type {type(record).__name__}")


def resolve_pad_id(tokenizer, pad_id: int | None) -> int:
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_id", -1)
        if pad_id is None or pad_id < 0:
            raise ValueError(f"{type(tokenizer).__name__} defines no pad id; pass pad_id explicitly")
    if not 0 <= pad_id < tokenizer.vocab_size:
        raise ValueError(f"pad_id={pad_id} is outside the vocabulary [0, {tokenizer.vocab_size})")
    return int(pad_id)


def text_sequences(source: Sequence[Any], tokenizer, seq_len: int, *, mode: str = "pad", seed: int = 0,
                   pad_id: int | None = None, eos_id: int | None = None, text_key: str = "text",
                   num_epochs: int | None = None):
    """Shuffled token sequences of seq_len + 1 tokens from a random-access sequence of records.

    Args:
      source: records (str, bytes or dicts holding `text_key`): a list, or a tfds data source.
      tokenizer: anything with `vocab_size` and `encode(str) -> int array` (see lorank.data.tokenizers).
      seq_len: model sequence length T; every element has T + 1 tokens.
      mode: "pad", "drop" or "pack" (module docstring).
      seed: the document order is a deterministic permutation from `seed`, reshuffled each epoch.
      pad_id: padding id for "pad" mode; defaults to the tokenizer's `pad_id`.
      eos_id: appended to every document in "pack" mode (None: nothing appended).
      text_key: the text feature of dict records.
      num_epochs: passes over the documents; None repeats forever.
    Returns:
      "pad": a `grain.MapDataset` of int32 [T + 1] (random access: ds[i]);
      "drop": a `grain.IterDataset` of int32 [T + 1];
      "pack": an iterator of int32 [T + 1].
    """
    import grain

    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if len(source) == 0:
        raise ValueError("the text source holds no documents")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    length = seq_len + 1
    tokenize: Callable[[Any], np.ndarray] = lambda record: np.asarray(  # noqa: E731
        tokenizer.encode(record_text(record, text_key)), np.int32)
    docs = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
    if mode == "pad":
        pad = resolve_pad_id(tokenizer, pad_id)
        return docs.map(lambda record: truncate_or_pad(tokenize(record), length, pad))
    if mode == "drop":
        def keep_long(record):
            tokens = tokenize(record)
            return tokens[:length] if len(tokens) >= length else None

        return docs.map(keep_long).filter(lambda x: x is not None).to_iter_dataset()
    return pack_documents((tokenize(r) for r in docs.to_iter_dataset()), length, eos_id)


def batch_fn(dataset, batch_size: int) -> Callable[[int, np.ndarray | None], np.ndarray]:
    """(step, rows) -> int32 [len(rows), T + 1]: elements step * B + rows of a random-access dataset
    (rows None: [0, B)), read one by one, so each process reads only its own rows.

    A pure function of the step (what `lorank.train.loop.Task.train_batch` needs);
    use with "pad" mode and num_epochs=None.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    def batch(step: int, rows: np.ndarray | None = None) -> np.ndarray:
        rows = range(batch_size) if rows is None else rows
        return np.stack([dataset[step * batch_size + int(i)] for i in rows]).astype(np.int32)

    return batch


def sequential_batch_fn(make_iterator: Callable[[], Iterator[np.ndarray]], batch_size: int
                        ) -> Callable[[int, np.ndarray | None], np.ndarray]:
    """(step, rows) -> int32 [len(rows), T + 1]: rows `rows` (None: all) of elements
    [step * B, (step + 1) * B) of a deterministic iterator.

    For sources without random access ("pack", "drop"): the iterator is read
    forward, so consecutive steps cost one batch each; asking for an earlier
    step (or the first step of a resumed run) restarts it from `make_iterator()`
    and skips ahead. The same step always gives the same batch. Every process reads the
    whole batch (there is no random access) and keeps its rows.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    cursor = {"next": None, "it": None}

    def batch(step: int, rows: np.ndarray | None = None) -> np.ndarray:
        if cursor["it"] is None or cursor["next"] > step:
            cursor["it"], cursor["next"] = make_iterator(), 0
        it = cursor["it"]
        try:
            for _ in range((step - cursor["next"]) * batch_size):
                next(it)
            picked = [next(it) for _ in range(batch_size)]
        except StopIteration:
            cursor["it"] = None
            raise ValueError(f"the data ran out at step {step} (batch {batch_size})") from None
        cursor["next"] = step + 1
        return np.stack(picked if rows is None else [picked[int(i)] for i in rows]).astype(np.int32)

    return batch


def first_sequences(dataset, count: int) -> np.ndarray:
    """int32 [<= count, T + 1]: the first `count` elements of a dataset or iterator (fewer if it ends)."""
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        items = [dataset[i] for i in range(min(count, len(dataset)))]
    else:
        items = [x for _, x in zip(range(count), iter(dataset))]
    if not items:
        raise ValueError("the evaluation data holds no sequence")
    return np.stack(items).astype(np.int32)


# ----------------------------------------------------------------------------- tfds


def open_tfds_source(name: str, split: str, data_dir: str | os.PathLike):
    """The random-access tfds data source of a dataset prepared in `data_dir` (never downloads).

    Raises:
      FileNotFoundError: `name` is not prepared in `data_dir` (both named).
      ValueError: it is prepared in a format without random access (tfrecord).
    """
    import tensorflow_datasets as tfds

    data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    hint = (f"prepare it where the dataset host is reachable with `tfds build {name} --data_dir={data_dir} "
            "--file_format=array_record` (or copy a prepared copy there); lorank never downloads")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in data_dir={data_dir}: {hint}") from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in data_dir={data_dir} (no {builder.data_path}): {hint}")
    from tensorflow_datasets.core import file_adapters

    file_format = builder.info.file_format
    if file_format is not None and file_format not in file_adapters.FileFormat.with_random_access():
        raise ValueError(f"tfds dataset {name!r} in {data_dir} is stored as {file_format.value}, which has no "
                         f"random access; rebuild it with --file_format=array_record")
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


def tfds_text_sequences(name: str, split: str, data_dir: str | os.PathLike, tokenizer, seq_len: int, **kwargs):
    """`text_sequences` over the tfds dataset `name` / `split` prepared in `data_dir` (kwargs as there)."""
    return text_sequences(open_tfds_source(name, split, data_dir), tokenizer, seq_len, **kwargs)
