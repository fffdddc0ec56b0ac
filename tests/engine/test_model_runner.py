"""The host side of a step: prepare() against a per-request oracle, the one-buffer transfer, block tables."""

import jax
import numpy as np
import pytest

from jalora import LLM, SamplingParams
from jalora.adapters.peft import ResolvedAdapter
from jalora.engine.model_runner import StepInputs, pack_inputs, unpack_inputs
from jalora.engine.request import BlockIds, Request
from jalora.engine.scheduler import ScheduledBatch


@pytest.fixture(scope="module")
def runner(tiny_models):
    llm = LLM(tiny_models["llama"], block_size=4, num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=32,
              max_model_len=48, warmup=False)  # fmt: skip
    return llm.engine.runner


def _request(rid, prompt, computed, outputs, blocks, slot=-1, activation=None, **params):
    adapter = ResolvedAdapter(slot, None if slot < 0 else b"id", activation)
    req = Request(rid, prompt, SamplingParams(**params), seed=2**32 - 1 - len(rid), adapter=adapter)
    req.output_token_ids = list(outputs)
    req.all_token_ids = list(prompt) + list(outputs)
    req.num_computed_tokens = computed
    req.block_ids = BlockIds(blocks)
    return req


def _oracle(runner, reqs, ns):
    """The step inputs one request at a time (the semantics prepare() vectorises)."""
    t, s, bs = runner.bucket(sum(ns)), runner.max_num_seqs, runner.block_size
    want = {k: np.full(t, v, np.int32) for k, v in (("token_ids", 0), ("positions", 0), ("slot_mapping", -1),
                                                    ("token_slots", -1), ("prompt_targets", -1))}  # fmt: skip
    pages = np.zeros((s, runner.max_pages), np.int32)
    kv_lens, logits_idx, counters = np.zeros(s, np.int32), np.zeros(s, np.int32), np.zeros(s, np.int32)
    off = 0
    for i, (r, n) in enumerate(zip(reqs, ns)):
        pages[i, : len(r.block_ids)] = r.block_ids
        for j in range(n):
            p = r.num_computed_tokens + j
            want["token_ids"][off + j] = r.all_token_ids[p]
            want["positions"][off + j] = p
            want["slot_mapping"][off + j] = r.block_ids[p // bs] * bs + p % bs
            if r.adapter_slot >= 0 and p >= r.activation_start:
                want["token_slots"][off + j] = r.adapter_slot
            if r.params.prompt_logprobs and p + 1 < len(r.prompt_token_ids):
                want["prompt_targets"][off + j] = r.prompt_token_ids[p + 1]
        kv_lens[i] = r.num_computed_tokens + n
        logits_idx[i] = off + n - 1
        counters[i] = len(r.output_token_ids)
        off += n
    return want, pages, kv_lens, logits_idx, counters


def test_prepare_matches_the_per_request_oracle(runner):
    reqs = [
        _request("decode", [5, 6, 7, 8, 9], 6, [11, 12], [3, 9]),  # one decode token at position 6
        _request("alora-chunk", list(range(20, 33)), 4, [], [7, 1, 4, 8], slot=2, activation=9,
                 prompt_logprobs=True),  # chunk 4..12: activation inside it, prompt logprobs  # fmt: skip
        _request("lora-recompute", [40, 41, 42], 0, [43, 44, 45], [12, 13], slot=0, activation=0,
                 temperature=0.7, top_k=5, top_p=0.9),  # recomputes prompt + outputs after a preemption  # fmt: skip
    ]
    ns = [1, 9, 6]
    step = runner.prepare(ScheduledBatch(reqs, ns, []))
    inp = step.inputs
    want, pages, kv_lens, logits_idx, counters = _oracle(runner, reqs, ns)
    np.testing.assert_array_equal(inp.token_ids, want["token_ids"])
    np.testing.assert_array_equal(inp.positions, want["positions"])
    np.testing.assert_array_equal(inp.attn.slot_mapping, want["slot_mapping"])
    np.testing.assert_array_equal(inp.lora_slots, want["token_slots"])
    np.testing.assert_array_equal(inp.prompt_targets, want["prompt_targets"])
    np.testing.assert_array_equal(inp.attn.page_indices, pages)
    np.testing.assert_array_equal(inp.attn.kv_lens, kv_lens)
    np.testing.assert_array_equal(inp.attn.cu_q_lens, [0, 1, 10, 16, 16])
    np.testing.assert_array_equal(inp.logits_indices, logits_idx)
    np.testing.assert_array_equal(inp.counters, counters)
    np.testing.assert_array_equal(inp.seeds[:3], [r.seed for r in reqs])
    np.testing.assert_allclose(inp.temperature[:3], [0.0, 0.0, 0.7])
    assert (step.do_sample, step.want_logprobs, step.want_prompt_lp) == (True, False, True)

    reqs[0].block_ids = BlockIds([3])  # position 6 needs a second block of 4 tokens
    with pytest.raises(RuntimeError, match="no cache block"):
        runner.prepare(ScheduledBatch(reqs[:1], [1], []))


def test_packed_inputs_cross_bit_for_bit(runner):
    reqs = [_request("a", [1, 2, 3], 0, [], [5], slot=1, activation=1, temperature=1.0)]
    inp = runner.prepare(ScheduledBatch(reqs, [3], [])).inputs
    inp = inp._replace(
        seeds=np.array([2**32 - 1, 2**31, 0, 7], np.uint32),
        temperature=np.array([-0.0, np.inf, 1e-30, np.nan], np.float32),
    )
    packed, layout = pack_inputs(inp)
    assert packed.dtype == np.int32 and packed.ndim == 1
    hash(layout)  # a static argument of the jitted step
    for out in (unpack_inputs(packed, layout), jax.jit(unpack_inputs, static_argnums=1)(packed, layout)):
        assert isinstance(out, StepInputs)
        for got, ref in zip(jax.tree.leaves(out), jax.tree.leaves(inp)):
            ref = np.asarray(ref)
            assert np.asarray(got).dtype == ref.dtype
            np.testing.assert_array_equal(np.asarray(got).view(np.int32), ref.view(np.int32))


def test_block_ids_array_follows_the_list():
    ids = BlockIds([4, 2])
    np.testing.assert_array_equal(ids.as_array(), [4, 2])
    ids.extend([9, 1])
    np.testing.assert_array_equal(ids.as_array(), [4, 2, 9, 1])
    assert ids.as_array() is ids.as_array()  # cached while the list does not change
    ids.pop()
    np.testing.assert_array_equal(ids.as_array(), [4, 2, 9])
