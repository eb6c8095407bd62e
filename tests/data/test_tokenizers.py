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


# ----------------------------------------------------------------------------- Hugging Face tokenizer.json


def hf_reference(checkpoint):
    """The tokenizers library's own view of the checkpoint's tokenizer.json."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(checkpoint / "tokenizer.json"))


def test_hf_round_trip_without_the_post_processor(hf_checkpoint):
    tok = tokenizers.make_tokenizer(str(hf_checkpoint))
    assert isinstance(tok, tokenizers.HFTokenizer)
    reference = hf_reference(hf_checkpoint)
    assert tok.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    for line in ["hello world, how are you today?", "the lazy fox", "Grüße, 世界! \n\t tabs"]:
        ids = tok.encode(line)
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert tok.decode(ids) == line  # byte-level BPE is lossless
        # tokenizer.json's post-processor prepends <s>; encode leaves it out
        assert reference.encode(line).ids == [1] + ids.tolist()
        assert reference.encode(line, add_special_tokens=False).ids == ids.tolist()
    assert tok.encode(b"hello world").tolist() == tok.encode("hello world").tolist()
    # the same tokenizer from the file itself, and from a PathLike
    file_tok = tokenizers.make_tokenizer(str(hf_checkpoint / "tokenizer.json"))
    assert isinstance(file_tok, tokenizers.HFTokenizer)
    assert file_tok.encode("the quick brown fox").tolist() == tok.encode("the quick brown fox").tolist()
    assert tokenizers.make_tokenizer(hf_checkpoint).vocab_size == tok.vocab_size


def test_hf_special_ids_and_bos_eos(hf_checkpoint):
    tok = tokenizers.HFTokenizer(hf_checkpoint)
    # bos from a string, eos from an AddedToken object, pad only in special_tokens_map.json
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok.token_to_id("<|user|>") == 4 and tok.token_to_id("not-a-token") == -1
    plain = tok.encode("hello world")
    assert 1 not in plain and 2 not in plain
    both = tokenizers.HFTokenizer(hf_checkpoint, add_bos=True, add_eos=True).encode("hello world")
    assert both.tolist() == [1] + plain.tolist() + [2]
    assert tokenizers.HFTokenizer(hf_checkpoint, add_eos=True).encode("hello world").tolist() == plain.tolist() + [2]
    assert tok.decode(both) == "hello world"  # special tokens decode to nothing
    assert tok.decode(both, skip_special_tokens=False) == "<s>hello world</s>"
    # text that spells an added token is that token
    assert tok.encode("</s>").tolist() == [2]
    assert tok.encode("<|user|>\nhello").tolist() == [4] + tok.encode("\nhello").tolist()


def test_hf_chat_template_renders_as_hand_written(hf_checkpoint):
    tok = tokenizers.HFTokenizer(hf_checkpoint)
    messages = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "two plus two?"},
                {"role": "assistant", "content": "four."}]
    expected = "<s><|system|>\nbe brief.</s>\n<|user|>\ntwo plus two?</s>\n<|assistant|>\nfour.</s>\n"
    assert tok.apply_chat_template(messages) == expected
    assert tok.apply_chat_template(messages[:2], add_generation_prompt=True) == (
        "<s><|system|>\nbe brief.</s>\n<|user|>\ntwo plus two?</s>\n<|assistant|>\n")
    ids = tok.encode(tok.apply_chat_template(messages))
    assert ids[0] == 1 and ids[-2] == 2 and (ids == 2).sum() == 3
    with pytest.raises(ValueError, match="raised: conversations start with a system or user turn"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="messages must be a list"):
        tok.apply_chat_template({"role": "user", "content": "hi"})


def test_hf_chat_environment_is_hugging_faces(hf_checkpoint):
    """trim_blocks and lstrip_blocks, tojson without HTML escaping, {% generation %}, loop controls, a sandbox."""
    import jinja2

    indented = ("{% for m in messages %}\n"
                "    {% if m['role'] == 'user' %}\n"
                "U:{{ m['content'] }}\n"
                "    {% endif %}\n"
                "{% endfor %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "ok"}]
    assert tokenizers.HFTokenizer(hf_checkpoint, chat_template=indented).apply_chat_template(messages) == "U:hi\nU:ok\n"
    as_json = tokenizers.HFTokenizer(hf_checkpoint, chat_template="{{ messages[0]['content'] | tojson }}")
    assert as_json.apply_chat_template([{"role": "user", "content": "<a & 'b'>"}]) == "\"<a & 'b'>\""
    marked = ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
              "{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}")
    assert tokenizers.HFTokenizer(hf_checkpoint, chat_template=marked).apply_chat_template(messages) == "[hi][yo]"
    mutating = tokenizers.HFTokenizer(hf_checkpoint, chat_template="{{ messages.append(1) }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        mutating.apply_chat_template(messages)


def test_hf_chat_template_sources(hf_checkpoint_factory, chat_template):
    messages = [{"role": "user", "content": "hi"}]
    listed = hf_checkpoint_factory("listed", chat_template=[
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": chat_template}])
    assert tokenizers.HFTokenizer(listed).chat_template == chat_template
    assert tokenizers.HFTokenizer(listed).chat_template_source == str(listed / "tokenizer_config.json")
    assert tokenizers.HFTokenizer(listed, chat_template="x").chat_template_source == "the chat_template argument"
    assert tokenizers.HFTokenizer(listed).apply_chat_template(messages) == "<s><|user|>\nhi</s>\n"
    none = hf_checkpoint_factory("none", chat_template=None)
    tok = tokenizers.HFTokenizer(none)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="has no chat template"):
        tok.apply_chat_template(messages)
    (none / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!", encoding="utf-8")
    assert tokenizers.HFTokenizer(none).apply_chat_template(messages) == "hi!"
    assert tokenizers.HFTokenizer(none).chat_template_source == str(none / "chat_template.jinja")
    no_default = hf_checkpoint_factory("no_default", chat_template=[{"name": "rag", "template": "x"}])
    with pytest.raises(ValueError, match=r"tokenizer_config.json: chat_template names the templates \['rag'\]"):
        tokenizers.HFTokenizer(no_default)
    broken = hf_checkpoint_factory("broken", chat_template="{% for m in messages %}")
    with pytest.raises(ValueError, match="broken/tokenizer_config.json does not parse"):
        tokenizers.HFTokenizer(broken).apply_chat_template(messages)


def test_hf_errors_name_the_file(hf_checkpoint, hf_checkpoint_factory, tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        tokenizers.make_tokenizer(str(missing))
    empty_dir = tmp_path / "empty_checkpoint"
    empty_dir.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty_dir / "tokenizer.json")):
        tokenizers.make_tokenizer(str(empty_dir))
    not_json = tmp_path / "not_json.json"
    not_json.write_text("nonsense", encoding="utf-8")
    with pytest.raises(ValueError, match="not_json.json is not a valid Hugging Face tokenizer.json"):
        tokenizers.make_tokenizer(str(not_json))
    other_json = tmp_path / "other.json"
    other_json.write_text('{"vocab": [1, 2]}', encoding="utf-8")
    with pytest.raises(ValueError, match="other.json is not a valid Hugging Face tokenizer.json"):
        tokenizers.HFTokenizer(other_json)
    bad_config = hf_checkpoint_factory("bad_config")
    (bad_config / "tokenizer_config.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(ValueError, match="bad_config/tokenizer_config.json is not valid JSON"):
        tokenizers.HFTokenizer(bad_config)
    unknown_bos = hf_checkpoint_factory("unknown_bos", config_extra={"bos_token": "<bos>"})
    with pytest.raises(ValueError, match="bos_token '<bos>' is not in the vocabulary"):
        tokenizers.HFTokenizer(unknown_bos)
    bad_token = hf_checkpoint_factory("bad_token", config_extra={"eos_token": 2})
    with pytest.raises(ValueError, match="eos_token must be a string"):
        tokenizers.HFTokenizer(bad_token)
    no_bos = hf_checkpoint_factory("no_bos", config_extra={"bos_token": None})
    assert tokenizers.HFTokenizer(no_bos).bos_id == -1
    with pytest.raises(ValueError, match="defines no BOS"):
        tokenizers.HFTokenizer(no_bos, add_bos=True)
    tok = tokenizers.HFTokenizer(hf_checkpoint)
    with pytest.raises(ValueError, match=rf"\[0, {tok.vocab_size}\)"):
        tok.decode([3, tok.vocab_size])
