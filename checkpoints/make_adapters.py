"""Writes the embedded default aLoRA judges: checkpoints/default/adapters/<name>/ in PEFT format.

    python checkpoints/make_adapters.py [--model checkpoints/default]

Each judge is made by PEFT itself (LoraConfig with `alora_invocation_tokens`, get_peft_model,
save_pretrained) over the base model, with random weights from a fixed seed: the files are
reproducible and tiny (r=8), and they exercise the whole aLoRA path, but they judge nothing.
The invocation tokens are the base tokenizer's encoding of each judge's invocation string, which is
also stored in adapter_config.json (`invocation_string`) for clients that build text prompts.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "default"

# name -> (invocation string, targeted modules, seed). Granite-style role markers: the special tokens
# keep the tokenizer from merging the invocation with the text before it, so text prompts work too.
# Different targets exercise the attention and the MLP adapter groups.
JUDGES = {
    "certainty": ("<|start_of_role|>certainty<|end_of_role|>", ["q_proj", "k_proj", "v_proj", "o_proj"], 1),
    "hallucination": ("<|start_of_role|>hallucination<|end_of_role|>", ["q_proj", "v_proj"], 2),
    "safety": ("<|start_of_role|>safety<|end_of_role|>", ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], 3),
}
RANK = 8
ALPHA = 16
WEIGHT_STD = 0.05


def invocation_tokens(model_dir: str | os.PathLike, invocation: str) -> list[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    return tokenizer.encode(invocation, add_special_tokens=False).ids


def make_alora(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    invocation_tokens: list[int] | None,
    target_modules: list[str],
    seed: int,
    invocation_string: str | None = None,
    rank: int = RANK,
    alpha: int = ALPHA,
    weight_std: float = WEIGHT_STD,
) -> str:
    """Saves a random PEFT aLoRA adapter of `model_dir` to `out_dir` (a plain LoRA when
    `invocation_tokens` is None); returns out_dir."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(target_modules),
        alora_invocation_tokens=list(invocation_tokens) if invocation_tokens else None,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * weight_std)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    readme = os.path.join(out_dir, "README.md")  # PEFT's empty model card: not part of the format
    if os.path.exists(readme):
        os.remove(readme)
    path = os.path.join(out_dir, "adapter_config.json")
    with open(path) as f:
        saved = json.load(f)
    # PEFT records the local path it loaded the base from; keep the files free of this machine's paths.
    saved["base_model_name_or_path"] = os.path.basename(os.path.normpath(model_dir))
    if isinstance(saved.get("target_modules"), list):  # PEFT keeps them in a set: fix the order
        saved["target_modules"] = sorted(saved["target_modules"])
    if invocation_string is not None:
        saved["invocation_string"] = invocation_string
    with open(path, "w") as f:
        json.dump(saved, f, indent=2, sort_keys=True)
        f.write("\n")
    return str(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--out", default=None, help="default: MODEL/adapters")
    args = parser.parse_args()
    out_root = Path(args.out or Path(args.model) / "adapters")
    for name, (string, targets, seed) in JUDGES.items():
        tokens = invocation_tokens(args.model, string)
        path = make_alora(args.model, out_root / name, tokens, targets, seed, invocation_string=string)
        size = sum(f.stat().st_size for f in Path(path).iterdir())
        print(f"{path}: invocation {string!r} -> {tokens}, targets {targets}, {size} bytes")


if __name__ == "__main__":
    main()
