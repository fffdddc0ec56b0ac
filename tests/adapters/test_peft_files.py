"""Adapters that jalora writes itself (checkpoints/judges.py, numpy + safetensors): PEFT loads them, and
PEFT and jalora give the same tokens with them."""

import numpy as np

from checkpoints.judges import write_random_alora
from jalora import LLM, SamplingParams
from tests import hf_models


def test_numpy_written_alora_is_a_peft_adapter(tiny_models, tmp_path):
    base = tiny_models["llama"]
    invocation = [7, 8, 9]
    path = write_random_alora(base, tmp_path / "judge", invocation, None, ["q_proj", "v_proj", "down_proj"],
                              seed=4, weight_std=0.15)  # fmt: skip
    oracle = hf_models.load_peft_oracle(base, str(path))
    llm = LLM(base, num_kv_blocks=32, max_num_seqs=2, max_lora_rank=8, warmup=False)
    info = llm.load_adapter("judge", str(path))
    assert info.kind == "alora" and info.invocation_tokens == invocation and info.rank == 8
    prompt = np.random.default_rng(3).integers(13, 90, size=21).tolist() + invocation
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=8, prompt_logprobs=True, ignore_eos=True), "judge")
    prompt_lps, tokens, _ = hf_models.oracle_run(oracle, prompt, 8, activation=21)
    assert out.activation_start == 21 and out.token_ids == tokens
    assert np.max(np.abs(np.asarray(out.prompt_logprobs[1:]) - np.asarray(prompt_lps))) <= 1e-4
