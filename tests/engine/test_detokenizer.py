"""Text prompts through the model's tokenizer.json, and streamed text that adds up to the decoded whole."""

import os

from tokenizers import Tokenizer

from checkpoints import DEFAULT_MODEL_DIR as DEFAULT_MODEL
from jalora import LLM, SamplingParams


def test_text_prompt_and_incremental_detokenization():
    llm = LLM(DEFAULT_MODEL, num_kv_blocks=32, max_num_seqs=2, max_model_len=256, warmup=False)
    tok = Tokenizer.from_file(os.path.join(DEFAULT_MODEL, "tokenizer.json"))
    prompt = "The capital of France is"
    engine = llm.engine
    engine.add_request("r", prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True))
    texts = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts.append(out.text)
    assert out.prompt_token_ids == tok.encode(prompt).ids
    assert out.prompt_token_ids[0] == tok.token_to_id("<|bos|>")
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # streamed text only grows
