"""More adapters loaded than device slots (max_cpu_loras > max_loras): adapters wait in host memory and are
swapped into an idle slot when a request needs them (docs/architecture.md, "More adapters than slots").

The oracle is the same engine with every adapter resident (max_loras = the number of adapters): outputs,
logprobs and prefix-cache hits must not depend on which slot an adapter had, or on whether it was swapped
out and back in between two requests.
"""

import numpy as np
import pytest

from jalora import LLM, SamplingParams
from jalora.config import EngineConfig
from jalora.engine.request import Status
from jalora.errors import AdapterInUseError, CapacityError, InvalidRequestError
from tests import hf_models

B = 16  # block size
INV = [7, 8, 9]
INV_ALL = [11, 12]
# name -> (targets, rank, invocation or None for a plain LoRA)
SPECS = {
    "a0": (["q_proj", "k_proj", "v_proj"], 8, INV),
    "a1": (hf_models.ALL_PROJ, 4, INV_ALL),
    "a2": (["q_proj", "k_proj", "v_proj"], 8, None),
    "a3": (["o_proj", "down_proj"], 4, INV),
    "a4": (hf_models.ALL_PROJ, 4, None),
    "a5": (["gate_proj", "up_proj"], 8, INV_ALL),
}
ENGINE = dict(num_kv_blocks=256, max_num_seqs=8, max_num_batched_tokens=32, max_lora_rank=8, warmup=False)
GEN = SamplingParams(max_tokens=6, logprobs=0, ignore_eos=True)


def ctx(n: int, seed: int) -> list[int]:
    """n random tokens without either invocation sequence (ids 13..95)."""
    return np.random.default_rng(seed).integers(13, hf_models.VOCAB - 1, size=n).tolist()


def prompt(adapter: str | None, context: list[int], tail: int) -> list[int]:
    inv = SPECS[adapter][2] if adapter is not None else None
    return context + (inv or []) + ctx(tail, 1000 + tail)


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    base = tiny_models["llama"]
    root = tmp_path_factory.mktemp("swap")
    paths = {
        name: hf_models.make_adapter(base, str(root / name), targets, r=r, invocation=inv, seed=10 + i)
        for i, (name, (targets, r, inv)) in enumerate(SPECS.items())
    }
    return base, paths


@pytest.fixture(scope="module")
def engines(adapters):
    """(swapping: 6 adapters over 2 slots, resident: 6 slots), the same adapters loaded in each."""
    base, paths = adapters
    swapping = LLM(base, max_loras=2, max_cpu_loras=6, **ENGINE)
    resident = LLM(base, max_loras=6, **ENGINE)
    for llm in (swapping, resident):
        for name in SPECS:
            llm.load_adapter(name, paths[name])
    assert swapping.engine.adapters.num_resident == 2 and swapping.engine.adapters.num_loaded == 6
    assert (swapping.engine.info().max_cpu_loras, resident.engine.info().max_cpu_loras) == (6, 6)
    return swapping, resident


def same(got, want, what: str) -> None:
    assert got.token_ids == want.token_ids, f"{what}: tokens differ"
    assert got.num_cached_tokens == want.num_cached_tokens, f"{what}: cached tokens differ"
    assert got.activation_start == want.activation_start, what
    lp = lambda o: [d[t] for d, t in zip(o.logprobs, o.token_ids)]  # noqa: E731
    np.testing.assert_allclose(lp(got), lp(want), atol=1e-4, err_msg=what)


def run_both(engines, prompts, adapters, what):
    outs = [llm.generate(prompts, GEN, adapter=adapters) for llm in engines]
    for i, (got, want) in enumerate(zip(*outs)):
        same(got, want, f"{what} #{i} ({adapters[i]})")
    return outs[0]


def test_random_mix_matches_all_resident(engines):
    """Waves of random adapter requests over shared contexts: the base model fills the contexts' blocks,
    then each adapter reads them (and fills its own), then repeats find their adapter's blocks again
    after their adapter was swapped out and back in. Within a wave no two requests share an adapter and a
    context, so every cache hit is decided by earlier waves and the counts are deterministic."""
    swapping, resident = engines
    rng = np.random.default_rng(0)
    contexts = [ctx(int(n), seed) for seed, n in enumerate(rng.integers(20, 45, size=4))]
    run_both(engines, [c + [40] for c in contexts], [None] * 4, "base wave")
    pairs = [(a, c) for a in SPECS for c in range(len(contexts))]
    picked = [pairs[k] for k in rng.permutation(len(pairs))[:14]]
    names = [a for a, _ in picked]
    prompts = [prompt(a, contexts[c], int(rng.integers(1, 20))) for a, c in picked]
    swaps = swapping.engine.stats().adapter_swaps
    first = run_both(engines, prompts, names, "first wave")
    assert swapping.engine.stats().adapter_swaps > swaps
    assert resident.engine.stats().adapter_swaps == 0
    again = rng.permutation(len(picked))[:8]
    second = run_both(engines, [prompts[k] for k in again], [names[k] for k in again], "repeat wave")
    # The repeats found their own adapter's blocks, beyond the base-keyed part of the first wave.
    assert sum(o.num_cached_tokens for o in second) > sum(first[k].num_cached_tokens for k in again)
    for llm in engines:
        assert llm.engine.num_free_blocks() == llm.engine.num_total_blocks


def test_swapped_out_adapter_reuses_its_blocks_and_a_reload_does_not(engines, adapters):
    swapping, resident = engines
    _, paths = adapters
    manager = swapping.engine.adapters
    x = prompt("a0", ctx(40, 500), 10)  # activation at 40: blocks 0-1 base-keyed, 2-3 a0-keyed
    (cold,) = run_both(engines, [x], ["a0"], "cold")
    assert cold.num_cached_tokens == 0
    run_both(engines, [prompt("a1", ctx(20, 501), 3), prompt("a2", ctx(20, 502), 3)], ["a1", "a2"], "others")
    assert manager.slot_of("a0") is None  # swapped out by a1 and a2
    (warm,) = run_both(engines, [x], ["a0"], "swapped back in")
    assert warm.num_cached_tokens == (len(x) // B) * B  # every full block, a0's own included
    # Other weights (a3's: the same invocation) under the same name: only the base-keyed blocks (before
    # the activation) are found.
    for llm in engines:
        llm.unload_adapter("a0")
        llm.load_adapter("a0", paths["a3"])
    (reloaded,) = run_both(engines, [x], ["a0"], "reloaded")
    assert reloaded.num_cached_tokens == (40 // B) * B
    assert reloaded.token_ids != warm.token_ids or reloaded.logprobs != warm.logprobs


def test_a_request_for_a_swapped_out_adapter_waits_while_others_run(engines):
    """Step by step: with both slots used by running requests, a request for a third adapter waits while
    the running ones keep decoding and later requests for resident adapters are admitted past it; it
    gets the first slot that goes idle, and its output is the all-resident engine's."""
    swapping, resident = engines
    engine, manager = swapping.engine, swapping.engine.adapters
    context = ctx(30, 600)
    swapping.generate([prompt("a2", context, 1)], GEN, adapter="a2")
    swapping.generate([prompt("a3", context, 1)], GEN, adapter="a3")  # resident: a2, a3 (a2 claimed earlier)
    slot3 = manager.slot_of("a3")
    long = SamplingParams(max_tokens=24, ignore_eos=True)
    short = SamplingParams(max_tokens=3, ignore_eos=True)
    engine.add_request("long2", prompt("a2", context, 2), long, "a2")
    engine.add_request("long3", prompt("a3", context, 2), short, "a3")
    engine.step()
    assert {r.request_id for r in engine.scheduler.running} == {"long2", "long3"}
    swaps = engine.stats().adapter_swaps
    cold_prompt = prompt("a4", context, 3)
    engine.add_request("cold", cold_prompt, GEN, "a4")
    engine.add_request("hot3", prompt("a3", context, 4), short, "a3")  # behind cold, for a resident adapter
    engine.add_request("hot2", prompt("a2", context, 5), short, "a2")
    with pytest.raises(AdapterInUseError):
        swapping.unload_adapter("a4")  # a queued request needs it
    reqs = {rid: engine.requests[rid] for rid in ("long2", "long3", "cold", "hot3", "hot2")}
    admitted: dict[str, int] = {}
    cold_tokens, cold_logprobs = [], []
    step = 0
    while engine.has_unfinished_requests():
        done_before = len(reqs["long2"].output_token_ids)
        for delta in engine.step():
            if delta.request_id == "cold":
                cold_tokens += delta.token_ids
                cold_logprobs += [d[t] for d, t in zip(delta.logprobs, delta.token_ids)]
        step += 1
        for rid, req in reqs.items():
            if req.status is not Status.WAITING and rid not in admitted:
                admitted[rid] = step
        if "cold" not in admitted and reqs["long2"].status is Status.RUNNING and step > 2:
            assert len(reqs["long2"].output_token_ids) > done_before, "a waiting swap stalled a running request"
    assert admitted["hot3"] < admitted["cold"] and admitted["hot2"] < admitted["cold"], "held up behind it"
    assert engine.stats().adapter_swaps == swaps + 1
    assert manager.slot_of("a4") == slot3 and manager.slot_of("a3") is None  # a3's slot went idle first
    assert manager.slot_of("a2") is not None
    (want,) = resident.generate([cold_prompt], GEN, adapter="a4")
    assert cold_tokens == want.token_ids
    np.testing.assert_allclose(cold_logprobs, [d[t] for d, t in zip(want.logprobs, want.token_ids)], atol=1e-4)
    assert engine.num_free_blocks() == engine.num_total_blocks


def test_a_waiting_request_is_not_passed_over_forever(engines):
    """Both slots' adapters get a new request every step, so neither slot would ever go idle on its own:
    once max_num_seqs requests have passed the waiting one, the least recently claimed adapter admits no
    more until its slot is idle, and the waiting request gets that slot."""
    swapping, resident = engines
    engine, manager = swapping.engine, swapping.engine.adapters
    context = ctx(12, 800)
    swapping.generate([prompt("a2", context, 1)], GEN, adapter="a2")
    swapping.generate([prompt("a3", context, 1)], GEN, adapter="a3")  # a2 is the least recently claimed
    slot2 = manager.slot_of("a2")
    feed = SamplingParams(max_tokens=3, ignore_eos=True)
    cold_prompt = prompt("a5", context, 2)
    engine.add_request("feed2-0", prompt("a2", context, 3), feed, "a2")
    engine.add_request("feed3-0", prompt("a3", context, 3), feed, "a3")
    engine.step()  # both slots busy now
    engine.add_request("cold", cold_prompt, GEN, "a5")
    cold = engine.requests["cold"]
    tokens, admitted_past, at_admission = [], 0, None
    for step in range(1, 60):
        if cold.status is Status.WAITING:
            engine.add_request(f"feed2-{step}", prompt("a2", context, 3 + step % 5), feed, "a2")
            engine.add_request(f"feed3-{step}", prompt("a3", context, 3 + step % 5), feed, "a3")
            if cold.held_since is not None:
                admitted_past = engine.scheduler.num_admitted - cold.held_since
        tokens += [t for d in engine.step() if d.request_id == "cold" for t in d.token_ids]
        if cold.status is not Status.WAITING and at_admission is None:
            at_admission = (manager.slot_of("a5"), manager.slot_of("a2"))
        if not engine.has_unfinished_requests():
            break
    assert cold.status is Status.FINISHED, "the waiting request never got a slot"
    assert admitted_past >= engine.scheduler.max_num_seqs  # it was passed over first, up to the limit
    assert at_admission == (slot2, None)  # it took the drained adapter's slot
    (want,) = resident.generate([cold_prompt], GEN, adapter="a5")
    assert tokens == want.token_ids
    assert engine.num_free_blocks() == engine.num_total_blocks


def test_unload_frees_the_slot_and_refuses_while_queued(engines, adapters):
    swapping, _ = engines
    _, paths = adapters
    engine, manager = swapping.engine, swapping.engine.adapters
    swapping.generate([prompt("a1", ctx(10, 700), 1)], GEN, adapter="a1")
    swapping.generate([prompt("a5", ctx(10, 701), 1)], GEN, adapter="a5")
    # a request waits for "a3" behind two running ones
    engine.add_request("r1", prompt("a1", ctx(10, 702), 1), GEN, "a1")
    engine.add_request("r5", prompt("a5", ctx(10, 703), 1), GEN, "a5")
    engine.step()
    engine.add_request("q3", prompt("a3", ctx(10, 704), 1), GEN, "a3")
    engine.step()
    engine.add_request("q0", prompt("a0", ctx(10, 705), 1), GEN, "a0")  # waits too, then is aborted
    engine.step()
    assert engine.requests["q3"].status is Status.WAITING and engine.requests["q0"].status is Status.WAITING
    for name in ("a3", "a1", "a0"):
        with pytest.raises(AdapterInUseError, match="in flight"):
            swapping.unload_adapter(name)
    engine.abort_request("q0")
    swapping.unload_adapter("a0")  # nothing of it is queued any more; the others keep running
    assert manager.num_loaded == 5 and engine.requests["q3"].status is Status.WAITING
    swapping.load_adapter("a0", paths["a0"])
    assert manager.num_loaded == 6
    while engine.has_unfinished_requests():
        engine.step()
    swapping.unload_adapter("a3")  # resident now: its slot becomes free
    assert manager.num_resident == 1 and manager.num_loaded == 5
    swapping.load_adapter("a3", paths["a3"])  # into the free slot, no swap
    assert manager.slot_of("a3") is not None and manager.num_resident == 2
    assert engine.num_free_blocks() == engine.num_total_blocks


def test_bad_input_is_one_clear_error(engines, adapters, tiny_models):
    swapping, _ = engines
    base, paths = adapters
    for value in (1, 0, True, 2.5, "6"):
        with pytest.raises(InvalidRequestError, match="max_cpu_loras") as e:
            EngineConfig(model=base, max_loras=2, max_cpu_loras=value)
        assert e.value.field == "max_cpu_loras"
    before = swapping.list_adapters()
    with pytest.raises(CapacityError, match="max_cpu_loras"):
        swapping.load_adapter("seventh", paths["a1"])
    with pytest.raises(CapacityError, match="max_cpu_loras"):  # before any file is read
        swapping.load_adapter("seventh", "/no/such/adapter")
    assert swapping.list_adapters() == before
    # Without max_cpu_loras, loading past the slots is refused as before, naming both knobs.
    one = LLM(base, max_loras=1, **ENGINE)
    one.load_adapter("a0", paths["a0"])
    with pytest.raises(CapacityError, match="max_loras.*max_cpu_loras"):
        one.load_adapter("a1", paths["a1"])
