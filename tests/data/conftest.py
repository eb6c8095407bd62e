"""A small Hugging Face checkpoint tokenizer, built here with the `tokenizers` library.

`make_hf_checkpoint(directory, chat_template=...)` writes a byte-level BPE
tokenizer.json trained on a few sentences, with the special tokens <pad> (0),
<s> (1), </s> (2), <|system|>, <|user|>, <|assistant|>, a post-processor that
prepends <s> (as Llama's does), a tokenizer_config.json (bos as a string, eos as
an AddedToken object, the chat template) and a special_tokens_map.json that alone
names the pad token.
"""

import json

import pytest

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

# Zephyr-style: "<|role|>\n" + content + "</s>\n" per message, after one BOS.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('conversations start with a system or user turn') }}"
    "{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SENTENCES = [
    "hello world, how are you today?",
    "the quick brown fox jumps over the lazy dog.",
    "what is two plus two? two plus two is four.",
    "you are a helpful assistant. answer briefly.",
    "thank you, that is all for today.",
]


def make_hf_checkpoint(directory, *, chat_template=CHAT_TEMPLATE, config_extra=None):
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
        "pad_token": None,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    config.update(config_extra or {})
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}), encoding="utf-8")
    return directory


@pytest.fixture
def hf_checkpoint(tmp_path):
    """A checkpoint directory with the Zephyr-style CHAT_TEMPLATE."""
    pytest.importorskip("tokenizers")
    return make_hf_checkpoint(tmp_path / "checkpoint")


@pytest.fixture
def hf_checkpoint_factory(tmp_path):
    """(name, **make_hf_checkpoint kwargs) -> a checkpoint directory under tmp_path."""
    pytest.importorskip("tokenizers")
    return lambda name, **kwargs: make_hf_checkpoint(tmp_path / name, **kwargs)


@pytest.fixture
def chat_template():
    return CHAT_TEMPLATE
