"""A 4,000-token generation streamed through the engine: each step hands out only its new token (with
its logprobs and the text it completes), never the output so far, and the pieces add up to the whole
decode. (The per-token host cost over such a stream is measured in bench/host_stream.py.)"""

import json
import os
import shutil

from tokenizers import Tokenizer

from checkpoints import DEFAULT_MODEL_DIR
from jalora import LLM, SamplingParams

NEW_TOKENS = 4000


def test_a_long_stream_hands_out_deltas_of_constant_size(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model, ignore=shutil.ignore_patterns("adapters"))
    cfg = json.loads((model / "config.json").read_text())
    cfg["max_position_embeddings"] = 8192  # room for the long stream (RoPE takes any position)
    (model / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(model), block_size=16, num_kv_blocks=300, max_num_seqs=1, max_num_batched_tokens=16, warmup=False)
    engine = llm.engine
    prompt = "The base model answers the question, then small adapters judge the answer."
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=7, ignore_eos=True, logprobs=1)
    engine.add_request("long", prompt, params)
    deltas = []
    while engine.has_unfinished_requests():
        deltas += engine.step()
    assert len(deltas) == NEW_TOKENS
    assert all(len(d.token_ids) == 1 and len(d.logprobs) == 1 for d in deltas)
    assert all(d.token_ids[0] in d.logprobs[0] and len(d.logprobs[0]) <= 2 for d in deltas)
    assert [d.is_final for d in deltas].index(True) == NEW_TOKENS - 1
    final = deltas[-1].finished
    assert final.finish_reason == "length" and final.num_output_tokens == NEW_TOKENS
    ids = [d.token_ids[0] for d in deltas]
    tokenizer = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    assert "".join(d.text for d in deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert engine.num_free_blocks() == engine.num_total_blocks
