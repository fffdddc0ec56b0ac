"""Writes the embedded default model to checkpoints/default/ (run once; the output is committed).

    python checkpoints/make_default.py

A byte-level BPE tokenizer trained on the text below and a tiny Granite-family decoder with random
weights (seeded): small enough for the repository and for 2 CPU cores. The weights are random, so
the text it generates is noise; the engine path it exercises (tokenizer, paged KV cache, adapters,
prefix reuse) is the real one.
"""

import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "default")
SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|start_of_role|>", "<|end_of_role|>"]
CORPUS = """
The base model answers the question, then small adapters judge the answer. An adapter that rates
certainty, one that checks for hallucination, one that checks safety, and one that rewrites the
query all read the same long context. Activated LoRA applies the adapter only after its invocation
sequence, so every token before it keeps the base model's key-value cache and can be shared.
user: What is the capital of France? assistant: The capital of France is Paris.
certainty: how sure is the answer? hallucination: is the answer grounded in the documents?
safety: is the request harmful? rewrite: make the last question standalone.
""" * 4
# Granite-style turns: a role between the role markers, the text, the end-of-text token. The judges'
# invocations are such role prefixes (make_adapters.py), so a judge answers in a turn of its own.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|eos|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)


def make_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CORPUS], trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", bos)])
    return tok


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    tok = make_tokenizer()
    tok.save(os.path.join(OUT, "tokenizer.json"))
    cfg = AutoConfig.for_model(
        "granite",
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        embedding_multiplier=2.0,
        attention_multiplier=0.125,
        residual_multiplier=0.5,
        logits_scaling=1.5,
        tie_word_embeddings=True,
        bos_token_id=tok.token_to_id("<|bos|>"),
        eos_token_id=tok.token_to_id("<|eos|>"),
        pad_token_id=tok.token_to_id("<|pad|>"),
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(OUT, safe_serialization=True)
    with open(os.path.join(OUT, "tokenizer_config.json"), "w") as f:
        special = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
        json.dump({**special, "chat_template": CHAT_TEMPLATE}, f, indent=2)


if __name__ == "__main__":
    main()
