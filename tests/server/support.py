"""Support for the server, client and CLI tests (no tests here): a tiny real model with a tokenizer and
real PEFT (a)LoRA adapters."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from checkpoints.make_adapters import make_alora
from tests import hf_models

REPO = Path(__file__).resolve().parents[2]
VOCAB = hf_models.VOCAB  # 97; the last id is EOS
# name -> (invocation tokens or None for a plain LoRA, targets, seed)
ADAPTERS = {
    "judge_a": ([90, 91], ["q_proj", "k_proj", "v_proj", "o_proj"], 11),
    "judge_b": ([92, 93, 94], ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], 12),
    "plain": (None, ["q_proj", "v_proj"], 13),
}
EXTRA_ADAPTER = ("judge_c", [88, 89], ["o_proj", "down_proj"], 14)  # loaded over gRPC by the tests
# Steps a test lets the engine run while a request must stay unfinished: enough for its first tokens (prefill,
# then decode), far from the end of the tests' long requests.
STEP_LIMIT = 8


@contextlib.contextmanager
def steps_limited(worker, steps: int = STEP_LIMIT):
    """The engine thread of `worker` (an EngineWorker) runs at most `steps` more steps inside the block (it still
    takes aborts and calls); the limit is lifted on leaving it."""
    worker.limit_steps(steps)
    try:
        yield
    finally:
        worker.limit_steps(None)


def write_tokenizer(model_dir: str) -> None:
    """A word-level tokenizer: "t0" .. "t95" are ids 0..95, "</s>" is 96; words split on whitespace."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB - 1)}
    vocab["</s>"] = VOCAB - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens(["</s>"])
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>", "chat_template": CHAT_TEMPLATE}, f)


# Turns as words of the vocabulary: t1 opens a turn, t2 closes it, t3 opens the assistant's.
CHAT_TEMPLATE = (
    "{% for m in messages %}t1 {{ m['content'] }} t2 {% endfor %}{% if add_generation_prompt %}t3{% endif %}"
)


def make_model_with_adapters(root: Path) -> tuple[str, dict[str, str], str]:
    """Writes the model, its tokenizer, the ADAPTERS, and EXTRA_ADAPTER under an adapter root.

    Returns (model_dir, {name: adapter_dir}, adapter_root)."""
    model_dir = hf_models.make_model(str(root / "model"), "llama")
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["vocab_size"] == VOCAB
    write_tokenizer(model_dir)
    adapter_root = root / "adapters"
    dirs = {}
    for name, (tokens, targets, seed) in ADAPTERS.items():
        dirs[name] = make_alora(
            model_dir, adapter_root / name, tokens, targets, seed, weight_std=0.2
        )
    name, tokens, targets, seed = EXTRA_ADAPTER
    dirs[name] = make_alora(model_dir, adapter_root / name, tokens, targets, seed, weight_std=0.2)
    return model_dir, dirs, str(adapter_root)


# ---- the embedded tiny model and adapters written with numpy: a server in seconds ----------------------

TINY_VOCAB = 491  # checkpoints/default's vocabulary
# A server engine on the embedded model: no warm-up, small steps and a short max_model_len, so a request
# that passes validation costs little.
TINY_ENGINE_ARGS = dict(
    warmup=False, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, max_loras=2, max_lora_rank=8
)


def tiny_engine():
    """An LLMEngine on the embedded random model (checkpoints/default)."""
    from checkpoints import DEFAULT_MODEL_DIR
    from jalora import LLM

    return LLM(str(DEFAULT_MODEL_DIR), **TINY_ENGINE_ARGS).engine


def write_adapter(path, *, invocation=(5, 6), seed=1, config=None, edit_tensors=None) -> str:
    """A random PEFT aLoRA of the embedded model (q_proj and v_proj, r=8) at `path`; `config` entries
    replace those of adapter_config.json, `edit_tensors(tensors)` edits the weights before they are saved."""
    from safetensors.numpy import load_file, save_file

    from checkpoints import DEFAULT_MODEL_DIR
    from checkpoints.judges import write_random_alora

    out = write_random_alora(DEFAULT_MODEL_DIR, path, list(invocation), None, ["q_proj", "v_proj"], seed)
    if config:
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg.update(config)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        tensors = load_file(out / "adapter_model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, out / "adapter_model.safetensors")
    return str(out)
