"""The decoder's layer loop (one compiled body over the stacked layer weights, adapter stacks and KV
caches, EngineConfig.scan_layers) against the same model unrolled into one copy per layer: the same
prompt logprobs and tokens, base and adapted, for Granite (multipliers) and Mistral (sliding window),
and both against transformers / PEFT over three layers and several cache blocks, so a wrong per-layer
cache offset or adapter slice would show (the parity suites, tests/model/test_decoder_parity.py and
tests/adapters, run the loop on their two-layer models)."""

import numpy as np
import pytest

from jalora import LLM, SamplingParams
from tests import hf_models

INV = [7, 8]
PARAMS = SamplingParams(max_tokens=6, prompt_logprobs=True, logprobs=0, ignore_eos=True)
ENGINE = dict(block_size=4, num_kv_blocks=48, max_num_seqs=4, max_num_batched_tokens=32, max_loras=2,
              max_lora_rank=4, warmup=False)  # fmt: skip
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _run(model: str, adapter: str, scan: bool):
    llm = LLM(model, scan_layers=scan, **ENGINE)
    assert llm.engine.kernel_plan.scan_layers is scan
    llm.load_adapter("judge", adapter)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, hf_models.VOCAB - 1, size=n).tolist() for n in (5, 30)]
    base = llm.generate(prompts, PARAMS)
    judged = [p + o.token_ids + INV for p, o in zip(prompts, base)]
    return prompts + judged, base + llm.generate(judged, PARAMS, adapter="judge")


@pytest.mark.parametrize("family", ["granite", "mistral"])  # llama's layer, plus multipliers / a sliding window
def test_scanned_layers_equal_unrolled(family, tmp_path):
    model = hf_models.make_model(str(tmp_path / "model"), family, seed=4, num_hidden_layers=3)
    adapter = hf_models.make_adapter(model, str(tmp_path / "alora"), ALL_MODULES, r=4, invocation=INV, seed=2)
    (prompts, scanned), (_, unrolled) = _run(model, adapter, True), _run(model, adapter, False)
    # the loop against the oracle too: transformers (base) and PEFT (adapted from the invocation on)
    oracles = [hf_models.load_oracle(model)] * 2 + [hf_models.load_peft_oracle(model, adapter)] * 2
    for k, (prompt, out, oracle) in enumerate(zip(prompts, scanned, oracles, strict=True)):
        ref_lp, ref_tokens, _ = hf_models.oracle_run(oracle, prompt, 6, len(prompt) - len(INV) if k >= 2 else None)
        assert out.token_ids == ref_tokens
        assert np.max(np.abs(np.asarray(out.prompt_logprobs[1:]) - np.asarray(ref_lp))) <= 1e-4
    for s, u in zip(scanned, unrolled, strict=True):
        assert s.token_ids == u.token_ids
        diff = np.max(np.abs(np.asarray(s.prompt_logprobs[1:]) - np.asarray(u.prompt_logprobs[1:])))
        assert diff <= 1e-5, f"prompt logprobs differ by {diff}"
        for a, b in zip(s.logprobs, u.logprobs, strict=True):
            assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) <= 1e-5


def test_the_step_updates_the_cache_in_place(tiny_models):
    """The layer loop carries the whole (donated) cache and writes into it: the compiled step's outputs
    alias the caches, and its scratch memory holds no copy of them, not even of one layer's part (which a
    per-layer slice of the stacked cache would make every step)."""
    from jalora.engine.model_runner import _WarmupBatch, pack_inputs

    llm = LLM(tiny_models["llama"], block_size=4, num_kv_blocks=2048, max_num_seqs=2, max_num_batched_tokens=16,
              warmup=False)  # fmt: skip
    runner = llm.engine.runner
    packed, layout = pack_inputs(runner.prepare(_WarmupBatch(runner.smallest_step)).inputs)
    lowered = runner._step.lower(runner.params, runner.kv_caches, {}, packed, runner._no_prev_tokens, layout=layout)
    memory = lowered.compile().memory_analysis()
    cache_bytes = sum(c.nbytes for c in runner.kv_caches)
    one_layer = cache_bytes // (2 * llm.engine.model_config.num_layers)  # K or V of one layer
    assert memory.alias_size_in_bytes >= cache_bytes
    assert memory.temp_size_in_bytes < one_layer, (memory.temp_size_in_bytes, one_layer)
