"""Tiny random HF checkpoints and the transformers/PEFT oracle used by the parity tests."""

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = ("llama", "granite", "mistral")
VOCAB = 97


def config_dict(family: str, **overrides) -> dict:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        eos_token_id=VOCAB - 1,
        bos_token_id=1,
    )
    if family == "granite":
        base.update(
            embedding_multiplier=3.0,
            attention_multiplier=0.2,
            residual_multiplier=0.5,
            logits_scaling=2.5,
            tie_word_embeddings=True,
        )
    if family == "mistral":
        base.update(sliding_window=24)
    return {**base, **overrides}


def make_model(path: str, family: str, seed: int = 0, **overrides) -> str:
    """Writes a random float32 model of `family` to `path` (config.json + model.safetensors); `overrides`
    change config.json fields (e.g. more heads)."""
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, **config_dict(family, **overrides))
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights make tokens depend on the input
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
    model.save_pretrained(path, safe_serialization=True)
    return path


def load_oracle(path: str):
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def oracle_prompt_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1."""
    logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


@torch.no_grad()
def oracle_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
    )  # fmt: skip
    return out[0, len(ids) :].tolist()


ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(
    base_path: str, out: str, targets, r: int = 8, alpha: float = 16, invocation=None, seed: int = 0, **extra
) -> str:
    """A PEFT (a)LoRA adapter with random A and B, written by PEFT itself."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_oracle(base_path)
    cfg = LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
        alora_invocation_tokens=invocation,
        **extra,
    )  # fmt: skip
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.15)
    peft_model.save_pretrained(out)
    return out


def load_peft_oracle(base_path: str, adapter_path: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_oracle(base_path), adapter_path).eval()


@torch.no_grad()
def oracle_run(model, ids: list[int], n: int, activation: int | None = None):
    """(prompt logprobs, n greedy tokens, logprob of each) without a KV cache, the aLoRA activation fixed."""
    seq = list(ids)
    kwargs = {}

    def logits_of(seq):
        if activation is not None:
            kwargs["alora_offsets"] = [len(seq) - activation]
        return model(torch.tensor([seq]), **kwargs).logits[0].float()

    lp = torch.log_softmax(logits_of(seq), -1)
    prompt_lps = [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    tokens, token_lps = [], []
    for _ in range(n):
        row = lp[len(seq) - 1]
        t = int(torch.argmax(row))
        tokens.append(t)
        token_lps.append(row[t].item())
        seq.append(t)
        lp = torch.log_softmax(logits_of(seq), -1)
    return prompt_lps, tokens, token_lps


def assert_matches_oracle(out, model, ids: list[int], n: int, activation: int | None = None, *,
                          prompt_logprobs: bool = False, atol: float = 1e-4, what: str = "") -> None:
    """A request's output (`logprobs=0`, n tokens) against `oracle_run`: the same n greedy tokens, each one's
    logprob within `atol`, and with `prompt_logprobs` the prompt's logprobs too."""
    ref_plp, tokens, token_lps = oracle_run(model, ids, n, activation)
    assert out.token_ids == tokens, what
    got = [step[t] for step, t in zip(out.logprobs, out.token_ids, strict=True)]
    assert np.max(np.abs(np.asarray(got) - np.asarray(token_lps))) <= atol, what
    if prompt_logprobs:
        assert len(out.prompt_logprobs) == len(ids), what
        assert np.max(np.abs(np.asarray(out.prompt_logprobs[1:]) - np.asarray(ref_plp))) <= atol, what
