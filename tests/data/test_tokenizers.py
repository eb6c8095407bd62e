"""Tokenizers: a SentencePiece model trained here on a few KB of text, and `make_tokenizer`."""

import numpy as np
import pytest

from lorank.data import text, tokenizers

spm = pytest.importorskip("sentencepiece")

VOCAB = 300


@pytest.fixture(scope="module")
def corpus_lines():
    with open(text.embedded_corpus_path(), encoding="utf-8") as f:
        data = f.read(20_000)
    return [line for line in data.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, corpus_lines):
    """A unigram SentencePiece model with T5's special ids (pad 0, eos 1, unk 2, no bos)."""
    root = tmp_path_factory.mktemp("spm")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "tiny"), vocab_size=VOCAB, model_type="unigram",
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1,
        minloglevel=2)
    return root / "tiny.model"


def test_round_trip_on_text_from_the_training_distribution(model_path, corpus_lines):
    tok = tokenizers.make_tokenizer(str(model_path))
    assert isinstance(tok, tokenizers.SentencePieceTokenizer)
    assert tok.vocab_size == VOCAB
    for line in corpus_lines[:40] + [" ".join(corpus_lines[40:60])]:
        ids = tok.encode(line)
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert ids.min() >= 3 and ids.max() < VOCAB  # no pad / eos / unk inside ordinary text
        assert tok.decode(ids) == line
    long = " ".join(corpus_lines[:50])
    assert len(tok.encode(long)) < len(long.encode("utf-8")) / 2  # subwords compress the training text


def test_special_ids_and_eos(model_path):
    tok = tokenizers.SentencePieceTokenizer(model_path, add_eos=True)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, -1)
    ids = tok.encode("First Citizen:")
    assert ids[-1] == 1 and 1 not in ids[:-1]
    plain = tokenizers.SentencePieceTokenizer(model_path).encode("First Citizen:")
    np.testing.assert_array_equal(ids[:-1], plain)
    assert tok.decode(ids) == "First Citizen:"  # EOS decodes to nothing
    assert tok.encode(b"First Citizen:").tolist() == ids.tolist()  # bytes are UTF-8 text
    with pytest.raises(ValueError, match="defines no BOS"):
        tokenizers.SentencePieceTokenizer(model_path, add_bos=True)


def test_decode_rejects_out_of_range_ids(model_path):
    tok = tokenizers.make_tokenizer(str(model_path))
    with pytest.raises(ValueError, match=rf"\[0, {VOCAB}\)"):
        tok.decode([5, VOCAB])
    with pytest.raises(ValueError, match="must lie in"):
        tok.decode(np.array([-1, 4]))


def test_make_tokenizer_byte_and_errors(tmp_path):
    byte = tokenizers.make_tokenizer("byte")
    assert isinstance(byte, text.ByteTokenizer) and byte.vocab_size == 256
    missing = tmp_path / "nowhere" / "spiece.model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        tokenizers.make_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="t5.model"):
        tokenizers.make_tokenizer("t5.model")
    with pytest.raises(ValueError, match="unknown tokenizer 't5'"):
        tokenizers.make_tokenizer("t5")
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="corrupt.model is not a valid SentencePiece model"):
        tokenizers.make_tokenizer(str(corrupt))
