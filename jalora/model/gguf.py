"""GGUF (llama.cpp) models: converted once into an HF-layout directory the engine loads like any other.

`LLM("model.gguf")` (and `EngineConfig(model="model.gguf")`, `jalora serve --model model.gguf`) goes
through `resolve_model_dir`, which the engine calls before it reads anything: a path ending in .gguf
becomes `cache_dir()/gguf/<sha256 of the file>/`, converted on first use and reused after (the next
start reads no GGUF, dequantizes nothing and builds no tokenizer). The directory holds

    config.json              llama.* metadata -> HF LlamaConfig fields
    generation_config.json   bos / eos ids
    model.safetensors        float32 weights (sharded with an index past SHARD_BYTES)
    tokenizer.json           transformers' GGUF tokenizer conversion (when the file has a tokenizer)
    tokenizer_config.json    special tokens and the chat template (tokenizer.chat_template)
    jalora-gguf.json         the source file, its SHA-256 and the converter version

and is built in a temporary directory beside its final name, then renamed, so it is complete or absent.

What is converted: architecture "llama" (which llama.cpp also uses for Mistral-style and SmolLM models),
tensors of the types in SUPPORTED_TENSOR_TYPES, dequantized to float32 by the gguf library
(`gguf.quants.dequantize`, the same code transformers' GGUF loader runs for llama, so both sides see the
same values bit for bit). Anything else is refused with one InvalidRequestError on the field "model"
that names the problem, raised before the slow work (tokenizer, dequantization) wherever it can be
known from the header: a truncated file, an unsupported architecture, tensor type or tensor name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from jalora.cache import cache_dir, install_dir, marker_says
from jalora.errors import InvalidRequestError

SUPPORTED_ARCHITECTURES = ("llama",)
# ggml type names (gguf.GGMLQuantizationType) the converter dequantizes with the gguf library.
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip
# Bump when the converted directory changes for the same GGUF file: directories of another version are
# converted again (and replaced) on their next use.
CONVERTER_VERSION = 1
MARKER = "jalora-gguf.json"
SHARD_BYTES = 4 << 30  # float32 bytes per safetensors file

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def _error(message: str) -> InvalidRequestError:
    return InvalidRequestError("model", message)


def is_gguf(model: str | os.PathLike) -> bool:
    """Whether `model` names a GGUF file (by its suffix)."""
    return os.fspath(model).lower().endswith(".gguf")


def resolve_model_dir(model: str) -> str:
    """The HF-layout directory to load for `model`: itself, or for a .gguf file its converted directory
    (converted now if the cache has none)."""
    return str(converted_dir(model)) if is_gguf(model) else model


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def converted_dir(gguf_path: str | os.PathLike, progress: bool = True) -> Path:
    """`cache_dir()/gguf/<sha256>/` for the GGUF file at `gguf_path`, converting it first unless a
    complete directory of this converter version is there."""
    path = Path(gguf_path)
    if not path.is_file():
        raise _error(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    sha = file_sha256(path)
    final = cache_dir() / "gguf" / sha
    if _is_current(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:16]}.", suffix=".part", dir=final.parent))
    try:
        if progress:
            print(f"jalora: converting {path} (once; cached in {final})", file=sys.stderr, flush=True)
        convert_gguf(path, tmp, progress=progress)
        _write_json(tmp / MARKER, {"converter_version": CONVERTER_VERSION, "sha256": sha, "source": str(path)})
        install_dir(tmp, final, _is_current)  # replaces a directory of another converter version
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _is_current(d: Path) -> bool:
    return marker_says(d, MARKER, "converter_version", CONVERTER_VERSION)


# -- reading -------------------------------------------------------------------------------------------


class _Truncated(Exception):
    def __init__(self, needed: int):
        self.needed = needed


def _open(path: Path):
    """A gguf.GGUFReader over `path`, or one clear error when the file is not a whole GGUF file."""
    import gguf

    class Reader(gguf.GGUFReader):
        # The library reads every field, tensor info and tensor's bytes through `_get`, and on a short
        # file fails later with a reshape or index error; checking the end here names the problem.
        def _get(self, offset, dtype, count=1, *args, **kwargs):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > self.data.size:
                raise _Truncated(end)
            return super()._get(offset, dtype, count, *args, **kwargs)

    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        if size < 4:
            raise _error(f"{path} is truncated: it has {size} bytes, not even the GGUF magic")
        raise _error(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        return Reader(path)
    except _Truncated as e:
        message = f"{path} is truncated: it has {size} bytes, its header and tensors need at least {e.needed}"
        raise _error(message) from None
    except (ValueError, KeyError, IndexError) as e:  # bad version, unknown type id, duplicate names...
        raise _error(f"{path} is not a valid GGUF file: {e}") from e


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def _require(reader, key: str, path: Path):
    value = _field(reader, key)
    if value is None:
        raise _error(f"{path} has no {key} (a llama GGUF needs it)")
    return value


def _float(value) -> float:
    """A float32 metadata value as the shortest decimal that reads back as the same float32 (1e-05,
    not 9.999999747378752e-06)."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


# -- config ----------------------------------------------------------------------------------------------


def hf_config(reader, path: Path) -> dict:
    """HF LlamaConfig fields from the llama.* metadata (checks what jalora's decoder cannot run)."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise _error(f"{path} has architecture {arch!r}; jalora converts {list(SUPPORTED_ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise _error(
            f"{path} has rope_freqs.weight (Llama-3 style rope frequency scaling), which the converter does "
            "not support yet"
        )
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    hidden = int(_require(reader, "llama.embedding_length", path))
    heads = int(_require(reader, "llama.attention.head_count", path))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    head_dim = int(_field(reader, "llama.attention.key_length", 0) or hidden // heads)
    rope_dim = int(_field(reader, "llama.rope.dimension_count", head_dim))
    value_dim = int(_field(reader, "llama.attention.value_length", head_dim))
    if rope_dim != head_dim or value_dim != head_dim:
        raise _error(
            f"{path}: rope dimension {rope_dim} and value length {value_dim} must equal the head dimension "
            f"{head_dim} (partial rotary embeddings are not supported)"
        )
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise _error(f"{path} has no token_embd.weight")
    vocab = int(embed.shape[1])  # ggml order: (hidden, vocab)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(_require(reader, "llama.feed_forward_length", path)),
        "num_hidden_layers": int(_require(reader, "llama.block_count", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float(_require(reader, "llama.attention.layer_norm_rms_epsilon", path)),
        "rope_theta": _float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if scaling == "linear":
        factor = _float(_require(reader, "llama.rope.scaling.factor", path))
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    elif scaling not in ("none", None):
        raise _error(f"{path} uses rope scaling {scaling!r}; jalora converts none or linear")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if bos is not None:
        cfg["bos_token_id"] = int(bos)
    eos = eos_token_ids(reader)
    if eos:
        cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        cfg["pad_token_id"] = int(pad)
    return cfg


def eos_token_ids(reader) -> list[int]:
    """The tokens that end a generation: eos, then llama.cpp's end-of-turn / end-of-message ids."""
    ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = _field(reader, key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


# -- tensors ---------------------------------------------------------------------------------------------


def _hf_tensor(name: str, cfg: dict) -> tuple[str, tuple[int, ...], int | None]:
    """(HF name, HF shape, heads to un-permute by or None) of GGUF tensor `name`; KeyError if unknown."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name], (d,) if name == "output_norm.weight" else (v, d), None
    m = _LAYER_NAME.fullmatch(name)
    if m is None or m.group(2) not in _LAYER_TENSORS or int(m.group(1)) >= cfg["num_hidden_layers"]:
        raise KeyError(name)
    kind = m.group(2)
    shape, heads = {
        "attn_norm": ((d,), None),
        "ffn_norm": ((d,), None),
        "attn_q": ((q, d), cfg["num_attention_heads"]),
        "attn_k": ((kv, d), cfg["num_key_value_heads"]),
        "attn_v": ((kv, d), None),
        "attn_output": ((d, q), None),
        "ffn_gate": ((f, d), None),
        "ffn_up": ((f, d), None),
        "ffn_down": ((d, f), None),
    }[kind]
    return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[kind]}.weight", shape, heads


def tensor_plan(reader, cfg: dict, path: Path) -> list[tuple]:
    """[(gguf tensor, HF name, HF shape, heads to un-permute by)] for every tensor, checked: names,
    types and shapes known, every tensor the model needs present. Reads no tensor data."""
    plan = []
    for t in reader.tensors:
        try:
            hf_name, shape, heads = _hf_tensor(t.name, cfg)
        except KeyError:
            raise _error(f"{path}: tensor {t.name} has no place in a llama model (not supported)") from None
        if t.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
            raise _error(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}, which the converter does not "
                f"dequantize (supported: {', '.join(SUPPORTED_TENSOR_TYPES)})"
            )
        got = tuple(int(n) for n in reversed(t.shape.tolist()))
        if got != shape:
            raise _error(f"{path}: tensor {t.name} has shape {got}, the metadata implies {shape}")
        plan.append((t, hf_name, shape, heads))
    have = {p[1] for p in plan}
    needed = {_GLOBAL_TENSORS["token_embd.weight"], _GLOBAL_TENSORS["output_norm.weight"]} | {
        f"model.layers.{i}.{m}.weight" for i in range(cfg["num_hidden_layers"]) for m in _LAYER_TENSORS.values()
    }
    missing = sorted(needed - have)
    if missing:
        raise _error(f"{path} lacks {len(missing)} tensors the model needs, e.g. {missing[0]}")
    return plan


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's row permutation of a Q or K projection (rows = output features).

    HF Llama rotates query/key features with `rotate_half`: within a head of d rows, row i and row
    i + d/2 form one rotation pair. llama.cpp's RoPE rotates adjacent rows (2i, 2i+1), so a GGUF file
    written from an HF checkpoint holds each head's rows reordered from [r0 .. r(d/2-1), r(d/2) .. r(d-1)]
    to [r0, r(d/2), r1, r(d/2+1), ...]: reshape to (heads, 2, d/2, ...) and swap the two middle axes. The
    inverse views each head as (d/2, 2) pairs and swaps them back. K is permuted by its own (key/value)
    head count.
    """
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(t, shape: tuple[int, ...], heads: int | None) -> np.ndarray:
    """Tensor `t` of a reader as float32 in HF layout, un-permuted when `heads` is given."""
    from gguf.quants import dequantize as gguf_dequantize

    w = np.asarray(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    if heads is not None:
        w = unpermute_rows(w, heads)
    return np.ascontiguousarray(w)


def _write_weights(plan: list[tuple], out: Path, progress: bool) -> None:
    from safetensors.numpy import save_file
    from tqdm import tqdm

    shards, size = [[]], 0
    for entry in plan:
        nbytes = 4 * int(np.prod(entry[2]))
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    bar = tqdm(total=len(plan), desc="jalora: dequantizing", file=sys.stderr, disable=not progress)
    for shard, name in zip(shards, names):
        tensors = {}
        for t, hf_name, shape, heads in shard:
            tensors[hf_name] = dequantize(t, shape, heads)
            weight_map[hf_name] = name
            bar.update()
        save_file(tensors, str(out / name), metadata={"format": "pt"})
    bar.close()
    if n > 1:
        total = sum(4 * int(np.prod(p[2])) for p in plan)
        _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


# -- tokenizer ---------------------------------------------------------------------------------------------


def _write_tokenizer(path: Path, reader, cfg: dict, out: Path) -> None:
    """tokenizer.json from transformers' GGUF tokenizer conversion; tokenizer_config.json with the
    special tokens and the file's chat template."""
    from transformers import AutoTokenizer

    # transformers prefers a tokenizer.json beside the .gguf to the file's own vocabulary (an HF repository
    # may hold one, of another model or revision): it gets a directory holding only a link to this file.
    with tempfile.TemporaryDirectory(prefix="jalora-gguf-tokenizer-") as alone:
        link = Path(alone, "model.gguf")
        try:
            os.symlink(path.resolve(), link)
        except OSError:  # no symlinks here: a copy (the vocabulary is read, the tensors are not)
            shutil.copyfile(path, link)
        try:
            tok = AutoTokenizer.from_pretrained(alone, gguf_file=link.name)
        except Exception as e:  # transformers raises several types for tokenizers it cannot convert
            model = _field(reader, "tokenizer.ggml.model")
            raise _error(f"{path}: cannot convert its tokenizer (tokenizer.ggml.model={model!r}): {e}") from e
    backend = tok.backend_tokenizer
    _honor_special_token_flags(backend, reader, path)
    backend.save(str(out / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    # From the file's ids, not from the transformers tokenizer: 5.17 names <|im_start|> SmolLM2's eos.
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id")
        token = None if token_id is None else backend.id_to_token(int(token_id))
        if token is not None:
            tok_cfg[name] = token
    for key in ("add_bos_token", "add_eos_token"):
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            tok_cfg[key] = bool(value)
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        tok_cfg["chat_template"] = template
    _write_json(out / "tokenizer_config.json", tok_cfg)


def _honor_special_token_flags(backend, reader, path: Path) -> None:
    """Makes `backend` add BOS / EOS as the file says (tokenizer.ggml.add_bos_token / add_eos_token), as
    llama.cpp does. transformers' GGUF tokenizer conversion does not everywhere: 5.17 ignores the flags
    (a BPE vocabulary then never gets its BOS), 5.24 honours add_bos_token. Without flags, the
    conversion's own choice stands, except that a sentencepiece ("llama") vocabulary gets BOS, llama.cpp's
    default for it."""
    from tokenizers import processors

    add_bos, add_eos = _field(reader, "tokenizer.ggml.add_bos_token"), _field(reader, "tokenizer.ggml.add_eos_token")
    if add_bos is None and _field(reader, "tokenizer.ggml.model") == "llama":
        add_bos = True
    if add_bos is None and add_eos is None:
        return
    bos_id, eos_id = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    bos_id, eos_id = (None if i is None else int(i) for i in (bos_id, eos_id))
    now = backend.encode("", add_special_tokens=True).ids  # the special tokens the conversion adds
    if add_bos is None:
        add_bos = bos_id is not None and now[:1] == [bos_id]
    if add_eos is None:
        add_eos = eos_id is not None and now[-1:] == [eos_id]
    if (add_bos and bos_id is None) or (add_eos and eos_id is None):
        raise _error(f"{path} asks for a BOS/EOS token to be added but names none")
    want = ([bos_id] if add_bos else []) + ([eos_id] if add_eos else [])
    if now == want:
        return  # the conversion already does what the file asks
    bos = [(backend.id_to_token(bos_id), bos_id)] if add_bos else []
    eos = [(backend.id_to_token(eos_id), eos_id)] if add_eos else []
    single = [t for t, _ in bos] + ["$A"] + [t for t, _ in eos]
    pair = single + [f"{t}:1" for t, _ in bos] + ["$B:1"] + [f"{t}:1" for t, _ in eos]
    template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=bos + eos)
    current = backend.post_processor
    # A byte-level post-processor only trims offsets: keep it in front of the template.
    backend.post_processor = (
        processors.Sequence([current, template]) if isinstance(current, processors.ByteLevel) else template
    )
    if backend.encode("", add_special_tokens=True).ids != want:
        raise _error(f"{path}: cannot make its tokenizer add the special tokens {want} the file asks for")


# -- the conversion ------------------------------------------------------------------------------------------


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> None:
    """Writes the HF-layout directory of a GGUF file into `out_dir` (which must exist). Every check that
    needs only the header runs before the tokenizer is converted or a tensor dequantized."""
    path, out = Path(gguf_path), Path(out_dir)
    reader = _open(path)
    cfg = hf_config(reader, path)
    plan = tensor_plan(reader, cfg, path)
    if _field(reader, "tokenizer.ggml.model") is not None:
        _write_tokenizer(path, reader, cfg, out)
    _write_weights(plan, out, progress)
    _write_json(out / "config.json", cfg)
    gen = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id")}
    if "pad_token_id" in cfg:
        gen["pad_token_id"] = cfg["pad_token_id"]
    _write_json(out / "generation_config.json", {k: v for k, v in gen.items() if v is not None})


def _write_json(path: Path, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
