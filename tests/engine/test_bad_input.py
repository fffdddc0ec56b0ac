"""Bad input gets an InvalidRequestError naming the field (once), and the engine keeps serving."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import DEFAULT_MODEL_DIR
from checkpoints.make_adapters import make_alora
from jalora import LLM, InvalidRequestError, SamplingParams
from jalora.errors import AdapterNotFoundError, InvocationNotFoundError
from tests import hf_models


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["llama"], num_kv_blocks=32, max_num_seqs=4, max_model_len=128, warmup=False)


def assert_names_the_field_once(err: InvalidRequestError, field: str) -> None:
    """`str(err)` is "field: message"; a message that names its field again reads "prompt: prompt ..."."""
    assert err.field == field
    assert str(err) == f"{field}: {err.message}"
    assert str(err).lower().count(field.lower()) == 1, str(err)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),  # (-1 is vLLM's "all tokens", as 0)
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": "0.1"}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"min_tokens": 17}, "min_tokens"),  # (past max_tokens 16)
        ({"min_tokens": -1}, "min_tokens"),
        ({"logit_bias": {1: 101}}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"logit_bias": [1]}, "logit_bias"),
        ({"logit_bias": {1: float("nan")}}, "logit_bias"),
        ({"logit_bias": dict.fromkeys(range(301), 1.0)}, "logit_bias"),
        ({"logprobs": 99}, "logprobs"),
        ({"seed": 2**63}, "seed"),  # (OpenAI's seeds are 64-bit integers)
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"temperature": None}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": "0.5"}, "top_p"),
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"top_k": True}, "top_k"),
        ({"top_k": 2**31}, "top_k"),  # (past int32: the engine's step would overflow)
        ({"stop_token_ids": [2**31]}, "stop_token_ids"),
        ({"temperature": 10**400}, "temperature"),  # (too large for a float)
        ({"top_p": 10**400}, "top_p"),
        ({"ignore_eos": "no"}, "ignore_eos"),
        ({"prompt_logprobs": "yes"}, "prompt_logprobs"),
        ({"prompt_logprobs": 5}, "prompt_logprobs"),  # (vLLM's top-5: only each token's own is given)
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": "8"}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": True}, "truncate_prompt_tokens"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [3, -1]}, "allowed_token_ids"),
        ({"allowed_token_ids": 3}, "allowed_token_ids"),
    ],
)
def test_sampling_params_name_the_field(kwargs, field):
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs is True  # (vLLM's count: the token's own logprob)
    assert SamplingParams(prompt_logprobs=1).prompt_logprobs is True
    assert SamplingParams(top_k=-1).top_k == 0
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert_names_the_field_once(e.value, field)


@pytest.mark.parametrize(
    "prompt, field",
    [
        ([], "prompt"),
        ([5, 97], "prompt_token_ids"),
        ([5, -1], "prompt_token_ids"),
        (list(range(2, 90)) * 2, "prompt"),  # 176 tokens > max_model_len 128
        ("text but the model has no tokenizer", "prompt"),
        (3.5, "prompt"),
        (["a"], "prompt_token_ids"),
        ([[1, 2]], "prompt_token_ids"),
        ([1.7, 2], "prompt_token_ids"),
        ([5, True], "prompt_token_ids"),  # a bool is not a token id, though Python counts it an int
        ([5, 2**70], "prompt_token_ids"),  # past int64
        (np.array([5.0, 6.0]), "prompt_token_ids"),
    ],
)
def test_bad_prompts_leave_engine_serving(llm, prompt, field):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([prompt], SamplingParams(max_tokens=2))
    assert_names_the_field_once(e.value, field)
    assert not llm.engine.requests
    (ok,) = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=2))
    assert len(ok.token_ids) == 2
    assert llm.engine.num_free_blocks() == llm.engine.num_total_blocks


def test_a_truncation_longer_than_the_model_takes_is_refused(llm):
    """truncate_prompt_tokens past max_model_len - 1 (128 here) could keep a prompt the model cannot take: refused
    naming it, even for a short prompt, as vLLM refuses it."""
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([[3, 4, 5]], SamplingParams(max_tokens=2, truncate_prompt_tokens=128))
    assert_names_the_field_once(e.value, "truncate_prompt_tokens")
    assert not llm.engine.requests


def test_allowed_token_ids_past_the_vocabulary_are_refused(llm):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([[3, 4, 5]], SamplingParams(max_tokens=2, allowed_token_ids=[5, hf_models.VOCAB]))
    assert_names_the_field_once(e.value, "allowed_token_ids")
    assert not llm.engine.requests


def test_allowed_token_ids_that_min_tokens_bans_every_one_of_are_refused(llm):
    """min_tokens bans the stop and end-of-sequence ids: allowed_token_ids of only those leave the draw no token (every
    logit -inf: it drew token 0, outside the allowed ones), so the request is refused naming allowed_token_ids; one
    allowed token beside them is drawn."""
    eos = hf_models.VOCAB - 1
    for allowed, stops in (([eos], []), ([7], [7]), ([eos, 7], [7])):
        with pytest.raises(InvalidRequestError) as e:
            llm.generate([[3, 4, 5]], SamplingParams(max_tokens=4, min_tokens=2, allowed_token_ids=allowed,
                                                     stop_token_ids=stops))  # fmt: skip
        assert_names_the_field_once(e.value, "allowed_token_ids")
        assert not llm.engine.requests
    (out,) = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=4, min_tokens=2, allowed_token_ids=[eos, 7, 9],
                                                      stop_token_ids=[7]))  # fmt: skip
    assert out.token_ids[:2] == [9, 9] and set(out.token_ids) <= {eos, 7, 9}
    assert llm.engine.num_free_blocks() == llm.engine.num_total_blocks


def test_one_bad_prompt_in_a_batch_adds_nothing(llm):
    with pytest.raises(InvalidRequestError):
        llm.generate([[3, 4], [], [5]], SamplingParams(max_tokens=2))
    assert not llm.engine.requests and not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("field, value", [("num_kv_blocks", 10**12), ("max_num_seqs", 10**12), ("max_loras", 10**9),
                                          ("max_lora_rank", 10**12), ("max_num_batched_tokens", 10**12)])  # fmt: skip
def test_sizes_no_memory_holds_are_refused_before_the_weights_are_read(tiny_models, tmp_path, field, value):
    """Each would fail an allocation after the load or in the warm-up (a traceback): refused naming the field
    before the weights are read (they are broken here, which would be a different error)."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["llama"], broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InvalidRequestError) as e:
        LLM(str(broken), warmup=False, **{field: value})
    assert_names_the_field_once(e.value, field)
    assert "GiB of device memory" in e.value.message


def test_arguments_of_the_wrong_type_name_their_field(llm):
    with pytest.raises(InvalidRequestError) as e:
        llm.load_adapter("x", None)
    assert_names_the_field_once(e.value, "path")
    assert llm.list_adapters() == []
    with_tokenizer = LLM(DEFAULT_MODEL_DIR, num_kv_blocks=8, warmup=False)  # (this module's model has none)
    with pytest.raises(InvalidRequestError) as e:
        with_tokenizer.engine.tokenize(5)
    assert_names_the_field_once(e.value, "prompt")
    assert "must be text" in e.value.message
    assert SamplingParams(prompt_logprobs=None).prompt_logprobs is False  # (vLLM's unset values)
    assert SamplingParams(ignore_eos=None).ignore_eos is False
    assert SamplingParams(prompt_logprobs=np.int64(1)).prompt_logprobs is True


def test_the_memory_floor_is_what_the_engine_allocates_at_least(tiny_models, tmp_path):
    """Each term of the floor against what the engine holds: the weights and the KV cache (equal), a step's page
    table, the model's logits rows and the penalties' rows of token counts for max_num_seqs, its embedded rows twice
    for max_num_batched_tokens (the model code's shapes and dtypes), and the adapter stacks a loaded adapter
    allocates (at least the term)."""
    from jalora.engine.llm_engine import memory_floor
    from jalora.model.decoder import embed_tokens, logits_of

    llm = LLM(tiny_models["llama"], num_kv_blocks=24, block_size=4, max_num_seqs=3, max_num_batched_tokens=32,
              max_loras=2, max_lora_rank=8, warmup=False)  # fmt: skip
    eng, cfg = llm.engine, llm.engine.model_config
    floor = memory_floor(eng.config, cfg, eng.tp, eng.max_model_len, eng.dtype)
    assert floor["num_kv_blocks"] == sum(c.nbytes for kv in eng.runner.kv_caches for c in kv)
    params = jax.tree_util.tree_leaves(eng.runner.params)
    assert floor["model"] == sum(p.nbytes for p in params), (floor, [p.shape for p in params])
    nbytes = lambda s: int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize  # noqa: E731
    hidden = jax.ShapeDtypeStruct((3, cfg.hidden_size), eng.dtype)
    head = jax.ShapeDtypeStruct((cfg.hidden_size, cfg.vocab_size), eng.dtype)
    logits = jax.eval_shape(lambda h, w: logits_of(cfg, w, h), hidden, head)
    assert floor["max_num_seqs"] == 3 * eng.runner.max_pages * 4 + nbytes(logits) + eng.runner.penalty_counts.nbytes
    embed = jax.ShapeDtypeStruct((cfg.vocab_size, cfg.hidden_size), eng.dtype)
    rows = jax.eval_shape(lambda e, t: embed_tokens(cfg, e, t), embed, jax.ShapeDtypeStruct((32,), jnp.int32))
    assert floor["max_num_batched_tokens"] == 2 * nbytes(rows)
    llm.load_adapter("k", hf_models.make_adapter(tiny_models["llama"], str(tmp_path / "k"), ["k_proj"], r=4))
    stacks = eng.adapters.stacks.values()
    assert 0 < floor["max_lora_rank"] <= min(s.a.nbytes + s.b.nbytes for s in stacks), (floor, list(stacks))


def test_a_max_model_len_past_the_models_positions_is_served_with_a_warning(tiny_models, caplog):
    """RoPE takes any position, so it is allowed (as vLLM does when told to), but not silently."""
    with caplog.at_level("WARNING", logger="jalora.engine.llm_engine"):
        llm = LLM(tiny_models["llama"], max_model_len=600, num_kv_blocks=160, warmup=False)  # (the model's: 512)
    assert llm.engine.max_model_len == 600
    assert [r.getMessage() for r in caplog.records] == [
        "max_model_len 600 is above the model's max_position_embeddings 512: positions past it are outside what the "
        "model was trained on"]  # fmt: skip
    caplog.clear()
    with caplog.at_level("WARNING", logger="jalora.engine.llm_engine"):
        LLM(tiny_models["llama"], max_model_len=512, num_kv_blocks=160, warmup=False)
    assert caplog.records == []


def test_engine_config_errors(tiny_models, tmp_path):
    path = tiny_models["llama"]
    with pytest.raises(InvalidRequestError, match="dtype"):
        LLM(path, dtype="float8", warmup=False)
    with pytest.raises(InvalidRequestError, match="load_format"):
        LLM(path, load_format="pickle", warmup=False)
    for level in (6, -1, "2", True):
        with pytest.raises(InvalidRequestError, match="autotune_level") as e:
            LLM(path, autotune_level=level, warmup=False)
        assert_names_the_field_once(e.value, "autotune_level")
    with pytest.raises(InvalidRequestError, match="model"):
        LLM(str(tmp_path / "nowhere"), warmup=False)
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(InvalidRequestError, match="config.json"):
        LLM(str(broken), warmup=False)
    cfg = json.loads(open(os.path.join(path, "config.json")).read())
    cfg["hidden_size"] = 128  # weights no longer fit the config
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidRequestError, match="model.safetensors"):
        LLM(str(broken), warmup=False)
    (broken / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(InvalidRequestError, match="model_type"):
        LLM(str(broken), warmup=False)
    os.remove(broken / "model.safetensors")
    (broken / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(InvalidRequestError, match="model"):
        LLM(str(broken), warmup=False)


def test_adapter_and_config_errors_name_the_field_once(llm, tiny_models, tmp_path):
    """The errors a new user meets first: an unknown adapter, an aLoRA prompt without its invocation,
    a config value out of its choices."""
    with pytest.raises(AdapterNotFoundError) as e:
        llm.generate([[3, 4, 5]], SamplingParams(max_tokens=2), "nope")
    assert_names_the_field_once(e.value, "adapter")
    judge = make_alora(tiny_models["llama"], tmp_path / "judge", [90, 91], ["q_proj", "v_proj"], seed=5)
    llm.load_adapter("judge", judge)
    try:
        with pytest.raises(InvocationNotFoundError) as e:
            llm.generate([[3, 4, 5]], SamplingParams(max_tokens=2), "judge")
        assert_names_the_field_once(e.value, "prompt")
        with pytest.raises(InvalidRequestError) as e:
            llm.load_adapter("judge", judge)
        assert_names_the_field_once(e.value, "name")
    finally:
        llm.unload_adapter("judge")
    for kwargs, field in (({"dtype": "float8"}, "dtype"), ({"load_format": "pickle"}, "load_format")):
        with pytest.raises(InvalidRequestError) as e:
            LLM(tiny_models["llama"], warmup=False, **kwargs)
        assert_names_the_field_once(e.value, field)


@pytest.mark.parametrize("field,impl", [("attention_impl", "tpu"), ("lora_impl", "tpu"), ("norm_impl", "gpu")])
def test_a_kernel_this_platform_cannot_run_is_refused_before_loading(tiny_models, field, impl, monkeypatch):
    """The CPU cannot run the TPU or GPU kernels except in interpret mode: the config says so, naming the
    field, before any weight is read."""
    import jalora.engine.llm_engine as llm_engine

    def no_load(*args, **kwargs):
        raise AssertionError("weights were read before the kernel choice was checked")

    monkeypatch.setattr(llm_engine, "load_model", no_load)
    with pytest.raises(InvalidRequestError) as err:
        LLM(tiny_models["llama"], warmup=False, **{field: impl})
    assert err.value.field == field


def test_generate_refuses_an_engine_with_requests_of_its_own(llm):
    """LLM.generate runs the engine to completion: it would consume (and lose) the deltas of requests
    added through llm.engine, so it refuses to start until they are done."""
    llm.engine.add_request("mine", [3, 4, 5], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="needs it to itself"):
        llm.generate([[6, 7]], SamplingParams(max_tokens=2))
    deltas = []
    while llm.engine.has_unfinished_requests():
        deltas += llm.engine.step()
    assert [t for d in deltas for t in d.token_ids] and deltas[-1].finished.num_output_tokens == 2
    (out,) = llm.generate([[6, 7]], SamplingParams(max_tokens=2))
    assert len(out.token_ids) == 2
