"""Documents -> fixed-length sequences (pad, drop, pack), the grain pipeline on in-memory text, tfds errors."""

import numpy as np
import pytest

from lorank.data import tfds_text
from lorank.data.text import ByteTokenizer

DOCS = ["abc", "hello world", "x", "the quick brown fox", "lorank", "", "jumps over the lazy dog", "0123456789"]


def _bytes(doc):
    return list(doc.encode("utf-8"))


def test_truncate_or_pad_hand_values():
    np.testing.assert_array_equal(tfds_text.truncate_or_pad(np.array([5, 6, 7]), 5, 0), [5, 6, 7, 0, 0])
    np.testing.assert_array_equal(tfds_text.truncate_or_pad(np.array([5, 6, 7]), 2, 0), [5, 6])
    np.testing.assert_array_equal(tfds_text.truncate_or_pad(np.array([], np.int64), 3, 9), [9, 9, 9])
    assert tfds_text.truncate_or_pad(np.array([1, 2], np.int64), 3, 0).dtype == np.int32


def test_pack_documents_hand_values():
    docs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8, 9, 10])]
    # stream with eos 0: 1 2 3 0 4 5 0 6 7 8 9 10 0 -> three windows of 4, tail [0] dropped
    assert [w.tolist() for w in tfds_text.pack_documents(docs, 4, eos_id=0)] == [
        [1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 10]]
    assert [w.tolist() for w in tfds_text.pack_documents(docs, 4)] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert list(tfds_text.pack_documents(docs, 20)) == []


def test_pack_documents_is_a_prefix_of_the_stream_and_lazy():
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 100, size=rng.integers(0, 30)) for _ in range(50)]
    windows = list(tfds_text.pack_documents(docs, 7, eos_id=1))
    stream = np.concatenate([np.append(d, 1) for d in docs])
    assert len(windows) == len(stream) // 7
    np.testing.assert_array_equal(np.concatenate(windows), stream[: 7 * len(windows)])

    def endless():
        yield np.arange(10)
        raise AssertionError("read past the first window's documents")

    assert next(tfds_text.pack_documents(endless(), 4)).tolist() == [0, 1, 2, 3]


def test_loss_mask_hand_values():
    seqs = np.array([[7, 8, 0, 0], [1, 2, 3, 4]])
    np.testing.assert_array_equal(tfds_text.loss_mask(seqs, 0), [[1, 0, 0], [1, 1, 1]])


def test_pad_mode_visits_every_document_once_per_epoch_in_a_seeded_order():
    seq_len, pad = 6, 0
    ds = tfds_text.text_sequences(DOCS, ByteTokenizer(), seq_len, mode="pad", seed=3, pad_id=pad)
    n = len(DOCS)
    expected = sorted((_bytes(d)[: seq_len + 1] + [pad] * (seq_len + 1))[: seq_len + 1] for d in DOCS)
    epoch0 = [ds[i].tolist() for i in range(n)]
    epoch1 = [ds[n + i].tolist() for i in range(n)]
    assert all(len(s) == seq_len + 1 for s in epoch0)
    assert sorted(epoch0) == expected and sorted(epoch1) == expected
    assert epoch0 != epoch1  # reshuffled each epoch
    again = tfds_text.text_sequences(DOCS, ByteTokenizer(), seq_len, mode="pad", seed=3, pad_id=pad)
    assert [again[i].tolist() for i in range(2 * n)] == epoch0 + epoch1
    other = tfds_text.text_sequences(DOCS, ByteTokenizer(), seq_len, mode="pad", seed=4, pad_id=pad)
    assert [other[i].tolist() for i in range(n)] != epoch0


def test_dict_records_and_batches_as_a_pure_function_of_the_step():
    records = [{"text": d.encode("utf-8")} for d in DOCS]
    ds = tfds_text.text_sequences(records, ByteTokenizer(), 4, mode="pad", seed=0, pad_id=0)
    batch = tfds_text.batch_fn(ds, 3)
    b2 = batch(2)
    assert b2.shape == (3, 5) and b2.dtype == np.int32
    np.testing.assert_array_equal(b2, np.stack([ds[6], ds[7], ds[8]]))  # crosses into the second epoch
    np.testing.assert_array_equal(batch(2), b2)
    with pytest.raises(KeyError, match="no text feature 'content'"):
        tfds_text.text_sequences(records, ByteTokenizer(), 4, pad_id=0, text_key="content")[0]


def test_drop_mode_keeps_only_long_documents_truncated():
    seq_len = 5
    ds = tfds_text.text_sequences(DOCS, ByteTokenizer(), seq_len, mode="drop", seed=1, num_epochs=1)
    got = sorted(x.tolist() for x in ds)
    expected = sorted(_bytes(d)[: seq_len + 1] for d in DOCS if len(_bytes(d)) >= seq_len + 1)
    assert got == expected and len(got) == 5


def test_pack_mode_concatenates_documents_in_the_seeded_order():
    import grain

    seq_len, eos = 7, 10  # "\n" as the document separator
    windows = list(tfds_text.text_sequences(DOCS, ByteTokenizer(), seq_len, mode="pack", seed=2, eos_id=eos,
                                            num_epochs=1))
    order = list(grain.MapDataset.source(DOCS).shuffle(seed=2))
    assert sorted(order) == sorted(DOCS)
    stream = [t for d in order for t in _bytes(d) + [eos]]
    assert len(windows) == len(stream) // (seq_len + 1)
    assert [t for w in windows for t in w.tolist()] == stream[: len(windows) * (seq_len + 1)]


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="mode='chunk'"):
        tfds_text.text_sequences(DOCS, ByteTokenizer(), 4, mode="chunk")
    with pytest.raises(ValueError, match="ByteTokenizer defines no pad id"):
        tfds_text.text_sequences(DOCS, ByteTokenizer(), 4, mode="pad")
    with pytest.raises(ValueError, match="pad_id=300"):
        tfds_text.text_sequences(DOCS, ByteTokenizer(), 4, mode="pad", pad_id=300)
    with pytest.raises(ValueError, match="seq_len"):
        tfds_text.text_sequences(DOCS, ByteTokenizer(), 0, pad_id=0)
    with pytest.raises(ValueError, match="no documents"):
        tfds_text.text_sequences([], ByteTokenizer(), 4, pad_id=0)


@pytest.mark.parametrize("name", ["lm1b", "wikitext/wikitext-103-raw-v1", "no_such_dataset_qq"])
def test_missing_tfds_dataset_names_dataset_and_data_dir(tmp_path, name):
    data_dir = tmp_path / "tfds"
    with pytest.raises(FileNotFoundError) as err:
        tfds_text.tfds_text_sequences(name, "train", data_dir, ByteTokenizer(), 8, pad_id=0)
    message = str(err.value)
    assert repr(name) in message and str(data_dir) in message
    assert not data_dir.exists() or not any(data_dir.rglob("*"))  # nothing was downloaded or written


def test_sequential_batches_are_a_function_of_the_step():
    make = lambda: iter(np.arange(100 * 5).reshape(100, 5))  # noqa: E731
    batch = tfds_text.sequential_batch_fn(make, 3)
    first = [batch(s) for s in range(4)]
    np.testing.assert_array_equal(first[2], np.arange(30, 45).reshape(3, 5))
    resumed = tfds_text.sequential_batch_fn(make, 3)  # a resumed run starts at step 2
    np.testing.assert_array_equal(resumed(2), first[2])
    np.testing.assert_array_equal(resumed(3), first[3])
    np.testing.assert_array_equal(resumed(1), first[1])  # going back restarts the iterator
    with pytest.raises(ValueError, match="ran out at step 40"):
        resumed(40)


def test_first_sequences_reads_datasets_and_iterators():
    rows = np.arange(12).reshape(4, 3)
    np.testing.assert_array_equal(tfds_text.first_sequences(list(rows), 2), rows[:2])
    np.testing.assert_array_equal(tfds_text.first_sequences(iter(rows), 9), rows)
    with pytest.raises(ValueError, match="no sequence"):
        tfds_text.first_sequences(iter([]), 3)
