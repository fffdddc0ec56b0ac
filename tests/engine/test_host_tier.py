"""The host-memory KV tier (jalora/engine/host_tier.py): blocks evicted from a tiny device cache come back
from host RAM with the KV they had. Oracles: transformers + PEFT (the KV brought back gives PEFT's tokens
and logprobs), the same engine without the tier (same outputs over random workloads), and for the tier's
bookkeeping a numpy stand-in for the device."""

import math
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jalora import LLM, InvalidRequestError, SamplingParams
from jalora.engine.host_tier import HostKVTier
from server.metrics import ServerMetrics
from tests import hf_models

INV = [7, 8, 9]
BS = 4
# 12 blocks of 4 tokens: two 40-token prompts push everything else out.
ENGINE = dict(block_size=BS, num_kv_blocks=12, max_num_seqs=4, max_num_batched_tokens=16, max_loras=3,
              max_lora_rank=8, warmup=False)  # fmt: skip
BLOCK_BYTES = 2 * 2 * BS * 2 * 16 * 4  # layers x (K, V) x tokens x KV heads x head_dim x float32
HOST_GB = 64 * BLOCK_BYTES / 2**30  # 64 blocks of host RAM
GEN = SamplingParams(max_tokens=6, logprobs=0, ignore_eos=True)


def ctx(n: int, seed: int) -> list[int]:
    """n random tokens without the invocation (ids 13..95)."""
    return np.random.default_rng(seed).integers(13, hf_models.VOCAB - 1, size=n).tolist()


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    base = tiny_models["llama"]
    root = tmp_path_factory.mktemp("host-tier")
    paths = {
        "judge": hf_models.make_adapter(base, str(root / "judge"), ["q_proj", "k_proj", "v_proj"], r=8,
                                        invocation=INV, seed=1),
        "lora": hf_models.make_adapter(base, str(root / "lora"), ["q_proj", "v_proj"], r=4, seed=3),
    }  # fmt: skip
    engines = []
    for gb in (HOST_GB, 0):
        llm = LLM(base, host_kv_cache_gb=gb, **ENGINE)
        for name, path in paths.items():
            llm.load_adapter(name, path)
        engines.append(llm)
    return base, root, engines[0], engines[1]


def evict_everything(llm) -> None:
    """Two 40-token prompts: every block cached before them is overwritten on the device."""
    for seed in (900, 901):
        llm.generate([ctx(40, seed + 17 * llm.engine.stats().prompt_tokens)], SamplingParams(max_tokens=2))


def check_peft(out, model, ids, activation):
    hf_models.assert_matches_oracle(out, model, ids, GEN.max_tokens, activation)


def test_evicted_prefix_comes_back_from_host(setup):
    base, _, llm, _ = setup
    prompt = ctx(24, 1)
    llm.generate([prompt], GEN)
    evict_everything(llm)
    before = llm.engine.stats()
    assert before.host_kv_cache_blocks > 0 and before.host_kv_cache_bytes_to_host > 0
    again = prompt + ctx(5, 2)
    (out,) = llm.generate([again], GEN)
    after = llm.engine.stats()
    assert out.num_cached_tokens == 24  # the whole prefix, although the device had none of it
    assert after.host_kv_cache_hits - before.host_kv_cache_hits == 24
    assert after.host_kv_cache_bytes_to_device - before.host_kv_cache_bytes_to_device == 6 * BLOCK_BYTES
    check_peft(out, hf_models.load_oracle(base), again, None)
    assert llm.engine.num_free_blocks() == llm.engine.num_total_blocks
    metrics = ServerMetrics()  # what a server's metrics endpoint reports of these counters
    metrics.observe(after, [], 0.0)
    sample = metrics.registry.get_sample_value
    assert sample("jalora:host_kv_cache_hits_total") == after.host_kv_cache_hits
    assert sample("jalora:host_kv_cache_bytes_total", {"direction": "to_device"}) == after.host_kv_cache_bytes_to_device
    assert sample("jalora:host_kv_cache_blocks") == after.host_kv_cache_blocks
    assert sample("jalora:host_kv_cache_capacity_blocks") == 64


def test_alora_judge_reuses_base_blocks_through_host(setup):
    """Base answers, its blocks go to host RAM, the aLoRA judge gets them back: PEFT's logprobs."""
    base, root, llm, _ = setup
    question = ctx(20, 3)
    (answer,) = llm.generate([question], SamplingParams(max_tokens=8, ignore_eos=True))
    evict_everything(llm)
    judge = question + answer.token_ids + INV  # a = 28, but the base computed 27 tokens (6 full blocks)
    hits = llm.engine.stats().host_kv_cache_hits
    (out,) = llm.generate([judge], GEN, adapter="judge")
    assert out.num_cached_tokens == 24
    assert llm.engine.stats().host_kv_cache_hits - hits == 24
    check_peft(out, hf_models.load_peft_oracle(base, str(root / "judge")), judge, 28)


def test_reloaded_adapter_never_hits_its_predecessors_blocks(setup):
    """Adapter-keyed blocks in the host tier, the adapter reloaded with other weights under its name:
    only the base-keyed block before the activation is reused (the hash binds the adapter's content)."""
    base, root, llm, _ = setup
    old = hf_models.make_adapter(base, str(root / "old"), ["q_proj", "v_proj"], invocation=INV, seed=41)
    new = hf_models.make_adapter(base, str(root / "new"), ["q_proj", "v_proj"], invocation=INV, seed=42)
    prompt = ctx(4, 51) + INV + ctx(20, 52)  # a = 4: block 0 is base KV, blocks 1.. adapter-keyed
    llm.load_adapter("swap", old)
    llm.generate([prompt], GEN, adapter="swap")
    evict_everything(llm)
    hits = llm.engine.stats().host_kv_cache_hits
    (again,) = llm.generate([prompt], GEN, adapter="swap")
    assert again.num_cached_tokens == (len(prompt) - 1) // BS * BS  # its own blocks, from host RAM
    assert llm.engine.stats().host_kv_cache_hits - hits == again.num_cached_tokens
    evict_everything(llm)
    llm.unload_adapter("swap")
    llm.load_adapter("swap", new)
    (after,) = llm.generate([prompt], GEN, adapter="swap")
    assert after.num_cached_tokens == BS
    check_peft(after, hf_models.load_peft_oracle(base, new), prompt, 4)
    llm.unload_adapter("swap")


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.sampled_from([None, "judge", "lora"]),
            st.integers(0, 2),  # which shared context
            st.integers(1, 30),  # its length
            st.integers(0, 6),  # private suffix length
        ),
        min_size=2,
        max_size=6,
    )
)
def test_outputs_with_the_tier_are_those_without(setup, stream):
    _, _, on, off = setup
    prompts, adapters = [], []
    for adapter, shared, n, extra in stream:
        prompts.append(ctx(n, 1000 + shared) + ctx(extra, 2000 + n) + (INV if adapter == "judge" else []))
        adapters.append(adapter)
    for _ in range(2):  # the second round finds what the first left on the device or the host
        got = on.generate(prompts, GEN, adapter=adapters)
        want = off.generate(prompts, GEN, adapter=adapters)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        for g, w in zip(got, want):
            lps = [(a[t], b[t]) for a, b, t in zip(g.logprobs, w.logprobs, g.token_ids)]
            assert max(abs(a - b) for a, b in lps) <= 1e-4
    assert on.engine.num_free_blocks() == on.engine.num_total_blocks


def test_failed_copy_back_recomputes_and_leaks_nothing(setup, monkeypatch):
    base, _, llm, _ = setup
    prompt = ctx(24, 61)
    llm.generate([prompt], GEN)
    evict_everything(llm)
    runner = llm.engine.runner

    def broken(blocks, data):
        raise RuntimeError("copy failed")

    monkeypatch.setattr(runner, "scatter_kv_blocks", broken)
    with pytest.raises(RuntimeError, match="copy failed"):
        llm.generate([prompt + [20]], GEN)
    monkeypatch.undo()
    assert llm.engine.num_free_blocks() == llm.engine.num_total_blocks
    assert llm.engine.stats().host_kv_cache_blocks == 0  # the tier was reset with the prefix cache
    (out,) = llm.generate([prompt + [20]], GEN)
    assert out.num_cached_tokens == 0
    check_peft(out, hf_models.load_oracle(base), prompt + [20], None)


def test_a_request_runs_only_once_its_copy_back_is_written(setup, monkeypatch):
    """The copy back runs on the tier's thread (held here until the test lets it go): meanwhile the
    request that needs it is admitted but not run while another one runs; aborted, it leaks nothing once
    the copy lands, and the blocks written then serve the next request (PEFT's tokens)."""
    base, _, llm, off = setup
    prompt = ctx(24, 81)
    llm.generate([prompt], GEN)
    evict_everything(llm)
    engine, runner = llm.engine, llm.engine.runner
    gate, put = threading.Event(), runner.put_kv_blocks
    monkeypatch.setattr(runner, "put_kv_blocks", lambda data: (gate.wait(), put(data))[1])
    other = ctx(8, 82)
    engine.add_request("other", other, GEN)
    engine.add_request("waits", prompt + [20], GEN)
    waits = engine.requests["waits"]
    tokens = []
    for _ in range(4):  # "other" runs its prompt and three tokens
        tokens += [t for d in engine.step() if d.request_id == "other" for t in d.token_ids]
        assert engine.block_manager.is_loading(waits) and waits.num_computed_tokens == 24
    engine.abort_request("waits")
    gate.set()
    while engine.has_unfinished_requests():
        tokens += [t for d in engine.step() if d.request_id == "other" for t in d.token_ids]
    monkeypatch.undo()
    assert tokens == off.generate([other], GEN)[0].token_ids
    assert engine.num_free_blocks() == engine.num_total_blocks and not engine.host_tier.loading
    (out,) = llm.generate([prompt + [20]], GEN)
    assert out.num_cached_tokens == 24
    check_peft(out, hf_models.load_oracle(base), prompt + [20], None)


def test_an_abort_while_a_copy_back_is_on_its_way_leaves_the_engine_to_the_next_generate(setup, monkeypatch):
    """`LLM.generate` aborting its requests (a failure, a KeyboardInterrupt) while one waits for its copy
    back and a step is in flight: the abort lets the copy land (the engine waits for it once nothing else
    runs: only then does the test let the copy go), so nothing is left unfinished, parked or held."""
    _, _, llm, off = setup
    prompt = ctx(24, 181)
    llm.generate([prompt], GEN)
    evict_everything(llm)
    engine, runner, tier = llm.engine, llm.engine.runner, llm.engine.host_tier
    gate, put, land = threading.Event(), runner.put_kv_blocks, tier.land_loads
    monkeypatch.setattr(runner, "put_kv_blocks", lambda data: (gate.wait(), put(data))[1])

    def land_loads(scatter, wait=False):
        if wait:
            gate.set()  # the engine waits for the copy: let it finish
        return land(scatter, wait)

    monkeypatch.setattr(tier, "land_loads", land_loads)
    engine.add_request("other", ctx(8, 182), GEN)
    engine.step()
    engine.add_request("waits", prompt + [20], GEN)
    engine.step()
    assert engine.pipeline.busy and tier.num_loads and not gate.is_set()
    try:
        llm._abort({"other": None, "waits": None})
        assert gate.is_set() and not engine.has_unfinished_requests() and not engine.block_manager.parked
    finally:  # (whatever failed above: the copy lands and the engine is left idle for the tests after)
        gate.set()
        while engine.has_unfinished_requests():
            engine.step()
        monkeypatch.undo()
    assert engine.num_free_blocks() == engine.num_total_blocks and not tier.loading
    assert llm.generate([ctx(6, 183)], GEN)[0].token_ids == off.generate([ctx(6, 183)], GEN)[0].token_ids


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(host_kv_cache_gb=-1), "must be a number >= 0"),
        (dict(host_kv_cache_gb=math.nan), "must be a number >= 0"),
        (dict(host_kv_cache_gb=True), "must be a number >= 0"),
        (dict(host_kv_cache_gb="1"), "must be a number >= 0"),
        (dict(host_kv_cache_gb=1.0, enable_prefix_caching=False), "needs enable_prefix_caching"),
        (dict(host_kv_cache_gb=1e-9), "holds no KV block"),
    ],
)
def test_bad_host_kv_cache_gb_is_one_error(tiny_models, changes, match):
    with pytest.raises(InvalidRequestError, match=match) as e:
        LLM(tiny_models["llama"], **{**ENGINE, **changes})
    assert e.value.field == "host_kv_cache_gb"


def test_several_hosts_are_refused_before_anything_starts(tiny_models, monkeypatch):
    """Over several hosts the tier is refused at construction, before the channel to the followers
    or any weight (the check needs no second process: it reads only whether there are several)."""
    from jalora.engine import multihost

    monkeypatch.setattr(multihost, "is_multihost", lambda: True)
    monkeypatch.setattr(multihost, "Leader", lambda *a: pytest.fail("the followers' channel was opened"))
    with pytest.raises(InvalidRequestError, match="several hosts") as e:
        LLM(tiny_models["llama"], host_kv_cache_gb=1.0, **ENGINE)
    assert e.value.field == "host_kv_cache_gb"


def test_tensor_parallel_copies_move_every_kv_head(setup):
    """tp = 2 (one KV head per device): blocks gathered from both devices' shards and written back to
    them give the single-device engine's outputs (the engine without the tier)."""
    base, _, _, off = setup
    prompts = [ctx(24, 71), ctx(40, 72), ctx(40, 73), ctx(24, 71) + ctx(3, 74)]
    llm = LLM(base, tensor_parallel_size=2, host_kv_cache_gb=HOST_GB, **ENGINE)
    got = [llm.generate([p], GEN)[0] for p in prompts]
    want = off.generate(prompts, GEN)
    assert got[3].num_cached_tokens == 24 and llm.engine.stats().host_kv_cache_hits == 24
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        assert max(abs(x[t] - y[t]) for x, y, t in zip(a.logprobs, b.logprobs, a.token_ids)) <= 1e-4


# -- the tier's bookkeeping, against a numpy stand-in for the device --------------------------------------


class _Copy:
    """A device array whose host copy arrives when the test opens its gate (the tier's worker waits)."""

    def __init__(self, data, fail=False):
        self.data, self.fail, self.gate = data, fail, threading.Event()

    def __array__(self, dtype=None, copy=None):
        self.gate.wait()
        if self.fail:
            raise RuntimeError("transfer failed")
        return self.data


class _Device:
    def __init__(self, n, open_gates=True):
        self.kv = np.arange(n, dtype=np.float32)[:, None]
        self.copies, self.open_gates, self.fail = [], open_gates, False

    def gather(self, blocks):
        self.copies.append(_Copy(self.kv[blocks].copy(), self.fail))
        if self.open_gates:
            self.copies[-1].gate.set()
        return self.copies[-1]

    def put(self, data):
        return data.copy()

    def scatter(self, blocks, data):
        self.kv[blocks] = data


def copy_back(tier, dev, device_block, h):
    hb = tier.find(h)
    tier.pin(hb)
    tier.copy_back(device_block, h, hb)
    assert device_block in tier.loading  # from the moment it is recorded: no step may read it
    tier.issue(dev.gather, dev.put)
    assert tier.land_loads(dev.scatter, wait=True) == [device_block]
    assert device_block not in tier.loading and hb.pins == 0


def test_tier_lru_and_late_copies():
    dev, tier = _Device(8, open_gates=False), HostKVTier(2, (1,), np.float32)
    tier.keep(0, b"a")  # block 0 (KV 0) out to host
    tier.issue(dev.gather, dev.put)
    dev.kv[0] = 100  # the step that overwrote it
    tier.keep(1, b"b")
    tier.keep(2, b"c")  # the tier is full: "a", the least recently used, is dropped (its copy still away)
    assert tier.find(b"a") is None and tier.num_used_blocks() == 2
    tier.issue(dev.gather, dev.put)
    dev.copies[1].gate.set()  # "b" and "c" arrive first, then "a"'s late copy, which must not win "c"'s slot
    dev.copies[0].gate.set()
    tier.drain()
    copy_back(tier, dev, 5, b"c")
    assert dev.kv[5, 0] == 2
    tier.keep(3, b"d")  # drops "b" ("c" was used last)
    assert tier.find(b"b") is None and tier.find(b"c") is not None
    # Out and back in one scheduling pass: the copy back waits for the copy out, issued first.
    dev.open_gates = True
    copy_back(tier, dev, 6, b"d")
    assert dev.kv[6, 0] == 3
    assert tier.counters.blocks_to_host == 4 and tier.counters.blocks_to_device == 2


def test_pinned_blocks_keep_their_slot():
    """A block a lookup is about to copy back cannot be dropped by evictions in the same pass."""
    dev, tier = _Device(8), HostKVTier(1, (1,), np.float32)
    tier.keep(0, b"a")
    tier.issue(dev.gather, dev.put)
    hb = tier.find(b"a")
    tier.pin(hb)
    tier.keep(1, b"b")  # no free slot and the only block is pinned: "b" is not kept
    assert tier.find(b"b") is None
    tier.copy_back(4, b"a", hb)
    tier.issue(dev.gather, dev.put)
    tier.keep(1, b"b")  # still pinned while the copy back is on its way
    assert tier.find(b"b") is None
    tier.land_loads(dev.scatter, wait=True)
    assert dev.kv[4, 0] == 0
    tier.keep(2, b"c")  # unpinned now: "a" gives way
    assert tier.find(b"a") is None and tier.find(b"c") is not None


def test_a_copy_that_never_lands_is_never_served():
    dev, tier = _Device(8), HostKVTier(4, (1,), np.float32)
    dev.fail = True
    tier.keep(0, b"a")
    tier.issue(dev.gather, dev.put)
    tier.drain()
    assert tier.find(b"a") is None and tier.num_used_blocks() == 0
    dev.fail = False
    tier.keep(1, b"b")  # and its slot serves again
    tier.issue(dev.gather, dev.put)
    copy_back(tier, dev, 7, b"b")
    assert dev.kv[7, 0] == 1


def test_server_info_reports_the_tier_and_the_adapter_limit(setup):
    """GetServerInfo over a real gRPC server: the tier's capacity in blocks and max_cpu_loras."""
    from jalora.client import Client
    from server.app import ServerThread
    from server.config import ServerConfig

    _, _, llm, plain = setup
    for engine, blocks in ((llm.engine, 64), (plain.engine, 0)):
        with ServerThread(engine, ServerConfig(port=0, http_port=None, metrics_port=None)) as s:
            with Client(s.target, timeout=120.0) as c:
                info = c.server_info()
        assert (info.host_kv_cache_blocks, info.max_cpu_loras, info.max_loras) == (blocks, 3, 3)
