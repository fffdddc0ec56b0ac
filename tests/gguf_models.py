"""Tiny GGUF files written from tests/hf_models.py's random llama the way llama.cpp's converter writes
them (Q/K rows permuted, 1-D tensors in F32, the rest in the chosen types), and transformers' GGUF
loader as their oracle."""

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from tests import hf_models

# 97 tokens: <unk>, <s>, 93 printable characters, "Ġ" (GPT-2's byte-level space), </s> (= hf_models' eos).
TOKENS = ["<unk>", "<s>", *[chr(c) for c in range(33, 126)], "Ġ", "</s>"]
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] }}</s>{% endfor %}"
_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# A file mixing every quantized type the gguf library can write, and two float types.
MIXED = {"token_embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q5_0", "attn_output": "Q5_1",
         "ffn_gate": "F16", "ffn_up": "BF16", "ffn_down": "Q8_0", "output": "Q4_1"}  # fmt: skip


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The row order a GGUF file holds a Q or K projection in: each head's rotate-half rows (HF) as llama.cpp's
    interleaved pairs [r0, r(d/2), r1, r(d/2+1), ...]."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf_name]
    _, _, i, *module, _ = hf_name.split(".")
    return f"blk.{i}.{_HF_TO_GGUF['.'.join(module)]}.weight"


def write_gguf(model_dir: str, path: Path, types, arch: str = "llama", tokenizer: bool = True) -> Path:
    """The HF model at `model_dir` as a GGUF file; `types` is a ggml type name for every 2-D tensor, or
    a dict from the tensor kind (token_embd, attn_q, ..., output) to a type name (default F32)."""
    import gguf

    cfg = hf_models.config_dict("llama")  # what make_model wrote (its config.json nests rope_theta)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")  # transformers reads "mistral" in the name as the mistral architecture
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    w.add_vocab_size(cfg["vocab_size"])
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(TOKENS)
        w.add_token_types([2, 3, *[1] * 94, 3])
        w.add_token_merges([])
        w.add_token_scores([0.0] * len(TOKENS))  # transformers recovers merges from scores when none are listed
        w.add_bos_token_id(1)
        w.add_eos_token_id(hf_models.VOCAB - 1)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_chat_template(CHAT_TEMPLATE)
    for hf_name, t in sorted(load_file(str(Path(model_dir, "model.safetensors"))).items()):
        name = gguf_name(hf_name)
        t = t.astype(np.float32)
        if ".attn_q." in name:
            t = llama_cpp_permute(t, heads)
        elif ".attn_k." in name:
            t = llama_cpp_permute(t, kv_heads)
        kind = name.removesuffix(".weight").split(".")[-1]
        qtype = "F32" if t.ndim == 1 else (types if isinstance(types, str) else types.get(kind, "F32"))
        qt = gguf.GGMLQuantizationType[qtype]
        try:
            data = gguf.quants.quantize(t, qt)
        except NotImplementedError:  # a type the library cannot write: zero blocks (only refusals read it)
            data = np.zeros(gguf.quant_shape_to_byte_shape(t.shape, qt), np.uint8)
        w.add_tensor(name, data, raw_dtype=qt if qtype not in ("F32", "F16") else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def load_gguf_oracle(path: Path):
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()
