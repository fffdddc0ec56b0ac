"""After the warm-up no request compiles: greedy or sampled, top-n logprobs and prompt logprobs are
runtime choices of the warmed step (jalora/engine/model_runner.py), with and without an adapter. A
compilation on first use would run on the engine thread while every other stream waits."""

import pytest
from jax import monitoring

from jalora import LLM, SamplingParams
from tests import hf_models

INV = [7, 8]
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
COMPILES: list[str] = []  # every XLA compilation of this process from here on


def _count(name: str, *_args, **_kwargs) -> None:
    if name == _BACKEND_COMPILE:
        COMPILES.append(name)


monitoring.register_event_duration_secs_listener(_count)

KINDS = {
    "greedy": {},
    "sampled": {"temperature": 0.9, "top_k": 20, "top_p": 0.8, "seed": 3},
    "min_p": {"temperature": 1.0, "min_p": 0.05},
    "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.2},
    "sampled penalties": {"temperature": 0.8, "repetition_penalty": 0.9, "logit_bias": {3: 2.0}},
    "allowed tokens": {"allowed_token_ids": [3, 4, 5]},
    "logit bias": {"logit_bias": {3: 2.0}},  # (greedy, yet drawn: the draw adds the bias)
    "sampled logit bias": {"temperature": 0.8, "logit_bias": {3: -1.5, 4: 2.0}},
    "min_tokens": {"min_tokens": 2, "stop_token_ids": [3]},  # (greedy, yet drawn: stop ids banned)
    "temperature only": {"temperature": 1.3},
    "logprobs": {"logprobs": 5},
    "sampled logprobs": {"temperature": 0.7, "logprobs": 0},
    "prompt logprobs": {"prompt_logprobs": True},
    "everything": {"temperature": 0.7, "top_p": 0.9, "logprobs": 3, "prompt_logprobs": True},
}


@pytest.fixture(scope="module")
def llm(tiny_models, tmp_path_factory):
    base = tiny_models["llama"]
    path = hf_models.make_adapter(
        base, str(tmp_path_factory.mktemp("warm") / "alora"), ["q_proj", "v_proj", "down_proj"], r=4,
        invocation=INV, seed=1,
    )  # fmt: skip
    llm = LLM(base, num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, max_loras=2,
              max_lora_rank=4, warmup=True, host_kv_cache_gb=0.01)  # fmt: skip
    llm.load_adapter("judge", path)
    llm.engine.warmup_adapters(progress=False)
    return llm


def test_each_bucket_has_one_step_per_adapter_path(llm):
    """No request flag picks a compiled variant of the step: base-only and adapted, once per bucket."""
    runner = llm.engine.runner
    for fields in KINDS.values():
        llm.generate([[3, 4, 5]], SamplingParams(max_tokens=2, **fields))
        llm.generate([[3, 4, 5, *INV]], SamplingParams(max_tokens=2, **fields), "judge")
    assert len(runner._step) == 2 * len(runner.buckets)
    # The draw, top-n and prompt logprobs compiled with the steps (from their output shapes), not after
    # the steps ran: a compile then would be one more wave to wait for.
    assert [p["functions_compiled_late"] for p in runner.warmup_phases] == [0, 0]
    # every compilation is logged with its variant: each bucket's base-only and adapted step
    log = runner.compile_log()
    assert len(log) == sum(f.compiled for f in runner._executables()) and log == sorted(log, key=lambda x: -x[1])
    labels = [what for what, *_ in log]
    for b in runner.buckets:
        assert labels.count(f"step T={b}") == 1 and labels.count(f"step T={b} adapted down+qkv") == 1, b


@pytest.mark.parametrize("adapter", [None, "judge"])
def test_no_request_compiles_after_warmup(llm, adapter):
    compiles = len(COMPILES)
    suffix = INV if adapter else []
    # a lone request (prefill in the 16-row step, decode in the smallest), a prompt that fills the
    # 32-row step, and a batch mixing every kind in the same steps
    lone, long = [3, 4, 5, 6] + suffix, list(range(10, 38)) + suffix
    for fields in KINDS.values():
        llm.generate([lone], SamplingParams(max_tokens=3, ignore_eos=True, **fields), adapter)
        llm.generate([long], SamplingParams(max_tokens=2, ignore_eos=True, **fields), adapter)
    mixed = [SamplingParams(max_tokens=4, ignore_eos=True, **fields) for fields in KINDS.values()][:4]
    llm.generate([[20 + i, 21, 22] + suffix for i in range(4)], mixed, [adapter] * 4)
    assert len(COMPILES) == compiles, "a request compiled after the warm-up"


def test_host_tier_copies_compile_in_the_warmup(llm):
    """Blocks evicted to the host tier and copied back (runs of several sizes) compile nothing."""
    compiles, hits = len(COMPILES), llm.engine.stats().host_kv_cache_hits
    prompts = [[i, i] + list(range(10, 25 + 16 * (i % 3))) for i in range(12, 60)]  # 1 to 3 full blocks each
    for _ in range(2):  # 96 blocks: the 64-block cache overflows; the second pass hits the host
        llm.generate(prompts, SamplingParams(max_tokens=1))
    assert llm.engine.stats().host_kv_cache_hits > hits
    assert len(COMPILES) == compiles, "a host-tier copy compiled after the warm-up"


def test_a_server_with_start_up_adapters_warms_both_paths_at_once(tiny_models, tmp_path):
    """`jalora serve --adapter ...` builds its engine without a warm-up, loads the adapters, then
    compiles the base-only and adapted variants together (one wait for the longest compilation):
    every bucket's two variants, counted as the warm-up's, and no request compiles after it."""
    from server import cli

    base = tiny_models["llama"]
    path = hf_models.make_adapter(base, str(tmp_path / "alora"), ["q_proj", "v_proj"], r=4, invocation=INV, seed=2)
    args = cli.build_parser().parse_args([
        "serve", "--model", base, "--num-kv-blocks", "64", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
        "--max-model-len", "64", "--max-loras", "2", "--max-lora-rank", "4", "--adapter", f"judge={path}",
    ])  # fmt: skip
    engine = cli.build_engine(cli.serve_plan(args))
    runner = engine.runner
    stats = engine.stats()
    assert len(runner._step) == 2 * len(runner.buckets) == stats.warmup_compilations
    assert stats.compilations == 0
    compiles = len(COMPILES)
    for i, (adapter, suffix) in enumerate(((None, []), ("judge", INV))):
        engine.add_request(f"short{i}", [3, 4, 5, 6] + suffix, SamplingParams(max_tokens=3), adapter)
        engine.add_request(f"long{i}", list(range(10, 38)) + suffix, SamplingParams(max_tokens=3), adapter)
        finished = set()
        while engine.has_unfinished_requests():
            finished |= {d.request_id for d in engine.step() if d.finished}
        assert finished == {f"short{i}", f"long{i}"}
    assert len(COMPILES) == compiles, "a request compiled after the warm-up"
    assert engine.stats().compilations == 0
