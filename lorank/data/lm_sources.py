"""Where a language model's tokens come from, chosen by a `data` config section.

    data.source = "text"   data.corpus files (default: the embedded Tiny Shakespeare), split
                           into train / validation by data.val_fraction; random windows
    data.source = "python" the Python standard library's own source files (`text.python_source_files`),
                           every k-th file held out whole (k = 1 / data.val_fraction), at most
                           data.max_bytes of each side (0: all)
    data.source = "jsonl"  instruction records (`lorank.data.instructions`) in data.train_file, held out
                           in data.val_file (empty: data.val_fraction of the records), padded or
                           packed per data.mode; batches are dicts whose "loss_mask" trains only
                           the response tokens
    data.source = "tfds"   the dataset data.tfds_name prepared in data.tfds_data_dir, documents
                           padded or packed per data.mode (`lorank.data.tfds_text`)

`load_tokenizer` and `load_lm_data` check what they are given (an empty tokenizer,
a tokenizer larger than the model's vocabulary, an unknown source, a missing file or
an unprepared dataset, each named) before anything is trained.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from lorank.data import instructions, text, tfds_text, tokenizers

SOURCES = ("text", "python", "jsonl", "tfds")


def load_tokenizer(data_config, vocab_size: int):
    """The tokenizer of `data.tokenizer` ("byte" or a SentencePiece model path), checked against the model.

    Raises:
      ValueError: an empty `data.tokenizer`, or more tokens than `vocab_size`.
      FileNotFoundError: a SentencePiece model file that does not exist (named).
    """
    if not data_config.tokenizer:
        raise ValueError("data.tokenizer is empty: pass --config.data.tokenizer=byte or the path of a "
                         "SentencePiece .model file (the GaLore paper used the T5 tokenizer's spiece.model)")
    tokenizer = tokenizers.make_tokenizer(data_config.tokenizer)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"model.vocab_size={vocab_size} is smaller than the {tokenizer.vocab_size} tokens of "
                         f"data.tokenizer={data_config.tokenizer!r}")
    return tokenizer


@dataclasses.dataclass(frozen=True)
class LMData:
    """Training batches and validation sequences of a language model.

    Attributes:
      train_batch: (step, rows) -> int32 [len(rows), seq_len + 1] (instruction data: a dict of
        "tokens" and "loss_mask" [len(rows), seq_len]), a pure function of the step.
      val: int32 [M, seq_len + 1] validation sequences (instruction data: a dict as above).
      pad_id: targets the loss leaves out (padded documents), or None.
      description: one line for the run's log.
    """

    train_batch: Callable[[int, np.ndarray | None], np.ndarray | dict]
    val: np.ndarray | dict
    pad_id: int | None
    description: str


def load_lm_data(data_config, tokenizer, *, batch_size: int, num_val: int) -> LMData:
    """The data of `data_config` (the `data` section): `batch_size` sequences per step and at
    most `num_val` validation sequences (tfds; the text source keeps every validation window).

    Raises:
      ValueError: an unknown `data.source`, or data too short for one batch.
      FileNotFoundError: a missing corpus file or an unprepared tfds dataset (named).
    """
    d = data_config
    if d.source not in SOURCES:
        raise ValueError(f"unknown data.source={d.source!r}; expected one of {SOURCES}")
    if d.source == "text":
        tokens = tokenizer.encode(text.read_corpus(d.corpus))
        train_tokens, val_tokens = text.train_val_split(tokens, d.val_fraction)
        sampler = text.SequenceSampler(train_tokens, d.seq_len, batch_size, seed=d.seed)
        return LMData(sampler.batch, text.eval_sequences(val_tokens, d.seq_len), None,
                      f"{len(train_tokens):,} train / {len(val_tokens):,} validation tokens")

    if d.source == "python":
        train_files, val_files = text.split_files(text.python_source_files(), d.val_fraction)
        max_bytes = int(d.get("max_bytes", 0))
        train_tokens = tokenizer.encode(text.read_files_upto(train_files, max_bytes))
        val_tokens = tokenizer.encode(text.read_files_upto(val_files, max_bytes))
        sampler = text.SequenceSampler(train_tokens, d.seq_len, batch_size, seed=d.seed)
        return LMData(sampler.batch, text.eval_sequences(val_tokens, d.seq_len), None,
                      f"Python standard library source: {len(train_tokens):,} train / {len(val_tokens):,} held-out "
                      f"tokens ({len(val_files)} held-out files)")

    if d.source == "jsonl":
        return instruction_data(d, tokenizer, batch_size=batch_size, num_val=num_val)

    def sequences(split, seed):
        return tfds_text.tfds_text_sequences(d.tfds_name, split, d.tfds_data_dir, tokenizer, d.seq_len,
                                             mode=d.mode, seed=seed)

    if d.mode == "pad":
        train_batch = tfds_text.batch_fn(sequences(d.tfds_train_split, d.seed), batch_size)
        pad_id = tfds_text.resolve_pad_id(tokenizer, None)
    else:
        train_batch = tfds_text.sequential_batch_fn(lambda: iter(sequences(d.tfds_train_split, d.seed)), batch_size)
        pad_id = None
    val = tfds_text.first_sequences(sequences(d.tfds_eval_split, 0), num_val)
    return LMData(train_batch, val, pad_id, f"tfds {d.tfds_name} ({d.mode} mode) in {d.tfds_data_dir}")


def instruction_data(data_config, tokenizer, *, batch_size: int, num_val: int) -> LMData:
    """`load_lm_data` for data.source = "jsonl": records of data.train_file (and data.val_file). Padding
    uses the tokenizer's pad id, else its EOS id, else 0 (padding is never trained)."""
    d = data_config
    if not d.train_file:
        raise ValueError("data.source='jsonl' needs data.train_file: a JSON-lines file of {\"prompt\", \"response\"} "
                         "or {\"messages\": [...]} records")
    records = instructions.read_jsonl(d.train_file)
    if d.get("val_file", ""):
        train, val = records, instructions.read_jsonl(d.val_file)
    else:
        train, val = instructions.train_val_split(records, d.val_fraction, seed=d.seed)
    pad_id = next((i for i in (getattr(tokenizer, "pad_id", -1), getattr(tokenizer, "eos_id", -1)) if i >= 0), 0)
    train_seqs, stats = instructions.instruction_sequences(train, tokenizer, d.seq_len, mode=d.mode, pad_id=pad_id,
                                                           return_stats=True)
    val_seqs = instructions.instruction_sequences(val, tokenizer, d.seq_len, mode=d.mode, pad_id=pad_id)
    val_seqs = {k: v[:num_val] for k, v in val_seqs.items()}
    return LMData(instructions.batch_fn(train_seqs, batch_size, seed=d.seed), val_seqs, None,
                  f"{d.train_file}: {len(train):,} train / {len(val):,} held-out records ({d.mode} mode, "
                  f"{stats['truncated']} truncated, {stats['trained_targets']:,} trained targets)")
