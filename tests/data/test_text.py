"""Byte tokenizer, corpus reading, split and the deterministic sequence sampler."""

import hashlib

import numpy as np
import pytest

from lorank.data import text

TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_embedded_corpus_is_the_shipped_tiny_shakespeare():
    data = text.read_corpus()
    assert len(data) == 1_115_394
    assert hashlib.sha256(data).hexdigest() == TINY_SHAKESPEARE_SHA256


def test_byte_tokenizer_round_trips_unicode():
    tok = text.ByteTokenizer()
    s = "First Citizen:\nBefore we proceed — any further, héar me speak. ∑"
    ids = tok.encode(s)
    assert ids.dtype == np.uint8 and len(ids) == len(s.encode("utf-8"))
    assert tok.decode(ids) == s
    with pytest.raises(ValueError, match="256"):
        tok.decode([3, 300])


def test_split_holds_out_the_last_ten_percent():
    tokens = np.arange(1000)
    train, val = text.train_val_split(tokens)
    assert len(train) == 900 and len(val) == 100
    assert train[-1] == 899 and val[0] == 900
    with pytest.raises(ValueError, match="1.5"):
        text.train_val_split(tokens, 1.5)


def test_missing_and_empty_corpus_files_are_named(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        text.read_corpus(str(missing))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        text.read_corpus([str(empty)])


def test_user_files_are_concatenated(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("hello")
    b.write_text("world")
    assert text.read_corpus(f"{a},{b}") == b"hello\nworld"


def test_sampler_batches_are_windows_of_the_stream_with_shifted_targets():
    tokens = np.arange(10_000) % 251
    sampler = text.SequenceSampler(tokens, seq_len=16, batch_size=4, seed=3)
    batch = sampler.batch(0)
    assert batch.shape == (4, 17) and batch.dtype == np.int32
    # every row is a contiguous slice of the stream (consecutive values mod 251)
    assert np.all((np.diff(batch, axis=1) % 251) == 1)


def test_sampler_is_a_pure_function_of_seed_and_step_and_covers_each_epoch_once():
    tokens = np.arange(2_000)
    s1 = text.SequenceSampler(tokens, seq_len=9, batch_size=5, seed=7)
    s2 = text.SequenceSampler(tokens, seq_len=9, batch_size=5, seed=7)
    np.testing.assert_array_equal(s1.batch(13), s2.batch(13))
    assert not np.array_equal(s1.batch(0), text.SequenceSampler(tokens, 9, 5, seed=8).batch(0))
    starts = np.concatenate([s1.batch(i)[:, 0] for i in range(s1.batches_per_epoch)])
    assert len(np.unique(starts)) == len(starts)  # no window repeats within an epoch
    np.testing.assert_array_equal(np.unique(starts % 10), [starts[0] % 10])  # one offset per epoch


def test_sampler_rejects_a_corpus_smaller_than_a_batch():
    with pytest.raises(ValueError, match="batch_size=8"):
        text.SequenceSampler(np.arange(50), seq_len=9, batch_size=8)


def test_eval_sequences_are_consecutive_windows():
    seqs = text.eval_sequences(np.arange(100), seq_len=9, max_sequences=3)
    np.testing.assert_array_equal(seqs, np.arange(30).reshape(3, 10))
