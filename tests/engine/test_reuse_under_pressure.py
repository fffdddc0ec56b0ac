"""Issue 18's three mechanisms together: pipeline sessions, the host-memory KV tier and more adapters than
device slots change where KV and adapter weights live, never what a request computes. Oracle: an engine with
all three off (every adapter resident, no tier, no sessions) on the same random pipelines."""

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jalora import LLM, SamplingParams
from tests import hf_models

INV = {"judge_a": [7, 8, 9], "judge_b": [10, 11]}
BS = 4
COMMON = dict(block_size=BS, num_kv_blocks=24, max_num_seqs=4, max_num_batched_tokens=16, max_lora_rank=8,
              warmup=False)  # fmt: skip
HOST_GB = 64 * (2 * 2 * BS * 2 * 16 * 4) / 2**30  # 64 blocks of the tiny llama's KV


def ctx(n: int, seed: int) -> list[int]:
    """n random tokens without either invocation (ids 13..95)."""
    return np.random.default_rng(seed).integers(13, hf_models.VOCAB - 1, size=n).tolist()


@pytest.fixture(scope="module")
def engines(tiny_models, tmp_path_factory):
    base = tiny_models["llama"]
    root = tmp_path_factory.mktemp("pressure")
    paths = {
        "judge_a": hf_models.make_adapter(base, str(root / "a"), ["q_proj", "k_proj", "v_proj"], r=8,
                                          invocation=INV["judge_a"], seed=11),
        "judge_b": hf_models.make_adapter(base, str(root / "b"), ["q_proj", "v_proj"], r=4,
                                          invocation=INV["judge_b"], seed=12),
        "lora": hf_models.make_adapter(base, str(root / "l"), ["q_proj", "v_proj"], r=4, seed=13),
    }  # fmt: skip
    on = LLM(base, max_loras=1, max_cpu_loras=3, host_kv_cache_gb=HOST_GB, session_cache_share=0.5, **COMMON)
    off = LLM(base, max_loras=3, session_cache_share=0.0, **COMMON)
    for llm in (on, off):
        for name, path in paths.items():
            llm.load_adapter(name, path)
    return on.engine, off.engine


PARAMS = lambda n: SamplingParams(max_tokens=n, logprobs=0, ignore_eos=True)  # noqa: E731


def run(engine, pipelines, sessions: bool) -> dict[str, tuple[list[int], list[float]]]:
    """Every pipeline at once: a base answer (or a plain LoRA answer), then its judge reads prompt + answer +
    the judge's invocation, in the pipeline's session when `sessions`."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for i, (prompt, lora, _, base_n, _) in enumerate(pipelines):
        kw = dict(session=f"s{i}", session_ttl=60) if sessions else {}
        engine.add_request(f"b{i}", prompt, PARAMS(base_n), "lora" if lora else None, **kw)
    while engine.has_unfinished_requests():
        for d in engine.step():
            toks, lps = out.setdefault(d.request_id, ([], []))
            toks.extend(d.token_ids)
            lps.extend(lp[t] for lp, t in zip(d.logprobs, d.token_ids))
            if d.is_final and d.request_id.startswith("b"):
                i = int(d.request_id[1:])
                prompt, _, judge, _, judge_n = pipelines[i]
                kw = dict(session=f"s{i}", end_session=True) if sessions else {}
                ids = prompt + out[d.request_id][0] + INV[judge]
                engine.add_request(f"j{i}", ids, PARAMS(judge_n), judge, **kw)
    return out


# Five pipelines of 12-token contexts, plain LoRA and base answers, both judges: on fresh engines (an explicit
# example runs before the generated ones) this one swaps adapters, evicts sessions, and sends blocks to the host
# tier and takes them back, every time (a deterministic workload on a deterministic engine).
PRESSURE = [(0, 12, True, "judge_a", 5, 3), (1, 12, False, "judge_b", 5, 3), (2, 12, True, "judge_b", 5, 3),
            (0, 12, False, "judge_a", 5, 3), (1, 12, True, "judge_a", 5, 3)]  # fmt: skip
MECHANISMS = ("adapter_swaps", "sessions_evicted", "host_kv_cache_bytes_to_host", "host_kv_cache_hits")


# A pipeline's session retains at most 11 blocks (a 15-token prompt + 5 answered as a plain LoRA: 5 blocks its
# judge cannot reuse; the judge's 20 + 3 + 3 tokens: 6 more), within the 12 of session_cache_share 0.5; five
# pipelines at once need more than the 24 blocks, so sessions are evicted and blocks go to the host.
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2),  # which shared context
            st.integers(1, 12),  # its length
            st.booleans(),  # the first call is a plain LoRA, not the base model
            st.sampled_from(sorted(INV)),  # the judge
            st.integers(1, 5),  # answer tokens
            st.integers(1, 3),  # judge tokens
        ),
        min_size=2,
        max_size=5,
    )
)
@example(PRESSURE)
def test_outputs_identical_with_sessions_host_tier_and_swapping(engines, workload):
    on, off = engines
    before = on.stats()
    pipelines = [(ctx(n, 300 + shared) + ctx(3, 400 + i), lora, judge, bn, jn)
                 for i, (shared, n, lora, judge, bn, jn) in enumerate(workload)]  # fmt: skip
    for _ in range(2):  # the second round finds what the first left on the device, the host or a slot
        want = run(off, pipelines, sessions=False)
        got = run(on, pipelines, sessions=True)
        assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
        for k, (_, lps) in got.items():
            assert np.max(np.abs(np.asarray(lps) - np.asarray(want[k][1]))) <= 1e-4, k
    stats = on.stats()
    assert stats.num_sessions == 0 and stats.num_retained_blocks == 0  # every judge ended its session
    assert on.num_free_blocks() == on.num_total_blocks and off.num_free_blocks() == off.num_total_blocks
    if workload == PRESSURE:  # (so the comparison above covered every mechanism)
        assert all(getattr(stats, k) > getattr(before, k) for k in MECHANISMS), (before, stats)
