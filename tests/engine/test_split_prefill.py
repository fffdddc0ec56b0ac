"""Split prefill (EngineConfig.prefill_attention_impl, KernelPlan.split_prefill): a step whose last sequence is a
prefill chunk of a large bucket runs its attention as prefix + self, merged (here the jnp form of the split
that cuDNN runs on a GPU), a compiled variant of its own that the warm-up covers; tokens and logprobs stay
transformers' and PEFT's, chunks after a prefix and steps mixing the chunk with other sequences included."""

import numpy as np
import pytest

from jalora import LLM, SamplingParams
from jalora.errors import InvalidRequestError
from jalora.model import kernel_plan
from tests import hf_models
from tests.compile_events import COMPILES

INV = [7, 8]


def prompt_of(n: int, salt: int = 0) -> list[int]:
    rng = np.random.default_rng(n * 17 + salt)
    return [int(t) for t in rng.integers(9, hf_models.VOCAB - 1, size=n)]


# Steps of 256 rows (the engine's threshold is 2048: CPU-sized prompts chunk at 256 here)
ROWS = 256


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(kernel_plan, "SPLIT_PREFILL_MIN_ROWS", ROWS)
    base = tiny_models["granite"]
    adapter = hf_models.make_adapter(base, str(tmp_path_factory.mktemp("split") / "alora"), ["q_proj", "v_proj"],
                                     r=4, invocation=INV, seed=6)  # fmt: skip
    llm = LLM(base, num_kv_blocks=160, max_num_seqs=4, max_num_batched_tokens=ROWS,
              max_model_len=700, max_loras=2, max_lora_rank=4, warmup=False,
              prefill_attention_impl="reference")  # fmt: skip
    llm.load_adapter("judge", adapter)
    llm.engine.warmup_adapters(progress=False, with_base=True)
    oracles = {None: hf_models.load_oracle(base), "judge": hf_models.load_peft_oracle(base, adapter)}
    yield llm, oracles
    mp.undo()


def test_one_sequence_chunks_run_split_and_match_the_oracles(setup):
    llm, oracles = setup
    runner = llm.engine.runner
    assert runner.plan.prefill == "reference" and runner.split_prefill_buckets == [ROWS]
    # every bucket base-only and adapted, and the largest's split variant of each
    assert runner.num_step_variants == 2 * len(runner.buckets) + 2
    seen = []
    prepare = runner.prepare

    def spy(batch, *args, **kwargs):  # (rows, sequences, split?) of every step
        step = prepare(batch, *args, **kwargs)
        seen.append((batch.total_tokens, len(batch.requests), step.inputs.attn.split_prefill is not None))
        return step

    runner.prepare = spy
    compiles = len(COMPILES)
    try:
        params = SamplingParams(max_tokens=4, logprobs=0, ignore_eos=True)
        # a base prompt of 600: chunks of 256 (no prefix), 256 (after 256) and 88; an aLoRA judge invoked early,
        # so its first chunk is adapted from row 20 on
        cases = [(prompt_of(600), None), (prompt_of(20, 1) + INV + prompt_of(400, 2), "judge")]
        for ids, name in cases:
            (out,) = llm.generate([ids], params, name)
            hf_models.assert_matches_oracle(out, oracles[name], ids, 4, 20 if name else None, what=name)
        # two prompts at once: steps of both (the second's chunk last, split) and then steps of one's decode
        # row before the other's chunk (split)
        both = [prompt_of(300, 3), prompt_of(500, 4)]
        outs = llm.generate(both, params)
        assert [o.token_ids for o in outs] == [hf_models.oracle_run(oracles[None], ids, 4)[1] for ids in both]
    finally:
        runner.prepare = prepare
    assert len(COMPILES) == compiles, "a request compiled after the warm-up"
    assert seen.count((ROWS, 1, True)) >= 4  # 2 chunks of the base prompt, 2 of the judge's
    assert any(split and n > 1 for _, n, split in seen)  # the concurrent prompts' mixed steps
    assert all(not split for rows, n, split in seen if rows <= ROWS // 2)


def test_cudnn_needs_a_gpu_and_is_not_the_cpu_default(tiny_models):
    assert LLM(tiny_models["llama"], max_model_len=64, warmup=False).engine.runner.plan.prefill == "kernel"
    with pytest.raises(InvalidRequestError, match="prefill_attention_impl"):
        LLM(tiny_models["llama"], max_model_len=64, warmup=False, prefill_attention_impl="cudnn")
