"""aLoRA and LoRA adapters against PEFT, and base-aligned prefix reuse across models (docs/architecture.md)."""

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jalora import LLM, AdapterNotFoundError, InvalidRequestError, InvocationNotFoundError, SamplingParams
from tests import hf_models

INV = [7, 8, 9]  # invocation of the qkv aLoRA
INV_ALL = [11, 12]  # invocation of the all-projections aLoRA
B = 16


def ctx(n: int, seed: int = 0) -> list[int]:
    """n random tokens that contain neither invocation sequence (ids 13..95)."""
    return np.random.default_rng(seed).integers(13, hf_models.VOCAB - 1, size=n).tolist()


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    base = tiny_models["llama"]
    root = tmp_path_factory.mktemp("adapters")
    paths = {
        "alora_qkv": hf_models.make_adapter(base, str(root / "alora_qkv"), ["q_proj", "k_proj", "v_proj"],
                                            r=8, invocation=INV, seed=1),
        "alora_all": hf_models.make_adapter(base, str(root / "alora_all"), hf_models.ALL_PROJ, r=16, alpha=8,
                                            invocation=INV_ALL, seed=2, use_rslora=True),
        "lora_all": hf_models.make_adapter(base, str(root / "lora_all"), hf_models.ALL_PROJ, r=4, seed=3),
    }  # fmt: skip
    llm = LLM(base, num_kv_blocks=128, max_num_seqs=8, max_num_batched_tokens=64, max_loras=4, max_lora_rank=16,
              warmup=False)  # fmt: skip
    for name, path in paths.items():
        llm.load_adapter(name, path)
    oracles = {name: hf_models.load_peft_oracle(base, path) for name, path in paths.items()}
    oracles[None] = hf_models.load_oracle(base)
    return base, root, paths, llm, oracles


def expect(oracles, adapter, ids, activation, n=16):
    return hf_models.oracle_run(oracles[adapter], ids, n, activation)


def check(out, ref, what):
    prompt_lps, tokens, token_lps = ref
    if out.prompt_logprobs is not None:
        diff = np.max(np.abs(np.asarray(out.prompt_logprobs[1:]) - np.asarray(prompt_lps)))
        assert diff <= 1e-4, f"{what}: prompt logprobs differ by {diff}"
    assert out.token_ids == tokens, f"{what}: greedy tokens differ"
    got = [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]
    assert np.max(np.abs(np.asarray(got) - np.asarray(token_lps))) <= 1e-4, what


FULL = SamplingParams(max_tokens=16, prompt_logprobs=True, logprobs=0, ignore_eos=True)
GEN = SamplingParams(max_tokens=16, logprobs=0, ignore_eos=True)


@pytest.mark.parametrize("lora_path", ["onehot", "segments"])
def test_mixed_batch_matches_peft(setup, lora_path):
    """Both masked-LoRA forms of the step: one-hot matmuls over per-token slots (decode-sized steps on
    GPU, the CPU default) and the segment form the kernels take (here with the jnp reference). A plan
    that takes segments for every step (as on TPU) keeps no flat A copy of the stacks (dead HBM)."""
    base_path, _, paths, llm, oracles = setup
    if lora_path == "segments":
        llm = LLM(base_path, num_kv_blocks=128, max_num_seqs=8, max_num_batched_tokens=64, max_loras=4,
                  max_lora_rank=16, lora_onehot_max_tokens=0, warmup=False)  # fmt: skip
        for name, path in paths.items():
            llm.load_adapter(name, path)
        assert llm.engine.adapters.stacks and all(s.a_flat is None for s in llm.engine.adapters.stacks.values())
    else:
        assert all(s.a_flat is not None for s in llm.engine.adapters.stacks.values())
    cases = [  # (adapter, prompt, activation index or None)
        (None, ctx(40, 1), None),
        ("lora_all", ctx(37, 2), 0),
        ("alora_qkv", ctx(30, 3) + INV + ctx(5, 4), 30),  # invocation straddles the block boundary at 32
        ("alora_qkv", ctx(32, 5) + INV, 32),  # starts exactly on a boundary
        ("alora_all", ctx(21, 6) + INV_ALL + ctx(3, 7) + INV_ALL, 26),  # the last occurrence counts
        ("alora_all", ctx(50, 8) + INV_ALL, 50),
    ]
    outs = llm.generate([c[1] for c in cases], FULL, adapter=[c[0] for c in cases])
    for (adapter, ids, a), out in zip(cases, outs):
        assert out.activation_start == a
        check(out, expect(oracles, adapter, ids, None if adapter in (None, "lora_all") else a), f"{adapter} a={a}")
    assert llm.engine.num_free_blocks() == llm.engine.num_total_blocks


def test_cold_and_warm_agree_and_base_blocks_are_reused(setup):
    """Base answers; the aLoRA judges prompt + answer + invocation from the base-filled cache."""
    base_path, _, paths, llm, oracles = setup
    question = ctx(45, 11)
    (answer,) = llm.generate([question], GEN)
    judge = question + answer.token_ids + INV  # a = 61
    a = len(question) + len(answer.token_ids)
    (warm,) = llm.generate([judge], GEN, adapter="alora_qkv")
    assert warm.num_cached_tokens == (a // B) * B  # every full block before the activation index
    cold_llm = LLM(base_path, num_kv_blocks=64, max_num_seqs=4, max_loras=1, max_lora_rank=16, warmup=False)
    cold_llm.load_adapter("alora_qkv", paths["alora_qkv"])
    (cold,) = cold_llm.generate([judge], GEN, adapter="alora_qkv")
    assert cold.num_cached_tokens == 0
    ref = expect(oracles, "alora_qkv", judge, a)
    check(warm, ref, "warm")
    check(cold, ref, "cold")


def test_alora_first_then_base_shares_prefix(setup):
    _, _, _, llm, _ = setup
    context = ctx(70, 21)
    (judged,) = llm.generate([context + INV_ALL], GEN, adapter="alora_all")
    assert judged.num_cached_tokens == 0
    (base,) = llm.generate([context + [40, 41]], GEN)
    assert base.num_cached_tokens == (70 // B) * B  # the aLoRA's pre-activation blocks are base KV


def test_plain_lora_after_base_reuses_nothing(setup):
    _, _, _, llm, oracles = setup
    prompt = ctx(66, 31)
    llm.generate([prompt], GEN)
    (lora,) = llm.generate([prompt], GEN, adapter="lora_all")
    assert lora.num_cached_tokens == 0
    check(lora, expect(oracles, "lora_all", prompt, None), "lora after base")
    (l2,) = llm.generate([prompt], GEN, adapter="lora_all")
    assert l2.num_cached_tokens == (65 // B) * B  # but LoRA reuses its own blocks


def test_reload_other_weights_under_same_name_serves_no_stale_block(setup):
    base_path, root, _, llm, _ = setup
    old = hf_models.make_adapter(base_path, str(root / "swap_old"), ["q_proj", "v_proj", "down_proj"],
                                 invocation=INV, seed=41)  # fmt: skip
    new = hf_models.make_adapter(base_path, str(root / "swap_new"), ["q_proj", "v_proj", "down_proj"],
                                 invocation=INV, seed=42)  # fmt: skip
    prompt = ctx(20, 51) + INV + ctx(40, 52)  # a = 20; blocks 1.. are adapter-keyed
    llm.load_adapter("swap", old)
    identity_old = {i.name: i.identity for i in llm.list_adapters()}["swap"]
    (first,) = llm.generate([prompt], GEN, adapter="swap")
    (again,) = llm.generate([prompt], GEN, adapter="swap")
    assert again.num_cached_tokens == (len(prompt) - 1) // B * B  # its own adapter-keyed blocks
    llm.unload_adapter("swap")
    llm.load_adapter("swap", new)
    assert {i.name: i.identity for i in llm.list_adapters()}["swap"] != identity_old
    (after,) = llm.generate([prompt], GEN, adapter="swap")
    assert after.num_cached_tokens == 16  # only the block that ends before a=20 (base KV)
    check(after, expect({"swap": hf_models.load_peft_oracle(base_path, new)}, "swap", prompt, 20), "reloaded")
    assert after.token_ids != first.token_ids
    llm.unload_adapter("swap")


def test_list_adapters_describes_each(setup):
    _, _, paths, llm, _ = setup
    infos = {i.name: i for i in llm.list_adapters()}
    assert infos["alora_qkv"].kind == "alora" and infos["alora_qkv"].invocation_tokens == INV
    assert infos["alora_qkv"].targets == ["q_proj", "k_proj", "v_proj"] and infos["alora_qkv"].rank == 8
    assert infos["lora_all"].kind == "lora" and infos["lora_all"].invocation_tokens is None
    assert infos["alora_all"].targets == hf_models.ALL_PROJ and infos["alora_all"].rank == 16
    assert len({i.identity for i in infos.values()}) == len(infos)


def test_request_errors_leave_engine_serving(setup):
    _, _, _, llm, _ = setup
    with pytest.raises(AdapterNotFoundError):
        llm.generate([ctx(10)], GEN, adapter="nope")
    with pytest.raises(InvocationNotFoundError) as e:
        llm.generate([ctx(30)], GEN, adapter="alora_qkv")
    assert "invocation" in str(e.value)
    assert not llm.engine.requests
    assert llm.engine.num_free_blocks() == llm.engine.num_total_blocks


def _corrupt(src: str, dst, edit_config=None, edit_weights=None) -> str:
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    cfg_path = os.path.join(dst, "adapter_config.json")
    if edit_config:
        cfg = json.load(open(cfg_path))
        edit_config(cfg)
        json.dump(cfg, open(cfg_path, "w"))
    if edit_weights:
        w_path = os.path.join(dst, "adapter_model.safetensors")
        tensors = load_file(w_path)
        edit_weights(tensors)
        save_file(tensors, w_path)
    return str(dst)


def test_layers_to_transform_matches_peft(setup, tmp_path):
    """PEFT adapts only the listed layers (its file holds only their weights); the others run the base weights."""
    base, _, _, llm, _ = setup
    path = hf_models.make_adapter(base, str(tmp_path / "some_layers"), ["q_proj", "v_proj", "down_proj"], r=8,
                                  invocation=INV, seed=5, layers_to_transform=[1],
                                  layers_pattern=["h", "layers"])  # (PEFT tries each)  # fmt: skip
    info = llm.load_adapter("some_layers", path)
    try:
        assert info.kind == "alora"
        ids = ctx(27, 41) + INV + ctx(4, 42)
        (out,) = llm.generate([ids], FULL, adapter="some_layers")
        check(out, hf_models.oracle_run(hf_models.load_peft_oracle(base, path), ids, 16, 27), "layers_to_transform")
    finally:
        llm.unload_adapter("some_layers")


@pytest.mark.parametrize(
    "edit_config, edit_weights, match",
    [
        (lambda c: c.update(use_dora=True), None, "DoRA"),
        (lambda c: c.update(lora_bias=True), None, "lora_bias"),
        (lambda c: c.update(bias="all"), None, "bias"),
        (lambda c: c.update(modules_to_save=["lm_head"]), None, "modules_to_save"),
        (lambda c: c.update(rank_pattern={"q_proj": 4}), None, "rank_pattern"),
        (lambda c: c.update(layers_to_transform=[0]), None, "adapts layer 1, which layers_to_transform=\\[0\\] leaves"),
        (lambda c: c.update(layers_to_transform=[0, 9]), None, "layers_to_transform=.* must be a layer index"),
        (lambda c: c.update(layers_to_transform=True), None, "layers_to_transform=.* must be a layer index"),
        (lambda c: c.update(layers_to_transform=0, layers_pattern="h"), None, "layers_pattern"),
        (lambda c: c.update(r=128), None, "max_lora_rank"),
        (None, lambda t: t.update({"base_model.model.model.embed_tokens.lora_A.weight": np.zeros((8, 97), "f4")}),
         "unsupported tensor"),
        (None, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                                   np.zeros((8, 65), "f4")}), "shape"),
        (None, lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"), "lacks"),
    ],
)  # fmt: skip
def test_unsupported_adapters_are_rejected(setup, tmp_path, edit_config, edit_weights, match):
    _, _, paths, llm, _ = setup
    bad = _corrupt(paths["alora_qkv"], tmp_path / "bad", edit_config, edit_weights)
    before = [i.name for i in llm.list_adapters()]
    with pytest.raises(InvalidRequestError, match=match):
        llm.load_adapter("bad", bad)
    assert [i.name for i in llm.list_adapters()] == before


def test_bfloat16_adapter_file_loads(setup, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    _, _, paths, llm, _ = setup
    bf16 = _corrupt(paths["alora_qkv"], tmp_path / "bf16")
    w_path = os.path.join(bf16, "adapter_model.safetensors")
    tensors = load_file(w_path)
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, w_path)
    rounded = _corrupt(paths["alora_qkv"], tmp_path / "rounded")  # the same values stored as float32
    save_file({k: v.to(torch.bfloat16).float() for k, v in tensors.items()}, os.path.join(rounded, w_path[-25:]))
    prompt = ctx(30, 71) + INV
    outs = []
    for name, path in (("bf16", bf16), ("rounded", rounded)):
        info = llm.load_adapter(name, path)
        assert info.kind == "alora" and info.rank == 8
        outs.append(llm.generate([prompt], GEN, adapter=name)[0])
        llm.unload_adapter(name)
    assert outs[0].token_ids == outs[1].token_ids
    # the second call reuses the first one's base blocks: other shapes, same values up to rounding
    got = [[lp[t] for lp, t in zip(o.logprobs, o.token_ids)] for o in outs]
    assert np.max(np.abs(np.subtract(*got))) <= 1e-5


def test_load_errors(setup, tmp_path):
    _, _, paths, llm, _ = setup
    with pytest.raises(InvalidRequestError, match="does not exist"):
        llm.load_adapter("x", str(tmp_path / "missing"))
    with pytest.raises(InvalidRequestError, match="already loaded"):
        llm.load_adapter("alora_qkv", paths["alora_qkv"])
    with pytest.raises(AdapterNotFoundError):
        llm.unload_adapter("never-loaded")


def test_legacy_invocation_string_uses_base_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    from checkpoints import DEFAULT_MODEL_DIR as DEFAULT_MODEL


    path = hf_models.make_adapter(DEFAULT_MODEL, str(tmp_path / "legacy"), ["q_proj"], seed=5)
    cfg_path = os.path.join(path, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    cfg["alora_invocation_tokens"] = None
    cfg["invocation_string"] = "<|start_of_role|>certainty<|end_of_role|>"
    json.dump(cfg, open(cfg_path, "w"))
    llm = LLM(DEFAULT_MODEL, num_kv_blocks=16, max_num_seqs=2, max_model_len=128, warmup=False)
    info = llm.load_adapter("legacy", path)
    tok = Tokenizer.from_file(os.path.join(DEFAULT_MODEL, "tokenizer.json"))
    assert info.kind == "alora"
    assert info.invocation_tokens == tok.encode(cfg["invocation_string"], add_special_tokens=False).ids


# -- eviction and the cache-on == cache-off property ----------------------------------------------------


@pytest.fixture(scope="module")
def twin_engines(setup):
    """The same small engine with and without the prefix cache (10 blocks of 8 tokens: evicts often)."""
    base, _, paths, _, _ = setup
    engines = []
    for caching in (True, False):
        llm = LLM(base, block_size=8, num_kv_blocks=24, max_num_seqs=4, max_num_batched_tokens=32, max_loras=3,
                  max_lora_rank=16, enable_prefix_caching=caching, warmup=False)  # fmt: skip
        for name, path in paths.items():
            llm.load_adapter(name, path)
        engines.append(llm)
    return engines


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.sampled_from([None, "alora_qkv", "alora_all", "lora_all"]),
            st.integers(0, 2),  # which shared context
            st.integers(1, 40),  # its length
            st.integers(0, 6),  # private suffix length
        ),
        min_size=2,
        max_size=6,
    )
)
def test_prefix_cache_never_changes_outputs(twin_engines, stream):
    cached, uncached = twin_engines
    prompts, adapters = [], []
    for adapter, shared, n, extra in stream:
        ids = ctx(n, 1000 + shared) + ctx(extra, 2000 + n)
        ids += INV if adapter == "alora_qkv" else INV_ALL if adapter == "alora_all" else []
        prompts.append(ids)
        adapters.append(adapter)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    # Two rounds on the cached engine: the second is served from whatever the first left behind.
    for _ in range(2):
        got = cached.generate(prompts, params, adapter=adapters)
        want = uncached.generate(prompts, params, adapter=adapters)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert cached.engine.num_free_blocks() == cached.engine.num_total_blocks
    if min(len(p) for p in prompts) + 5 >= 8:  # every request filled a block, the last one stays cached
        assert cached.engine.block_manager.num_cached_blocks() > 0


def test_eviction_under_small_cache_keeps_outputs_exact(twin_engines, setup):
    cached, _ = twin_engines
    oracles = setup[4]
    prompts = [ctx(60, 3000 + i) + INV for i in range(4)]  # 4 x 63 tokens in a 192-token cache
    for _ in range(2):
        outs = cached.generate(prompts, GEN, adapter="alora_qkv")
        for p, o in zip(prompts, outs):
            check(o, expect(oracles, "alora_qkv", p, 60), "evicting cache")


def test_unload_in_flight_and_full_slots_are_refused(setup):
    from jalora.errors import AdapterInUseError, CapacityError

    _, _, paths, llm, _ = setup
    engine = llm.engine
    engine.add_request("busy", ctx(20, 61) + INV, GEN, adapter="alora_qkv")
    with pytest.raises(AdapterInUseError, match="in flight"):
        llm.unload_adapter("alora_qkv")
    engine.abort_request("busy")
    engine.step()
    llm.load_adapter("fourth", paths["lora_all"])  # max_loras=4: every slot taken now
    with pytest.raises(CapacityError, match="max_loras"):
        llm.load_adapter("fifth", paths["lora_all"])
    llm.unload_adapter("fourth")
    assert sorted(i.name for i in llm.list_adapters()) == ["alora_all", "alora_qkv", "lora_all"]
    assert engine.num_free_blocks() == engine.num_total_blocks
