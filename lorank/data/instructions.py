"""Instruction data for supervised fine-tuning: JSON-lines records, rendered text, token masks, batches.

Records. One training example per line of a `.jsonl` file, in one of two forms
(other keys, such as an "id", are ignored):

    {"prompt": "...", "response": "..."}
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

A conversation holds at least one assistant turn. A prompt/response record is
the conversation [user: prompt, assistant: response].

Rendering. `segments(record, tokenizer)` turns a record into its text in order
as (piece, trained) pairs; trained is True only for what the model should learn
to write: each assistant turn and the end-of-turn marker after it (so the model
learns to stop). A tokenizer with a chat template (`HFTokenizer.chat_template`)
renders with it, by prefix differences: the template applied to messages[:k]
with add_generation_prompt=True must be a prefix of the template applied to
messages[:k + 1] when message k is the assistant's; the text in between is the
assistant's part. Other tokenizers use the plain format of this module's
constants:

    "### Instruction:\n{prompt}\n\n### Response:\n"           untrained (PLAIN_PROMPT)
    "{response}", then the EOS token if the tokenizer has one   trained

and for conversations, per message, "### System:\n{content}\n\n" and
"### User:\n{content}\n\n" untrained, "### Assistant:\n" untrained, then its
content and EOS trained, then "\n\n" untrained before a next message
(PLAIN_HEADERS, PLAIN_TURN_END). Messages after the last assistant turn carry
nothing to learn and are left out.

Tokens. `encode_record` tokenizes each piece on its own and concatenates, so the
trained/untrained boundary falls exactly between tokens: the prompt's tokens
are what generation conditions on, the response's what it produces (a
tokenizer that adds a word-start marker to the start of every encoding, such
as SentencePiece or Metaspace, adds one to each piece, as generating after an
encoded prompt does).

Sequences. `instruction_sequences` gives, as `lorank.data.tfds_text` does for
plain text, sequences of T + 1 tokens (inputs tokens[:, :-1], next-token
targets tokens[:, 1:]) in mode "pad" (one record per row, truncated or
right-padded with pad_id) or "pack" (records concatenated and cut into
consecutive windows; the tail shorter than a window is dropped; a window may
hold parts of several records, which attend to each other as in packed
pretraining), with

    loss_mask[m, t] = 1.0  when tokens[m, t + 1] is a trained token, else 0.0   (float32 [M, T])

so the loss at position t, which predicts tokens[m, t + 1], is multiplied by
loss_mask[m, t]. Padding and BOS are never trained. `batch_fn` draws batches
as a pure function of the step.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import numpy as np

from lorank import checks
from lorank.data import arrays
from lorank.data.tfds_text import truncate_or_pad

ROLES = ("system", "user", "assistant")
MODES = ("pad", "pack")

# The plain format, for tokenizers without a chat template (the byte tokenizer, SentencePiece models).
PLAIN_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"
PLAIN_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
PLAIN_TURN_END = "\n\n"

# A piece of a rendered record: text to tokenize, or one token id (the plain format's EOS), and whether it is trained.
Segment = tuple[str | int, bool]


# ----------------------------------------------------------------------------- records


def check_record(record: Any, where: str = "record") -> dict:
    """`record` itself when it is a valid prompt/response or messages record (module docstring).

    Raises:
      ValueError: naming `where` (e.g. "data.jsonl:3") and what is wrong: not an object, neither
        or both forms, a missing or non-string field, an unknown role, no assistant turn.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    has_messages, has_pair = "messages" in record, "prompt" in record or "response" in record
    if has_messages and has_pair:
        raise ValueError(f"{where}: a record holds either 'messages' or 'prompt'/'response', not both")
    if has_pair:
        for key in ("prompt", "response"):
            if key not in record:
                raise ValueError(f"{where}: a prompt/response record needs a {key!r} field")
            if not isinstance(record[key], str):
                raise ValueError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
        return record
    if not has_messages:
        raise ValueError(f"{where}: a record needs 'prompt' and 'response' or 'messages', got the keys "
                         f"{sorted(record)}")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: messages[{i}] must be an object, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"{where}: messages[{i}] has no {key!r}")
            if not isinstance(message[key], str):
                raise ValueError(f"{where}: messages[{i}][{key!r}] must be a string, "
                                 f"got {type(message[key]).__name__}")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: messages[{i}] has the unknown role {message['role']!r}; roles are {ROLES}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn, so nothing to train on")
    return record


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file, one object per line; blank lines are skipped.

    Raises:
      FileNotFoundError: `path` does not exist (named).
      ValueError: "path:line: ..." (1-based line) for invalid JSON or an invalid record
        (`check_record`); a file without records (named).
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"instruction data file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e}") from e
            records.append(check_record(record, where))
    if not records:
        raise ValueError(f"instruction data file holds no records: {path}")
    return records


def load_records(records_or_path: str | os.PathLike | Sequence[dict]) -> list[dict]:
    """A path -> `read_jsonl(path)`; a sequence of records -> them as a list, each checked ("record i: ...")."""
    if isinstance(records_or_path, (str, os.PathLike)):
        return read_jsonl(records_or_path)
    if isinstance(records_or_path, dict):
        raise ValueError("expected a path or a sequence of records, got one record (a dict); wrap it in a list")
    records = [check_record(r, f"record {i}") for i, r in enumerate(records_or_path)]
    if not records:
        raise ValueError("there are no instruction records")
    return records


def conversation(record: dict) -> list[dict]:
    """The record as messages: a prompt/response record is [user: prompt, assistant: response]."""
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]


def train_val_split(records: Sequence[dict], val_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Records split at random into (train, val), round(len * val_fraction) of them for validation.

    Whole records go to one side; each side keeps the records' order.

    Raises:
      ValueError: val_fraction outside (0, 1), or a side that would be empty.
    """
    checks.number("val_fraction", val_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    checks.integer("seed", seed, minimum=0)
    records = list(records)
    n_val = int(round(len(records) * val_fraction))
    if n_val == 0 or n_val == len(records):
        raise ValueError(f"val_fraction={val_fraction} of {len(records)} records gives {len(records) - n_val} for "
                         f"training and {n_val} for validation; each side needs at least one record")
    is_val = np.zeros(len(records), bool)
    is_val[np.random.default_rng(seed).permutation(len(records))[:n_val]] = True
    return ([r for r, v in zip(records, is_val) if not v], [r for r, v in zip(records, is_val) if v])


# ----------------------------------------------------------------------------- rendering


def _check_tokenizer(tokenizer) -> None:
    for option in ("add_bos", "add_eos"):
        if getattr(tokenizer, option, False):
            raise ValueError(f"the tokenizer was built with {option}=True, which would add BOS/EOS to every "
                             f"rendered piece; build it without: instruction records place BOS/EOS themselves")


def _difference(a: str, b: str) -> str:
    """Where `a` stops being a prefix of `b`, shown with a little context."""
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return f"at character {i}: {a[max(0, i - 20):i + 40]!r} vs {b[max(0, i - 20):i + 40]!r}"


def _render(tokenizer, messages: list[dict], k: int, name: str, *, add_generation_prompt: bool) -> str:
    """The chat template applied to messages[:k]; a Jinja error (an undefined value, say) as a ValueError."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages[:k], add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template of {name} failed on messages[:{k}] "
                         f"(add_generation_prompt={add_generation_prompt}): {type(e).__name__}: {e}") from e


def _template_segments(messages: list[dict], tokenizer) -> list[Segment]:
    name = getattr(tokenizer, "chat_template_source", None) or getattr(tokenizer, "path", type(tokenizer).__name__)
    pieces, done = [], ""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for k in range(last + 1):
        if messages[k]["role"] != "assistant":
            continue
        before = _render(tokenizer, messages, k, name, add_generation_prompt=True)
        after = _render(tokenizer, messages, k + 1, name, add_generation_prompt=False)
        for shorter, longer, what in ((done, before, f"messages[:{k}] with add_generation_prompt=True"),
                                      (before, after, f"messages[:{k + 1}]")):
            if not longer.startswith(shorter):
                raise ValueError(
                    f"the chat template of {name} is not prefix-consistent: the text before assistant turn {k} "
                    f"is not a prefix of the template applied to {what}, {_difference(shorter, longer)}; "
                    "segments need a template that renders a conversation's start the same whatever follows")
        pieces += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    return pieces


def _plain_segments(record: dict, tokenizer) -> list[Segment]:
    eos = getattr(tokenizer, "eos_id", -1)
    end = [(int(eos), True)] if eos is not None and eos >= 0 else []
    if "messages" not in record:
        return [(PLAIN_PROMPT.format(prompt=record["prompt"]), False), (record["response"], True)] + end
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    pieces: list[Segment] = []
    for i, message in enumerate(messages[:last + 1]):
        if i > 0:
            pieces.append((PLAIN_TURN_END, False))
        if message["role"] == "assistant":
            pieces += [(PLAIN_HEADERS["assistant"], False), (message["content"], True)] + end
        else:
            pieces.append((PLAIN_HEADERS[message["role"]] + message["content"], False))
    return pieces


def segments(record: dict, tokenizer) -> list[Segment]:
    """The record's text in order as (piece, trained) pairs (module docstring).

    A piece is text, or an int token id (the EOS of the plain format, which has no text every
    tokenizer reads back as that token). With a chat template (`tokenizer.chat_template` not
    None) pieces alternate: text before an assistant turn (untrained), the assistant's part
    (trained: content, end-of-turn marker, whatever the template writes up to the next message).
    Without one, the plain format (PLAIN_PROMPT, PLAIN_HEADERS, PLAIN_TURN_END). Empty pieces are
    left out. Pieces joined in order are the whole rendered text.

    Raises:
      ValueError: an invalid record, a tokenizer built with add_bos/add_eos, a chat template
        that is not prefix-consistent, raised or failed (the tokenizer's file named in the last two).
    """
    check_record(record)
    _check_tokenizer(tokenizer)
    if getattr(tokenizer, "chat_template", None) is not None:
        pieces = _template_segments(conversation(record), tokenizer)
    else:
        pieces = _plain_segments(record, tokenizer)
    return [(piece, trained) for piece, trained in pieces if piece != ""]


def encode_record(record: dict, tokenizer, *, add_bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A record as tokens and which of them are trained: (int32 [n], bool [n]).

    Each segment is tokenized on its own and the results concatenated. With `add_bos` and a
    tokenizer with a BOS id (`bos_id` >= 0), BOS comes first, untrained, unless the rendered
    text already begins with it (chat templates that write {{ bos_token }}; add_bos=False does not
    take out a BOS the template writes).
    """
    tokens, trained = [], []
    for piece, is_trained in segments(record, tokenizer):
        ids = (np.asarray([piece], np.int32) if isinstance(piece, int)
               else np.asarray(tokenizer.encode(piece)).astype(np.int32).reshape(-1))
        tokens.append(ids)
        trained.append(np.full(len(ids), is_trained, bool))
    tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
    trained = np.concatenate(trained) if trained else np.zeros(0, bool)
    bos = getattr(tokenizer, "bos_id", -1)
    if add_bos and bos is not None and bos >= 0 and not (len(tokens) and tokens[0] == bos):
        tokens = np.concatenate([np.asarray([bos], np.int32), tokens])
        trained = np.concatenate([np.zeros(1, bool), trained])
    return tokens, trained


# ----------------------------------------------------------------------------- sequences and batches


def _pad_id(tokenizer, pad_id: int | None) -> int:
    """pad_id, else the tokenizer's pad id, else its EOS id (padding is never trained, so any token will do)."""
    if pad_id is None:
        for name in ("pad_id", "eos_id"):
            value = getattr(tokenizer, name, -1)
            if value is not None and value >= 0:
                pad_id = int(value)
                break
        else:
            raise ValueError(f"{type(tokenizer).__name__} has neither a pad id nor an EOS id; pass pad_id "
                             "(any token: padding is never trained)")
    if not isinstance(pad_id, (int, np.integer)) or not 0 <= pad_id < tokenizer.vocab_size:
        raise ValueError(f"pad_id={pad_id!r} is outside the vocabulary [0, {tokenizer.vocab_size})")
    return int(pad_id)


def instruction_sequences(records_or_path: str | os.PathLike | Sequence[dict], tokenizer, seq_len: int, *,
                          mode: str = "pad", pad_id: int | None = None, add_bos: bool = True,
                          return_stats: bool = False):
    """Records as training sequences: dict(tokens=int32 [M, T + 1], loss_mask=float32 [M, T]).

    loss_mask[m, t] = 1 exactly when tokens[m, t + 1], the target of position t, is a trained
    token (`encode_record`): what the per-position next-token loss is multiplied by.

    Args:
      records_or_path: a JSON-lines file (`read_jsonl`) or a sequence of records.
      tokenizer: `vocab_size`, `encode`, and optionally `bos_id`, `eos_id`, `pad_id`, `chat_template`.
      seq_len: T, the model's sequence length.
      mode: "pad": row m is record m truncated or right-padded to T + 1 tokens (M = number of
        records; padding never trained); "pack": the records' tokens concatenated in order and cut
        into consecutive windows of T + 1, the last partial window dropped.
      pad_id: the padding token in "pad" mode; default the tokenizer's pad id, else its EOS id.
      add_bos: start every record with BOS where the tokenizer has one.
      return_stats: also return a dict of counts: records, sequences, truncated (records longer
        than T + 1 tokens, cut in "pad" mode), rows_without_targets (rows whose loss_mask is all 0,
        e.g. a prompt that fills the row), trained_targets (the sum of loss_mask), dropped_tokens
        (the tail "pack" mode leaves out).
    Returns:
      the dict, or (dict, stats) with return_stats.
    Raises:
      ValueError: an unknown mode, seq_len < 1, invalid records (file:line named), no pad id, or
        "pack" data shorter than one window.
    """
    checks.one_of("mode", mode, MODES)
    seq_len = checks.integer("seq_len", seq_len, minimum=1)
    length = seq_len + 1
    records = load_records(records_or_path)
    pad = _pad_id(tokenizer, pad_id) if mode == "pad" else None
    encoded = [encode_record(r, tokenizer, add_bos=add_bos) for r in records]
    truncated = sum(len(tokens) > length for tokens, _ in encoded)
    if mode == "pad":
        tokens = np.stack([truncate_or_pad(t, length, pad) for t, _ in encoded])
        trained = np.stack([truncate_or_pad(m.astype(np.int32), length, 0) for _, m in encoded]).astype(bool)
        dropped = sum(max(0, len(t) - length) for t, _ in encoded)
    else:
        stream = np.concatenate([t for t, _ in encoded])
        flags = np.concatenate([m for _, m in encoded])
        windows = len(stream) // length
        if windows == 0:
            raise ValueError(f"the {len(records)} records give {len(stream)} tokens, fewer than one window of "
                             f"seq_len + 1 = {length}")
        tokens = stream[: windows * length].reshape(windows, length).astype(np.int32)
        trained = flags[: windows * length].reshape(windows, length)
        dropped = len(stream) - windows * length
    sequences = {"tokens": tokens, "loss_mask": trained[:, 1:].astype(np.float32)}
    if not return_stats:
        return sequences
    stats = {"records": len(records), "sequences": len(tokens), "truncated": int(truncated) if mode == "pad" else 0,
             "rows_without_targets": int((sequences["loss_mask"].sum(axis=1) == 0).sum()),
             "trained_targets": int(sequences["loss_mask"].sum()), "dropped_tokens": int(dropped)}
    return sequences, stats


def batch_fn(sequences: dict, batch_size: int, *, seed: int = 0) -> Callable[[int, np.ndarray | None], dict]:
    """(step, rows=None) -> dict(tokens=int32 [R, T + 1], loss_mask=float32 [R, T]), a pure function of the step.

    Epoch e = step // batches_per_epoch visits the M sequences in the order of a permutation drawn
    from (seed, e); step's global batch is the next `batch_size` of them (batches_per_epoch =
    M // batch_size; the M % batch_size left over differ from epoch to epoch). `rows` (int indices
    into the global batch, as `lorank.data.tfds_text.batch_fn` and `lorank.train.loop.Task.train_batch`
    take them) selects the rows a host feeds; None gives all, R = batch_size.

    Raises:
      ValueError: sequences without tokens [M, T + 1] and loss_mask [M, T], fewer than batch_size
        sequences, a negative step, rows outside [0, batch_size).
    """
    if not isinstance(sequences, dict) or "tokens" not in sequences or "loss_mask" not in sequences:
        raise ValueError("sequences must be a dict with 'tokens' and 'loss_mask' (instruction_sequences)")
    tokens, mask = np.asarray(sequences["tokens"]), np.asarray(sequences["loss_mask"])
    if tokens.ndim != 2 or mask.shape != (tokens.shape[0], tokens.shape[1] - 1):
        raise ValueError(f"tokens must be [M, T + 1] and loss_mask [M, T], got {tokens.shape} and {mask.shape}")
    return arrays.epoch_batches({"tokens": tokens.astype(np.int32), "loss_mask": mask.astype(np.float32)},
                                batch_size, seed=seed)
