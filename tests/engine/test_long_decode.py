"""Long-context decode (jalora/engine/model_runner.py, KernelPlan.long_decode): a decode step of the
smallest bucket whose sequences are few and long runs the GPU attention kernel's long-context grid, a
compiled variant of its own that the warm-up covers; a small step in which a sequence brings several rows
after a long context (a cached prompt's tail, an aLoRA judge's invocation) runs the long-chunk variant
(KernelPlan.long_chunk); tokens and logprobs stay PEFT's. The GPU kernel runs in interpret mode, with a
tuning whose long-context threshold is 48 keys."""

import dataclasses

import numpy as np
import pytest

from jalora import LLM, SamplingParams
from pallas_kernels.ragged_paged_attention import tuning as attention_tuning
from tests import hf_models
from tests.compile_events import COMPILES

INV = [7, 8]

# 4 splits (2 working past 4 programs) by default; the long rule: 8 splits for <= 4 programs (2 kv heads x
# 2 sequences), 2 past; from 48 keys on; the long-chunk variant in buckets of up to 32 rows
TUNING = attention_tuning.GpuAttentionTuning(split_rule=(4, ((4, 2),)), long_split_rule=(8, ((4, 6),)),
                                             long_context_keys=48, decode_block_k=16,
                                             long_chunk_max_rows=32, rope_q_in_kv_write=True)  # fmt: skip


def prompt_of(n: int, salt: int = 0) -> list[int]:
    rng = np.random.default_rng(n * 31 + salt)
    return [int(t) for t in rng.integers(9, hf_models.VOCAB - 1, size=n)]


# The fused engine merges the kv splits, writes K/V and rotates q with XLA's ops; the layer-groups engine with
# the one-launch kernels (the tuning's default; q rotated in the K/V write's launch, off by default) and adds +
# norms with the fused kernel too.
XLA_FORMS = dataclasses.replace(TUNING, combine_kernel=False, kv_write_kernel=False)


@pytest.fixture(scope="module", params=[0, 2], ids=["fused+xla", "layer-groups+kernels"])
def setup(tiny_models, tmp_path_factory, request):
    mp = pytest.MonkeyPatch()
    tuning = XLA_FORMS if request.param == 0 else TUNING
    mp.setattr(attention_tuning, "DEFAULT_GPU_ATTENTION_TUNING", tuning)  # (the CPU's entry)
    base = tiny_models["llama"]
    adapter = hf_models.make_adapter(base, str(tmp_path_factory.mktemp("long") / "alora"), ["q_proj", "v_proj"],
                                     r=4, invocation=INV, seed=4)  # fmt: skip
    llm = LLM(base, num_kv_blocks=48, max_num_seqs=16, max_num_batched_tokens=32, max_model_len=96, max_loras=2,
              max_lora_rank=4, warmup=False, attention_impl="gpu", kernel_interpret=True,
              layers_per_launch=request.param, norm_impl="gpu" if request.param else None)  # fmt: skip
    llm.load_adapter("judge", adapter)
    llm.engine.warmup_adapters(progress=False, with_base=True)
    oracles = {None: hf_models.load_oracle(base), "judge": hf_models.load_peft_oracle(base, adapter)}
    yield llm, oracles
    mp.undo()


def test_the_warmup_queues_its_longest_compilations_first(setup):
    """The warm-up's wave waits for its last compilation, and they begin in the order of `_warmup_steps`:
    the variants with their own attention kernels first (the long-context grid's, then the long-chunk ones:
    queued last, they ended an H100's warm-up waves), then the buckets from the largest, adapted before
    base-only, then the split-prefill variants."""
    llm, _ = setup
    runner = llm.engine.runner
    steps = runner._warmup_steps([None, llm.engine.adapters.stacks])
    seen = [(s.inputs.token_ids.shape[0], "adapted" if s.inputs.lora_slots is not None else "base",
             "long" if s.inputs.attn.long_context is not None else "chunk" if s.inputs.attn.long_chunk is not None
             else "") for _, s in steps]  # fmt: skip
    assert seen == [(16, "adapted", "long"), (16, "base", "long"), (16, "adapted", "chunk"), (16, "base", "chunk"),
                    (32, "adapted", ""), (32, "base", ""), (16, "adapted", ""), (16, "base", "")]  # fmt: skip
    # the warm-up's own variants, no more and no fewer (each compiled once: the count above)
    assert len(steps) == runner.num_step_variants
    assert [s.inputs.token_ids.shape[0] for _, s in runner._warmup_steps([None])] == [16, 16, 32, 16]


def test_long_decode_steps_run_their_variant_and_match_peft(setup):
    llm, oracles = setup
    runner = llm.engine.runner
    kernels = runner.layers_per_launch > 0  # the layer-groups engine runs the one-launch kernels
    assert runner.plan.attention_tuning == (TUNING if kernels else XLA_FORMS) and runner.long_decode
    assert runner.plan.norm == ("gpu" if kernels else "reference")
    assert runner.plan.kv_write_rotates_q == kernels
    # the warm-up compiled the smallest bucket's long variant and the long-chunk one of each bucket of at most
    # 16 rows (max_num_seqs: a decode-shaped step) for the base-only and the adapted step
    assert runner.long_chunk_buckets == [16] and runner.buckets == [16, 32]
    assert runner.num_step_variants == 2 * len(runner.buckets) + 2 + 2
    long_steps, chunk_steps = [], []
    prepare = runner.prepare

    def spy(batch, *args, **kwargs):  # which steps the runner gives the long-context grid
        step = prepare(batch, *args, **kwargs)
        attn = step.inputs.attn
        long_steps.append((batch.total_tokens, len(batch.requests), attn.long_context is not None))
        chunk_steps.append((batch.total_tokens, len(batch.requests), attn.long_chunk is not None))
        return step

    runner.prepare = spy
    compiles = len(COMPILES)
    try:
        cases = [(prompt_of(40), None), (prompt_of(38, 1) + INV, "judge")]
        params = SamplingParams(max_tokens=12, logprobs=0, ignore_eos=True)
        for ids, name in cases:  # one at a time: a lone decode from 41 to 52 keys (long from 48 on)
            (out,) = llm.generate([ids], params, name)
            activation = len(ids) - len(INV) if name else None
            hf_models.assert_matches_oracle(out, oracles[name], ids, 12, activation, what=name)
        # both together: 2 sequences x 2 kv heads = 4 programs, still long
        outs = llm.generate([ids for ids, _ in cases], params, [name for _, name in cases])
        assert [o.token_ids for o in outs] == [hf_models.oracle_run(oracles[n], ids, 12,
                                               len(ids) - len(INV) if n else None)[1] for ids, n in cases]  # fmt: skip
        # prompts whose first 48 tokens are cached: a tail of 8 runs as one 8-token step at 56 keys, in the
        # smallest bucket and past the threshold, but a prefill chunk (not the long grid), and one decode query
        # block holds it (16 rows / 2 query heads per kv head = 8 tokens: not the long chunk either); a tail of
        # 12 and an aLoRA judge's 12 rows after the same cached base prefix (invocation included) run the long
        # chunk, its query blocks of 16 tokens against decode's 8
        first = prompt_of(50, 7)
        llm.generate([first], SamplingParams(max_tokens=1))
        tails = [(first[:48] + prompt_of(n, 8), None) for n in (8, 12)]
        for ids, name in (*tails, (first[:48] + prompt_of(10, 10) + INV, "judge")):
            (out,) = llm.generate([ids], params, name)
            assert out.num_cached_tokens == 48, name
            activation = len(ids) - len(INV) if name else None
            hf_models.assert_matches_oracle(out, oracles[name], ids, 12, activation, what=name)
    finally:
        runner.prepare = prepare
    assert len(COMPILES) == compiles, "a request compiled after the warm-up"
    decodes = [(n, long) for tokens, n, long in long_steps if tokens == n]  # one token per sequence
    assert any(long for _, long in decodes) and any(not long for _, long in decodes)
    assert (8, 1, False) in long_steps  # the cached prompt's tail (it ran: the prefix cache hit)
    assert all(not long for tokens, n, long in long_steps if tokens > n)  # prefill steps never
    assert (8, 1, False) in chunk_steps and chunk_steps.count((12, 1, True)) == 2  # the cached tails, the judge
    assert all(not chunk for tokens, n, chunk in chunk_steps if tokens == n)  # decode steps never
    # the prompts from scratch (40 tokens: 32 rows, then 8 at 40 keys, below the threshold) never
    assert (32, 1, False) in chunk_steps and (8, 1, False) in chunk_steps


def test_many_or_short_sequences_keep_the_default_grid(setup):
    """3 sequences (6 programs): the long rule gives 2 splits, no more than the default, so no long step."""
    llm, _ = setup
    runner = llm.engine.runner
    assert not runner.plan.long_decode(3, 2, 90) and runner.plan.long_decode(2, 2, 48)
    assert not runner.plan.long_decode(1, 2, 47)
    off = dataclasses.replace(TUNING, long_split_rule=None)
    assert not dataclasses.replace(runner.plan, attention_tuning=off).long_decode(1, 2, 90)
    assert not dataclasses.replace(runner.plan, attention="reference").long_decode(1, 2, 90)


def test_a_sliding_window_bounds_the_context_that_counts(setup, tiny_models):
    """Mistral's window (24 keys) is all a query reads: below the 48-key threshold at any context length,
    so its engine never has a long-context variant."""
    llm, _ = setup
    assert llm.engine.runner.long_decode
    mistral = LLM(tiny_models["mistral"], num_kv_blocks=48, max_num_seqs=16, max_num_batched_tokens=32,
                  max_model_len=96, warmup=False, attention_impl="gpu", kernel_interpret=True)  # fmt: skip
    runner = mistral.engine.runner
    assert runner.cfg.sliding_window == 24 and not runner.long_decode
