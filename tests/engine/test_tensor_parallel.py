"""Tensor parallelism on 8 CPU devices (tests/conftest.py forces them): for tp = 2, 4 and 8 the engine
gives the single-device engine's greedy tokens, logprobs and prompt logprobs (float32, within 1e-4), with
an aLoRA adapter on every projection and a LoRA, base-aligned prefix reuse and preemption in the same
workload. The models have 8 query heads and 2 KV heads, so tp 4 and 8 replicate KV heads (GQA), and a
97-token vocabulary, which no tp divides (the padded vocabulary rows must never win)."""

import re

import jax
import numpy as np
import pytest

from jalora import LLM, SamplingParams
from jalora.errors import InvalidRequestError
from tests import hf_models

HEADS = dict(num_attention_heads=8, num_key_value_heads=2)
INV = [7, 8, 9]
ENGINE = dict(block_size=4, num_kv_blocks=14, max_num_seqs=4, max_num_batched_tokens=16, max_loras=2,
              max_lora_rank=8, warmup=False)  # fmt: skip
SP = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2)
SP_PROMPT = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2, prompt_logprobs=True)  # reads no cache


def prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(13, hf_models.VOCAB - 1, size=n).tolist()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: (model dir, aLoRA dir, LoRA dir)}."""
    root = tmp_path_factory.mktemp("tp")
    out = {}
    for family in hf_models.FAMILIES:
        base = hf_models.make_model(str(root / family), family, **HEADS)
        alora = hf_models.make_adapter(base, str(root / f"{family}-alora"), hf_models.ALL_PROJ, r=8, alpha=8,
                                       invocation=INV, seed=2, use_rslora=True)  # fmt: skip
        lora = hf_models.make_adapter(base, str(root / f"{family}-lora"), ["q_proj", "v_proj"], r=4, seed=3)
        out[family] = (base, alora, lora)
    return out


def run_workload(model_dir: str, alora: str, lora: str, tp: int):
    """(outputs, preemptions, llm): four base requests that overflow the cache, a question, then an aLoRA
    judge of its answer (its prefix cached by the base), a LoRA request and the question again."""
    llm = LLM(model_dir, tensor_parallel_size=tp, **ENGINE)
    llm.load_adapter("judge", alora)
    llm.load_adapter("lora", lora)
    first = llm.generate([prompt(i, 10 + i) for i in range(4)], SP_PROMPT)
    question = prompt(8, 12)
    answer = llm.generate([question], SP)
    judge = question + answer[0].token_ids + INV
    second = llm.generate([judge, prompt(9, 7), question], SP, adapter=["judge", "lora", None])
    return first + answer + second, llm.engine.stats().num_preemptions, llm


_single: dict[str, tuple] = {}


def single_device(models, family):
    if family not in _single:
        _single[family] = run_workload(*models[family], tp=1)[:2]
    return _single[family]


def assert_same(got, want):
    assert got.token_ids == want.token_ids
    assert got.num_cached_tokens == want.num_cached_tokens
    if want.prompt_logprobs is not None:
        np.testing.assert_allclose(got.prompt_logprobs[1:], want.prompt_logprobs[1:], atol=1e-4)
    for g, w in zip(got.logprobs, want.logprobs, strict=True):
        assert g.keys() == w.keys()
        np.testing.assert_allclose(list(g.values()), [w[k] for k in g], atol=1e-4)


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_tensor_parallel_matches_one_device(models, family, tp):
    want, want_preemptions = single_device(models, family)
    got, preemptions, llm = run_workload(*models[family], tp=tp)
    assert want_preemptions > 0, "the workload was meant to overflow the cache"
    assert preemptions == want_preemptions
    assert want[5].num_cached_tokens >= 16, "the judge was meant to reuse the base model's blocks"
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)
    if family == "llama" and tp == 8:  # every device holds its own shard, not a copy
        runner = llm.engine.runner
        k_cache = runner.kv_caches[0][0]
        assert {s.data.shape[2] for s in k_cache.addressable_shards} == {1}  # one KV head per device
        assert len(k_cache.sharding.device_set) == 8
        stack = llm.engine.adapters.stacks["qkv"]
        assert {s.data.shape[-1] for s in stack.b.addressable_shards} == {3 * 8}  # one q, k and v head of 8 dims
        assert {s.data.shape[2] for s in llm.engine.adapters.stacks["down"].a.addressable_shards} == {96 // 8}


def test_bad_tensor_parallel_sizes_fail_before_the_weights_load(tiny_models, monkeypatch):
    import jalora.engine.llm_engine as llm_engine

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were read before the configuration was checked")

    monkeypatch.setattr(llm_engine, "load_model", no_load)
    for tp, says in ((3, "does not divide the model's 4 attention heads"), (16, "sees 8 device(s)")):
        with pytest.raises(InvalidRequestError, match=re.escape(says)) as e:
            LLM(tiny_models["llama"], tensor_parallel_size=tp, **ENGINE)
        assert e.value.field == "tensor_parallel_size"
    with pytest.raises(InvalidRequestError) as e:
        LLM(tiny_models["llama"], tensor_parallel_size=0, **ENGINE)
    assert e.value.field == "tensor_parallel_size"
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
def test_pallas_kernels_run_per_shard(models, tiny_models, tmp_path, impl):
    """The Pallas attention and masked-LoRA kernels (interpret mode) inside the sharded step: the same
    tokens and logprobs as the single-device reference path. A prefill long enough for the segment
    kernel, an aLoRA judge and decode steps (the one-hot form on GPU-sized steps). The GPU attention
    kernel needs head_dim >= 16: the 4-head model. (Each device's fused q/k/v columns are [q | k | v], as
    the GPU K/V write kernel reads them.)"""
    base, alora, _ = models["llama"]
    if impl == "gpu":
        base = tiny_models["llama"]
        alora = hf_models.make_adapter(base, str(tmp_path / "alora"), hf_models.ALL_PROJ, r=8, invocation=INV, seed=2)
    kernels = dict(attention_impl=impl, lora_impl=impl, kernel_interpret=True)
    if impl == "gpu":  # also the fused add + RMSNorm; the K/V write and split merge kernels are the defaults
        kernels["norm_impl"] = "gpu"
    question = prompt(8, 14)
    outs = []
    for tp, extra in ((1, {}), (2, kernels)):
        llm = LLM(base, tensor_parallel_size=tp, **{**ENGINE, **extra})
        llm.load_adapter("judge", alora)
        (answer,) = llm.generate([question], SP)
        (verdict,) = llm.generate([question + answer.token_ids + INV], SP, adapter="judge")
        outs.append((answer, verdict))
    for got, want in zip(outs[1], outs[0]):
        assert_same(got, want)
    assert outs[1][1].num_cached_tokens > 0


def test_tensor_parallel_warmup_covers_every_variant(models):
    """tp 2: the warm-up compiles the sharded steps (base-only and adapted) and the functions behind them in
    one wave, from the shapes and shardings the steps return; then no request compiles, whatever it asks
    for (sampling, top-n and prompt logprobs)."""
    from jax import monitoring

    base, alora, _ = models["llama"]
    llm = LLM(base, tensor_parallel_size=2, **dict(ENGINE, warmup=False))
    llm.load_adapter("judge", alora)
    llm.engine.warmup_adapters(progress=False, with_base=True)
    runner = llm.engine.runner
    assert [p["functions_compiled_late"] for p in runner.warmup_phases] == [0]
    compiles = []
    monitoring.register_event_duration_secs_listener(
        lambda name, *_a, **_k: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
    )
    sampled = SamplingParams(max_tokens=3, temperature=0.8, top_p=0.9, seed=1, logprobs=2, prompt_logprobs=True)
    llm.generate([prompt(20, 9), prompt(21, 5) + INV], [SP_PROMPT, sampled], [None, "judge"])
    assert compiles == [], "a request compiled after the warm-up"
