"""Instruction (SFT) data: records, rendered segments, trained-token masks, sequences and batches."""

import json

import numpy as np
import pytest

from lorank.data import instructions, text, tokenizers

BYTE = text.ByteTokenizer()


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- records


def test_read_jsonl_both_forms_skipping_blank_lines(tmp_path):
    pair = {"prompt": "2+2?", "response": "4", "id": 7}
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}]}
    path = write_lines(tmp_path / "sft.jsonl", [json.dumps(pair), "", "   ", json.dumps(chat)])
    assert instructions.read_jsonl(path) == [pair, chat]
    assert instructions.conversation(pair) == [{"role": "user", "content": "2+2?"},
                                               {"role": "assistant", "content": "4"}]
    assert instructions.conversation(chat) is chat["messages"]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "response": ', "invalid JSON"),
    ('[1, 2]', "a record must be a JSON object, got list"),
    ('{"text": "a"}', r"needs 'prompt' and 'response' or 'messages', got the keys \['text'\]"),
    ('{"prompt": "a"}', "needs a 'response' field"),
    ('{"prompt": 3, "response": "b"}', "'prompt' must be a string, got int"),
    ('{"prompt": "a", "response": "b", "messages": []}', "not both"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": ["hi"]}', r"messages\[0\] must be an object"),
    ('{"messages": [{"role": "user"}]}', r"messages\[0\] has no 'content'"),
    ('{"messages": [{"role": "user", "content": ["hi"]}]}', r"messages\[0\]\['content'\] must be a string"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
     r"messages\[1\] has the unknown role 'bot'"),
    ('{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}',
     "no assistant turn"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"prompt": "a", "response": "b"})
    path = write_lines(tmp_path / "bad.jsonl", [good, "", line, good])
    with pytest.raises(ValueError, match=str(path) + ":3: .*" + message):
        instructions.read_jsonl(path)


def test_read_jsonl_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        instructions.read_jsonl(tmp_path / "nowhere.jsonl")
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="holds no records: .*empty.jsonl"):
        instructions.read_jsonl(empty)
    with pytest.raises(ValueError, match="record 1: 'response' must be a string"):
        instructions.load_records([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": None}])
    with pytest.raises(ValueError, match="one record"):
        instructions.load_records({"prompt": "a", "response": "b"})
    with pytest.raises(ValueError, match="no instruction records"):
        instructions.load_records([])


def test_train_val_split_by_record():
    records = [{"prompt": str(i), "response": "r"} for i in range(10)]
    train, val = instructions.train_val_split(records, 0.3, seed=1)
    assert len(train) == 7 and len(val) == 3
    prompts = lambda rs: [int(r["prompt"]) for r in rs]  # noqa: E731
    assert sorted(prompts(train) + prompts(val)) == list(range(10))
    assert prompts(train) == sorted(prompts(train)) and prompts(val) == sorted(prompts(val))  # order kept
    assert instructions.train_val_split(records, 0.3, seed=1) == (train, val)
    assert any(instructions.train_val_split(records, 0.3, seed=s)[1] != val for s in range(2, 6))
    with pytest.raises(ValueError, match="gives 3 for training and 0 for validation"):
        instructions.train_val_split(records[:3], 0.1)
    with pytest.raises(ValueError, match="gives 0 for training and 3 for validation"):
        instructions.train_val_split(records[:3], 0.9)
    with pytest.raises(ValueError, match="val_fraction"):
        instructions.train_val_split(records, 1.0)


# ----------------------------------------------------------------------------- the plain format


def test_plain_format_mask_by_hand_with_the_byte_tokenizer():
    record = {"prompt": "ab", "response": "cd"}
    rendered = "### Instruction:\nab\n\n### Response:\ncd"  # 17 + 2 + 2 + 14 characters, then "cd"
    assert instructions.segments(record, BYTE) == [("### Instruction:\nab\n\n### Response:\n", False), ("cd", True)]
    tokens, trained = instructions.encode_record(record, BYTE)  # the byte tokenizer has no BOS and no EOS
    assert tokens.dtype == np.int32 and trained.dtype == bool
    assert tokens.tolist() == list(rendered.encode())
    assert np.flatnonzero(trained).tolist() == [35, 36]
    # seq_len 39: 37 tokens and 3 of padding; position t predicts token t + 1, so targets 35, 36 are t = 34, 35
    seqs = instructions.instruction_sequences([record], BYTE, 39, pad_id=0)
    assert seqs["tokens"].shape == (1, 40) and seqs["tokens"].dtype == np.int32
    assert seqs["loss_mask"].shape == (1, 39) and seqs["loss_mask"].dtype == np.float32
    assert seqs["tokens"][0].tolist() == list(rendered.encode()) + [0, 0, 0]
    assert np.flatnonzero(seqs["loss_mask"][0]).tolist() == [34, 35]
    with pytest.raises(ValueError, match="neither a pad id nor an EOS id"):
        instructions.instruction_sequences([record], BYTE, 39)


def test_plain_format_conversation_by_hand():
    record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                           {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"},
                           {"role": "assistant", "content": "b"}, {"role": "user", "content": "w"}]}
    # the last user turn has nothing after it to learn and is left out
    rendered = "### System:\ns\n\n### User:\nu\n\n### Assistant:\na\n\n### User:\nv\n\n### Assistant:\nb"
    pieces = instructions.segments(record, BYTE)
    assert "".join(p for p, _ in pieces) == rendered
    assert [p for p, trained in pieces if trained] == ["a", "b"]
    tokens, trained = instructions.encode_record(record, BYTE)
    assert tokens.tolist() == list(rendered.encode())
    # 13 + 2 + 11 + 2 + 15 = 43 characters before "a"; 44 + 2 + 11 + 2 + 15 = 74 before "b"
    assert np.flatnonzero(trained).tolist() == [43, 74]


def test_plain_format_with_bos_and_eos(hf_checkpoint_factory):
    tok = tokenizers.HFTokenizer(hf_checkpoint_factory("plain", chat_template=None))
    assert tok.chat_template is None
    record = {"prompt": "ab", "response": "cd"}
    prompt = "### Instruction:\nab\n\n### Response:\n"
    assert instructions.segments(record, tok) == [(prompt, False), ("cd", True), (tok.eos_id, True)]
    tokens, trained = instructions.encode_record(record, tok)
    p, r = tok.encode(prompt).tolist(), tok.encode("cd").tolist()
    assert tokens.tolist() == [tok.bos_id] + p + r + [tok.eos_id]
    assert trained.tolist() == [False] * (1 + len(p)) + [True] * (len(r) + 1)
    no_bos, no_bos_trained = instructions.encode_record(record, tok, add_bos=False)
    np.testing.assert_array_equal(no_bos, tokens[1:])
    np.testing.assert_array_equal(no_bos_trained, trained[1:])
    with pytest.raises(ValueError, match="built with add_eos=True"):
        instructions.segments(record, tokenizers.HFTokenizer(tok.path, add_eos=True))


# ----------------------------------------------------------------------------- chat templates


def test_chat_template_segments_by_prefix_difference(hf_checkpoint):
    tok = tokenizers.HFTokenizer(hf_checkpoint)
    record = {"messages": [{"role": "system", "content": "be brief."}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello."}, {"role": "user", "content": "bye"},
                           {"role": "assistant", "content": "bye."}]}
    expected = [("<s><|system|>\nbe brief.</s>\n<|user|>\nhi</s>\n<|assistant|>\n", False),
                ("hello.</s>\n", True),
                ("<|user|>\nbye</s>\n<|assistant|>\n", False),
                ("bye.</s>\n", True)]
    assert instructions.segments(record, tok) == expected
    assert "".join(p for p, _ in expected) == tok.apply_chat_template(record["messages"])
    tokens, trained = instructions.encode_record(record, tok)
    # the template writes BOS itself: it is not added a second time
    assert tokens[0] == tok.bos_id and (tokens == tok.bos_id).sum() == 1 and not trained[0]
    assert tokens.tolist() == sum((tok.encode(p).tolist() for p, _ in expected), [])
    assert tok.decode(tokens[trained], skip_special_tokens=False) == "hello.</s>\nbye.</s>\n"
    assert (tokens[trained] == tok.eos_id).sum() == 2  # each turn's end is learned
    pair = {"prompt": "ab", "response": "cd"}
    assert instructions.segments(pair, tok) == [("<s><|user|>\nab</s>\n<|assistant|>\n", False), ("cd</s>\n", True)]


@pytest.mark.parametrize("template", [
    # the header of the whole conversation depends on its length
    "{{ messages | length }}:{% for m in messages %}{{ m['content'] }};{% endfor %}",
    # the generation prompt is not the assistant turn's header
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<bot>{% endif %}",
])
def test_chat_template_that_is_not_prefix_consistent(hf_checkpoint_factory, template):
    tok = tokenizers.HFTokenizer(hf_checkpoint_factory("odd", chat_template=template))
    with pytest.raises(ValueError, match=r"chat template of .*odd/tokenizer_config.json is not prefix-consistent"):
        instructions.segments({"prompt": "hi", "response": "hello"}, tok)


def test_chat_template_errors_name_the_tokenizer(hf_checkpoint, hf_checkpoint_factory):
    tok = tokenizers.HFTokenizer(hf_checkpoint)
    # rendering the empty conversation before the first turn reads messages[0], which is undefined
    with pytest.raises(ValueError, match=r"checkpoint/tokenizer_config.json failed on messages\[:0\].*UndefinedError"):
        instructions.segments({"messages": [{"role": "assistant", "content": "hi"}]}, tok)
    strict = tokenizers.HFTokenizer(hf_checkpoint_factory("strict", chat_template=(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}")))
    with pytest.raises(ValueError, match="strict/tokenizer_config.json raised: no system turns"):
        instructions.segments({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                            {"role": "assistant", "content": "a"}]}, strict)


# ----------------------------------------------------------------------------- sequences


RECORDS = [{"prompt": "p" * n, "response": "r" * m} for n, m in [(1, 2), (5, 1), (0, 6), (3, 3), (2, 9)]]


def test_pad_mode_rows_alignment_and_padding_never_trained():
    seq_len = 40  # records are 33 + len(prompt) + len(response) bytes: 36, 39, 39, 39, 44
    seqs, stats = instructions.instruction_sequences(RECORDS, BYTE, seq_len, pad_id=0, return_stats=True)
    assert seqs["tokens"].shape == (len(RECORDS), seq_len + 1) and seqs["loss_mask"].shape == (len(RECORDS), seq_len)
    assert stats == {"records": 5, "sequences": 5, "truncated": 1, "rows_without_targets": 0,
                     "trained_targets": 2 + 1 + 6 + 3 + 6, "dropped_tokens": 3}  # the last loses 3 of its 9
    for m, record in enumerate(RECORDS):
        tokens, trained = instructions.encode_record(record, BYTE)
        n = min(len(tokens), seq_len + 1)
        np.testing.assert_array_equal(seqs["tokens"][m, :n], tokens[:n])
        assert (seqs["tokens"][m, n:] == 0).all()
        for t in range(seq_len):  # the mask at t is whether the target tokens[t + 1] is trained
            assert seqs["loss_mask"][m, t] == (t + 1 < n and trained[t + 1])
        assert seqs["loss_mask"][m, n - 1:].sum() == 0  # no target among the padding


def test_pad_mode_counts_rows_a_prompt_fills():
    seqs, stats = instructions.instruction_sequences([{"prompt": "x" * 40, "response": "y"}], BYTE, 20, pad_id=0,
                                                     return_stats=True)
    assert seqs["loss_mask"].sum() == 0 and stats["truncated"] == 1 and stats["rows_without_targets"] == 1


def test_pack_mode_windows_and_alignment(tmp_path):
    seq_len = 15
    path = write_lines(tmp_path / "sft.jsonl", [json.dumps(r) for r in RECORDS])
    seqs, stats = instructions.instruction_sequences(path, BYTE, seq_len, mode="pack", return_stats=True)
    encoded = [instructions.encode_record(r, BYTE) for r in RECORDS]
    stream = np.concatenate([t for t, _ in encoded])
    flags = np.concatenate([f for _, f in encoded])
    windows = len(stream) // (seq_len + 1)
    assert seqs["tokens"].shape == (windows, seq_len + 1) and seqs["loss_mask"].shape == (windows, seq_len)
    np.testing.assert_array_equal(seqs["tokens"].reshape(-1), stream[: windows * (seq_len + 1)])
    window_flags = flags[: windows * (seq_len + 1)].reshape(windows, seq_len + 1)
    np.testing.assert_array_equal(seqs["loss_mask"], window_flags[:, 1:].astype(np.float32))
    assert stats["dropped_tokens"] == len(stream) - windows * (seq_len + 1) and stats["truncated"] == 0
    with pytest.raises(ValueError, match="fewer than one window of seq_len \\+ 1 = 1001"):
        instructions.instruction_sequences(path, BYTE, 1000, mode="pack")


def test_sequences_with_a_hugging_face_tokenizer(hf_checkpoint):
    tok = tokenizers.HFTokenizer(hf_checkpoint)
    seqs = instructions.instruction_sequences(RECORDS, tok, 32)
    assert seqs["tokens"].shape == (5, 33)
    lengths = [len(instructions.encode_record(r, tok)[0]) for r in RECORDS]
    for m, n in enumerate(lengths):
        assert (seqs["tokens"][m, n:] == tok.pad_id).all() and seqs["loss_mask"][m, n - 1:].sum() == 0
    (hf_checkpoint / "special_tokens_map.json").unlink()  # no pad token: pad with EOS
    no_pad = tokenizers.HFTokenizer(hf_checkpoint)
    assert no_pad.pad_id == -1
    padded = instructions.instruction_sequences(RECORDS, no_pad, 32)
    assert (padded["tokens"][0, lengths[0]:] == no_pad.eos_id).all()
    np.testing.assert_array_equal(padded["loss_mask"], seqs["loss_mask"])


def test_sequence_argument_errors():
    with pytest.raises(ValueError, match="mode"):
        instructions.instruction_sequences(RECORDS, BYTE, 8, mode="drop", pad_id=0)
    with pytest.raises(ValueError, match="seq_len"):
        instructions.instruction_sequences(RECORDS, BYTE, 0, pad_id=0)
    with pytest.raises(ValueError, match=r"pad_id=256 is outside the vocabulary \[0, 256\)"):
        instructions.instruction_sequences(RECORDS, BYTE, 8, pad_id=256)


# ----------------------------------------------------------------------------- batches


def test_batch_fn_is_a_pure_function_of_the_step():
    seqs = instructions.instruction_sequences(RECORDS * 2, BYTE, 8, pad_id=0)  # 10 rows
    seqs["tokens"][:, 0] = np.arange(10)  # tag each row
    batch = instructions.batch_fn(seqs, 3, seed=4)
    again = instructions.batch_fn(seqs, 3, seed=4)
    for step in [0, 5, 2, 7, 0]:
        b = batch(step)
        assert b["tokens"].shape == (3, 9) and b["tokens"].dtype == np.int32
        assert b["loss_mask"].shape == (3, 8) and b["loss_mask"].dtype == np.float32
        np.testing.assert_array_equal(b["tokens"], again(step)["tokens"])
        picked = b["tokens"][:, 0]
        np.testing.assert_array_equal(b["loss_mask"], seqs["loss_mask"][picked])
    # an epoch is 3 batches of distinct rows; the next epoch is another permutation
    epoch0 = np.concatenate([batch(s)["tokens"][:, 0] for s in range(3)])
    epoch1 = np.concatenate([batch(s)["tokens"][:, 0] for s in range(3, 6)])
    assert len(set(epoch0.tolist())) == 9 and len(set(epoch1.tolist())) == 9
    assert epoch0.tolist() != epoch1.tolist()
    other_seed = instructions.batch_fn(seqs, 3, seed=5)
    assert any(other_seed(s)["tokens"][:, 0].tolist() != batch(s)["tokens"][:, 0].tolist() for s in range(6))


def test_batch_fn_rows_are_rows_of_the_global_batch():
    seqs = instructions.instruction_sequences(RECORDS * 2, BYTE, 8, pad_id=0)
    batch = instructions.batch_fn(seqs, 4, seed=0)
    full = batch(3)
    for rows in [np.array([0, 1]), np.array([2, 3]), [3, 0]]:
        part = batch(3, rows)
        np.testing.assert_array_equal(part["tokens"], full["tokens"][np.asarray(rows)])
        np.testing.assert_array_equal(part["loss_mask"], full["loss_mask"][np.asarray(rows)])
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 4\)"):
        batch(3, np.array([4]))
    with pytest.raises(ValueError, match="step"):
        batch(-1)
    with pytest.raises(ValueError, match="10 rows are fewer than batch_size=11"):
        instructions.batch_fn(seqs, 11)
    with pytest.raises(ValueError, match="loss_mask"):
        instructions.batch_fn({"tokens": seqs["tokens"]}, 2)
    with pytest.raises(ValueError, match=r"got \(10, 9\) and \(10, 9\)"):
        instructions.batch_fn({"tokens": seqs["tokens"], "loss_mask": seqs["tokens"]}, 2)
