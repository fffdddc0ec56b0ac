"""Checkpoint and adapter settings that transformers and PEFT read their own way: jalora computes what they compute
(prompt logprobs against the oracle) or refuses the setting naming it, never something else silently; and bad files
are one InvalidRequestError when the model is built, never a raw exception or an error while a step is traced."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from jalora import LLM, SamplingParams
from jalora.errors import InvalidRequestError
from tests import hf_models

IDS = np.random.default_rng(0).integers(2, 90, size=40).tolist()
PARAMS = SamplingParams(max_tokens=1, prompt_logprobs=True, ignore_eos=True)


def _llm(path, **kw):
    return LLM(path, num_kv_blocks=16, max_num_seqs=2, max_lora_rank=16, warmup=False, **kw)


def _edit_json(path, fn):
    with open(path) as f:
        c = json.load(f)
    new = fn(c)
    c = new if isinstance(new, list) else c  # fn mutates c in place, or returns a list to write instead
    with open(path, "w") as f:
        json.dump(c, f)


def _copy(src, dst, cfg_fn=None):
    shutil.copytree(src, dst)
    if cfg_fn:
        _edit_json(os.path.join(dst, "config.json"), cfg_fn)
    return str(dst)


def _same_as_transformers_or_refused(path, field):
    """jalora either matches transformers (prompt logprobs within 1e-4) or refuses naming `field`."""
    ref = np.asarray(hf_models.oracle_prompt_logprobs(hf_models.load_oracle(path), IDS))
    try:
        llm = _llm(path)
    except InvalidRequestError as e:
        assert field in str(e)
        return
    (out,) = llm.generate([IDS], PARAMS)
    diff = np.max(np.abs(np.asarray(out.prompt_logprobs[1:]) - ref))
    assert diff <= 1e-4, f"silently different from transformers: max logprob diff {diff}"


# --- 1. checkpoints ------------------------------------------------------------------------------------


def test_llama_hidden_act_gelu(tmp_path):
    """hidden_act='gelu': the decoder's MLP is SwiGLU only, so the setting is refused (it used to run SiLU)."""
    path = hf_models.make_model(str(tmp_path / "m"), "llama", hidden_act="gelu")
    _same_as_transformers_or_refused(path, "hidden_act")


def test_granite_without_attention_multiplier(tiny_models, tmp_path):
    """GraniteConfig's default attention_multiplier is 1.0, not Llama's 1/sqrt(head_dim)."""
    path = _copy(tiny_models["granite"], tmp_path / "g", lambda c: c.pop("attention_multiplier"))
    _same_as_transformers_or_refused(path, "attention_multiplier")


def test_rope_parameters_with_top_level_rope_theta(tmp_path):
    """rope_parameters {'rope_type': 'linear', 'factor': 4} next to a top-level rope_theta: the scaling applies,
    as in transformers (it used to be read only without a top-level rope_theta)."""
    path = hf_models.make_model(str(tmp_path / "m"), "llama", rope_scaling={"rope_type": "linear", "factor": 4.0})
    _edit_json(os.path.join(path, "config.json"), lambda c: c.__setitem__("rope_theta", 10000.0))
    _same_as_transformers_or_refused(path, "rope")


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_fields_config_json_leaves_out_are_transformers_defaults(tmp_path, family):
    """A config.json without num_key_value_heads, sliding_window or max_position_embeddings: each family's
    transformers config class has its own defaults (MistralConfig: 8 KV heads, a 4096-token sliding window and
    131072 positions; Llama and Granite: 2048 positions). jalora used to read every family as full attention,
    as many KV heads as heads and 4096 positions (a Mistral model attended past its window beyond 4096 tokens)."""
    from transformers import AutoConfig

    from jalora.model.config import ModelConfig

    cfg = {"model_type": family, "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 16}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ref, ours = AutoConfig.from_pretrained(tmp_path), ModelConfig.from_dir(str(tmp_path))
    assert ours.num_kv_heads == ref.num_key_value_heads
    assert ours.sliding_window == getattr(ref, "sliding_window", None)
    assert ours.max_position_embeddings == ref.max_position_embeddings


def test_mistral_bias_fields_are_not_read(tiny_models, tmp_path):
    """transformers' Mistral has no biases: attention_bias / mlp_bias in its config.json change nothing, and bias
    tensors in the checkpoint are ignored (jalora used to add them: a max logprob diff of several nats)."""
    path = _copy(tiny_models["mistral"], tmp_path / "m", lambda c: c.update(attention_bias=True, mlp_bias=True))
    weights = load_file(os.path.join(path, "model.safetensors"))
    for name, t in list(weights.items()):
        if name.endswith("_proj.weight"):
            weights[name.replace(".weight", ".bias")] = t[:, 0].clone() + 1.0
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    _same_as_transformers_or_refused(path, "bias")


# --- 3. bad files: one InvalidRequestError at construction, never a raw exception / error at compile ----

BAD_CONFIGS = {
    "rope_linear_without_factor": lambda c: c.__setitem__(
        "rope_parameters", {"rope_type": "linear", "rope_theta": 1e4}
    ),
    "rope_llama3_missing_keys": lambda c: c.__setitem__(
        "rope_parameters", {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}
    ),
    "rope_scaling_not_a_dict": lambda c: c.__setitem__("rope_scaling", "linear"),
    "negative_vocab_size": lambda c: c.__setitem__("vocab_size", -5),
    "zero_heads": lambda c: c.__setitem__("num_attention_heads", 0),  # (was a ZeroDivisionError)
    # transformers' versions read this pair differently (5.25: the v4 rope_scaling wins): refused
    "rope_scaling_disagrees_with_rope_parameters": lambda c: c.update(
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rope_scaling={"type": "linear", "factor": 4.0}
    ),
    "config_is_a_list": lambda c: [c],
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_bad_config_is_one_clear_error_before_compiling(tiny_models, tmp_path, name):
    path = _copy(tiny_models["llama"], tmp_path / name, BAD_CONFIGS[name])
    with pytest.raises(InvalidRequestError):
        llm = _llm(path)  # (these were raw KeyError / AttributeError / TypeError here ...)
        llm.generate([[3, 4, 5]], SamplingParams(max_tokens=1))  # (... or a KeyError while tracing the step)


@pytest.mark.parametrize("weight_map", [["a"], None])
def test_malformed_sharded_index_is_one_clear_error(tiny_models, tmp_path, weight_map):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).save_pretrained(sharded, max_shard_size="40KB")
    _edit_json(sharded / "model.safetensors.index.json", lambda c: c.__setitem__("weight_map", weight_map))
    with pytest.raises(InvalidRequestError, match="index"):  # (was a raw AttributeError)
        _llm(str(sharded))


# --- 2. adapters ---------------------------------------------------------------------------------------


def _adapter_same_as_peft_or_refused(base, adapter, field):
    ref = np.asarray(hf_models.oracle_prompt_logprobs(hf_models.load_peft_oracle(base, adapter), IDS))
    llm = _llm(base)
    try:
        llm.load_adapter("a", adapter)
    except InvalidRequestError as e:
        assert field in str(e), str(e)
        return
    (out,) = llm.generate([IDS], PARAMS, adapter="a")
    diff = np.max(np.abs(np.asarray(out.prompt_logprobs[1:]) - ref))
    assert diff <= 1e-4, f"silently different from PEFT: max logprob diff {diff}"


def test_adapter_config_without_lora_alpha(tiny_models, tmp_path):
    """PEFT's LoraConfig defaults lora_alpha to 8 (jalora used r)."""
    base = tiny_models["llama"]
    ad = hf_models.make_adapter(base, str(tmp_path / "a"), hf_models.ALL_PROJ, r=4, alpha=8)
    _edit_json(os.path.join(ad, "adapter_config.json"), lambda c: c.pop("lora_alpha"))
    _adapter_same_as_peft_or_refused(base, ad, "lora_alpha")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapter_with_base_modifying_init(tiny_models, tmp_path, init):
    """init_lora_weights='pissa'/'olora' saved unconverted: PEFT re-derives the residual base weights on load, so
    on the model's own weights such an adapter computes something else: refused."""
    base = tiny_models["llama"]
    ad = hf_models.make_adapter(base, str(tmp_path / "a"), hf_models.ALL_PROJ, init_lora_weights=init)
    _adapter_same_as_peft_or_refused(base, ad, "init_lora_weights")


def test_adapter_keys_with_adapter_name(tiny_models, tmp_path):
    """Keys '...q_proj.lora_A.default.weight' (a state dict saved with its adapter's name): PEFT loads them as the
    plain keys, and so does jalora."""
    base = tiny_models["llama"]
    ad = hf_models.make_adapter(base, str(tmp_path / "a"), ["q_proj", "v_proj"])
    f = os.path.join(ad, "adapter_model.safetensors")
    save_file({k.replace(".weight", ".default.weight"): v for k, v in load_file(f).items()}, f)
    _adapter_same_as_peft_or_refused(base, ad, "no-refusal-expected")



def test_adapter_keys_naming_another_adapter_or_repeated_are_refused(tiny_models, tmp_path):
    """PEFT leaves a weight saved under another adapter's name unloaded, and a file holding a weight twice (with and
    without `.default`) has no one reading: both are refused, naming the tensor."""
    base = tiny_models["llama"]
    for name, rename in (("other", lambda k: k.replace(".weight", ".other.weight")), ("twice", None)):
        ad = hf_models.make_adapter(base, str(tmp_path / name), ["q_proj", "v_proj"])
        f = os.path.join(ad, "adapter_model.safetensors")
        tensors = load_file(f)
        if rename is None:
            first = sorted(tensors)[0]
            tensors[first.replace(".weight", ".default.weight")] = tensors[first].clone()
        else:
            tensors = {rename(k): v for k, v in tensors.items()}
        save_file(tensors, f)
        with pytest.raises(InvalidRequestError, match="adapter_model.safetensors"):
            _llm(base).load_adapter("a", ad)
