"""A tiny Llama with a word-level tokenizer and a chat template, so training data can be text."""

import json
import shutil

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from tests import hf_models

SPECIAL = ["<|user|>", "<|assistant|>", "<|judge|>", "<|system|>", "</s>"]  # ids 92..96 (96: the model's eos)
WORDS = ["<unk>", "<s>"] + [f"w{i}" for i in range(2, hf_models.VOCAB - len(SPECIAL))]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")  # fmt: skip
JUDGE = "<|judge|>"  # the invocation string of the tests' aLoRA (one token, id 94)


def add_tokenizer(model_dir: str) -> str:
    vocab = {t: i for i, t in enumerate(WORDS + SPECIAL)}
    assert len(vocab) == hf_models.VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    tok.save(f"{model_dir}/tokenizer.json")
    with open(f"{model_dir}/tokenizer_config.json", "w") as f:
        json.dump({"chat_template": TEMPLATE, "eos_token": "</s>", "bos_token": "<s>"}, f)
    return model_dir


@pytest.fixture(scope="session")
def text_llama(tiny_models, tmp_path_factory):
    """tests/hf_models' tiny Llama (same weights) with a tokenizer.json and a chat template."""
    path = tmp_path_factory.mktemp("text_llama") / "llama"
    shutil.copytree(tiny_models["llama"], path)
    return add_tokenizer(str(path))
