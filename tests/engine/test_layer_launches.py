"""Layer launches (EngineConfig.layers_per_launch): a step run as the embedding, a compiled group of
decoder layers launched once per group and the head (jalora/engine/model_runner.py) computes what
transformers + PEFT compute: base and aLoRA requests, batched, chunked and cached, with sampling and
logprobs behind it, also where the last group is smaller; it compiles one group per step variant and
group size, the warm-up covers every variant, and a restart loads them."""

import numpy as np
import pytest

from jalora import LLM, SamplingParams
from tests import hf_models
from tests.compile_events import COMPILES

INV = [7, 8]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def prompt_of(n: int, salt: int = 0) -> list[int]:
    rng = np.random.default_rng(n * 17 + salt)
    return [int(t) for t in rng.integers(9, hf_models.VOCAB - 1, size=n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # Granite (embedding, residual and logits multipliers: every scale of the head) with 3 layers in
    # groups of 2: a group of 2 layers, then one of 1.
    root = tmp_path_factory.mktemp("layers")
    base = hf_models.make_model(str(root / "granite3"), "granite", seed=3, num_hidden_layers=3)
    adapter = hf_models.make_adapter(base, str(root / "alora"), TARGETS, r=4, invocation=INV, seed=2)
    llm = LLM(base, num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96, max_loras=2,
              max_lora_rank=4, warmup=False, layers_per_launch=2)  # fmt: skip
    llm.load_adapter("judge", adapter)
    oracles = {None: hf_models.load_oracle(base), "judge": hf_models.load_peft_oracle(base, adapter)}
    return base, adapter, llm, oracles


def test_base_and_alora_requests_match_peft(setup):
    """Batched base and adapted requests (a 40-token prompt takes two chunks of 32) against PEFT."""
    _, _, llm, oracles = setup
    runner = llm.engine.runner
    assert runner.layer_launches and runner.num_step_variants == 0 and len(runner._step) == 0
    assert [list(g) for g in runner._groups] == [[0, 1], [2]]
    cases = [(prompt_of(40), None), (prompt_of(12, 1) + INV, "judge"), (prompt_of(5, 2), None)]
    params = SamplingParams(max_tokens=6, prompt_logprobs=True, logprobs=0, ignore_eos=True)
    outs = [llm.generate([ids], params, name)[0] for ids, name in cases[:1]]
    outs += llm.generate([ids for ids, _ in cases[1:]], params, [name for _, name in cases[1:]])
    for (ids, name), out in zip(cases, outs):
        activation = len(ids) - len(INV) if name else None  # (the invocation ends the prompt)
        hf_models.assert_matches_oracle(out, oracles[name], ids, 6, activation, prompt_logprobs=True, what=name)
    # Each step variant compiled a group of 2 and one of 1 (not every layer): base-only and adapted, in
    # the buckets used.
    assert 4 <= runner.num_step_variants <= 4 * len(runner.buckets)
    assert len(runner._pre) >= 1 and len(runner._post) >= 1


def test_same_tokens_as_the_fused_step_with_sampling(setup):
    """Sampled requests draw the same tokens as the fused step's (the draw reads the same logits)."""
    base, adapter, llm, _ = setup
    fused = LLM(base, num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96, max_loras=2,
                max_lora_rank=4, warmup=False)  # fmt: skip
    assert fused.engine.runner.layers_per_launch == 0  # (the default on a CPU: the fused step)
    fused.load_adapter("judge", adapter)
    prompts = [prompt_of(20, 3), prompt_of(9, 4) + INV]
    params = SamplingParams(max_tokens=8, temperature=0.8, top_k=20, seed=11, logprobs=2, ignore_eos=True)
    want = fused.generate(prompts, params, [None, "judge"])
    got = llm.generate(prompts, params, [None, "judge"])
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        for a, b in zip(g.logprobs, w.logprobs):
            assert a.keys() == b.keys() and max(abs(a[t] - b[t]) for t in a) <= 1e-5


def test_warmup_covers_every_variant_and_a_restart_loads_them(tiny_models, tmp_path):
    """After the warm-up (base and adapted) no request compiles; a second engine over the same directory
    of compiled variants reads every one of them and compiles none."""
    base = tiny_models["llama"]
    adapter = hf_models.make_adapter(base, str(tmp_path / "alora"), TARGETS, r=4, invocation=INV, seed=1)
    kwargs = dict(num_kv_blocks=32, max_num_seqs=2, max_num_batched_tokens=32, max_model_len=64, max_loras=2,
                  max_lora_rank=4, layers_per_launch=1, compile_cache=str(tmp_path / "cache"))  # fmt: skip

    def start():
        llm = LLM(base, warmup=False, **kwargs)
        llm.load_adapter("judge", adapter)
        llm.engine.warmup_adapters(progress=False, with_base=True)
        return llm

    llm = start()
    runner = llm.engine.runner
    assert runner.num_step_variants == 2 * len(runner.buckets)
    assert [p["functions_compiled_late"] for p in runner.warmup_phases] == [0]  # (in the steps' wave)
    labels = {what for what, *_ in runner.compile_log()}
    assert {f"layer x1 T={b}{a}" for b in runner.buckets for a in ("", " adapted")} <= labels
    compiles = len(COMPILES)
    for ids, name in ((prompt_of(30, 5), None), (prompt_of(6, 6) + INV, "judge")):
        llm.generate([ids], SamplingParams(max_tokens=3, temperature=0.5, logprobs=1, prompt_logprobs=True), name)
    assert len(COMPILES) == compiles, "a request compiled after the warm-up"
    again = start()
    assert again.engine.runner.num_loaded() == again.engine.runner.num_compiled() > 0
    ids = prompt_of(10, 7) + INV
    greedy = SamplingParams(max_tokens=4, ignore_eos=True)
    assert again.generate([ids], greedy, "judge")[0].token_ids == llm.generate([ids], greedy, "judge")[0].token_ids


@pytest.mark.parametrize(
    "kwargs", [{"layers_per_launch": 1, "tensor_parallel_size": 2}, {"layers_per_launch": -1},
               {"layers_per_launch": True}, {"layers_per_launch": 1.5}],  # fmt: skip
)
def test_bad_layers_per_launch_is_refused(tiny_models, kwargs):
    """Layer launches run an unsharded model, in groups of a whole number of layers (one error naming the
    field, before any weights are made)."""
    from jalora.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="layers_per_launch") as e:
        LLM(tiny_models["llama"], warmup=False, **kwargs)
    assert str(e.value).count("layers_per_launch") == 1
