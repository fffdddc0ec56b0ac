"""Failures inside a step: the engine recovers, outputs stay exact, every block comes back."""

import pytest

from jalora import SamplingParams


def _drain(engine, tokens: dict, finished: dict, steps: int | None = None) -> None:
    """Steps the engine (until idle, or `steps` times), folding deltas: token ids per request, and the
    final record of each request that ended."""
    n = 0
    while engine.has_unfinished_requests() if steps is None else n < steps:
        for d in engine.step():
            tokens.setdefault(d.request_id, []).extend(d.token_ids)
            if d.is_final:
                finished[d.request_id] = d.finished
        n += 1

@pytest.mark.parametrize("failure", ["donated", "read_back"])
def test_step_failing_on_the_device_recovers(small_llm, failure, monkeypatch):
    """A device error inside the step loses the donated KV cache ("donated"), or surfaces only when a
    step's results are read back, with the next step already queued on that cache ("read_back"): the
    engine rebuilds the cache, forgets the prefix cache, recomputes the running requests, and their
    outputs stay exact."""
    engine = small_llm.engine
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10]]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    want = small_llm.generate(prompts, params)
    for i, p in enumerate(prompts):
        engine.add_request(f"crash-{i}", p, params)
    tokens, finished = {}, {}
    _drain(engine, tokens, finished, steps=2)  # both prefilled (and, with async scheduling, still queued)
    if failure == "donated":
        name = "launch"

        def failing(*args, **kwargs):
            for k, v in engine.runner.kv_caches:  # what donation into a failing device computation leaves
                k.delete()
                v.delete()
            raise RuntimeError("device error")
    else:
        name = "fetch"

        def failing(out):
            raise RuntimeError("device error")

    caches = engine.runner.kv_caches
    monkeypatch.setattr(engine.runner, name, failing)
    with pytest.raises(RuntimeError, match="device error"):
        engine.step()
    monkeypatch.undo()
    assert engine.block_manager.num_cached_blocks() == 0
    assert engine.runner.kv_caches is not caches  # rebuilt, not trusted
    _drain(engine, tokens, finished)
    assert set(finished) == {"crash-0", "crash-1"}
    assert [tokens[f"crash-{i}"] for i in range(2)] == [w.token_ids for w in want]
    assert engine.num_free_blocks() == engine.num_total_blocks


def test_outputs_of_a_half_read_step_are_kept(small_llm, monkeypatch):
    """An error while a step's results are applied (here the second request's token) still delivers
    the first request's final output, on the next step() call."""
    engine = small_llm.engine
    engine.add_request("short", [3, 4, 5], SamplingParams(max_tokens=1))
    engine.add_request("long", [6, 7, 8], SamplingParams(max_tokens=4))
    real = engine.output_processor.append
    calls = {"n": 0}

    def flaky(req, *args):
        calls["n"] += 1
        if req.request_id == "long" and calls["n"] == 2:
            raise ValueError("tokenizer broke")
        return real(req, *args)

    monkeypatch.setattr(engine.output_processor, "append", flaky)
    tokens, finished = {}, {}
    with pytest.raises(ValueError, match="tokenizer broke"):
        _drain(engine, tokens, finished, steps=3)
    monkeypatch.undo()
    _drain(engine, tokens, finished)
    assert tokens["short"] and finished["short"].finish_reason == "length"
    assert len(tokens["long"]) == 4 and finished["long"].num_output_tokens == 4
    assert engine.num_free_blocks() == engine.num_total_blocks


