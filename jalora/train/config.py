"""TrainConfig: every knob of adapter training in one validated dataclass.

`train_adapter(**fields)` and `jalora train` both build one (the command line derives its flags from
these fields, as `serve` does from EngineConfig). The adapter fields mean what they mean in PEFT's
`LoraConfig`; a bad value raises InvalidRequestError naming the field, before any file is read.
"""

from __future__ import annotations

import dataclasses
import os

from jalora.adapters.peft import MODULE_GROUP
from jalora.config import DTYPES, config_field, is_int, is_number, require

ATTENTION_IMPLS = ("auto", "xla", "cudnn")
SAVE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = config_field("", "HF model directory or llama .gguf file to train on (its weights stay frozen)")
    data: str = config_field("", "training data, JSON lines: {'prompt', 'response'} or {'messages', 'response'}")
    output_dir: str = config_field("", "where the PEFT adapter, the training log and the loss curve go")
    eval_data: str | None = config_field(None, "held-out JSON lines (default: eval_fraction of --data)")
    eval_fraction: float = config_field(0.1, "share of --data held out for evaluation when --eval-data is not given")
    # -- the adapter (PEFT LoraConfig's names) --
    invocation: str | None = config_field(
        None, "aLoRA invocation string, tokenized without special tokens (default: none)"
    )
    invocation_tokens: tuple[int, ...] = config_field((), "aLoRA invocation as token ids (repeatable)")
    append_invocation: bool = config_field(
        True, "append the invocation after each prompt; with --no-append-invocation each prompt must hold it"
    )
    target_modules: tuple[str, ...] = config_field(
        ("q_proj", "k_proj", "v_proj"), "projections to adapt (repeatable)", choices=tuple(MODULE_GROUP)
    )
    r: int = config_field(8, "LoRA rank")
    lora_alpha: float = config_field(16.0, "LoRA alpha: the update is scaled by alpha / r")
    use_rslora: bool = config_field(False, "scale by alpha / sqrt(r) instead (rank-stabilized LoRA)")
    lora_dropout: float = config_field(0.0, "dropout on the LoRA input during training")
    init_adapter: str | None = config_field(
        None, "start from this PEFT adapter's weights (same r and target modules; default: PEFT's initialisation)"
    )
    # -- optimisation --
    learning_rate: float = config_field(2e-4, "peak learning rate of AdamW")
    weight_decay: float = config_field(0.01, "AdamW weight decay (decoupled)")
    warmup_steps: int = config_field(10, "optimizer steps of linear warm-up, then cosine decay to 0")
    epochs: float = config_field(1.0, "passes over the training data (max_steps overrides)")
    max_steps: int | None = config_field(None, "optimizer steps (default: from epochs)")
    batch_size: int = config_field(8, "sequences per micro-batch")
    grad_accum: int = config_field(1, "micro-batches per optimizer step")
    max_grad_norm: float = config_field(1.0, "clip the gradient's global norm to this (0: no clipping)")
    seed: int = config_field(0, "seed of the adapter's initialisation, the data order and the dropout")
    append_eos: bool = config_field(True, "end each response with the model's end-of-sequence token")
    max_seq_len: int | None = config_field(None, "longest prompt + response (default: the model's)")
    # -- numerics and performance --
    dtype: str = config_field("float32", "base weights and activations (LoRA weights are float32)", choices=DTYPES)
    save_dtype: str = config_field("float32", "dtype of the exported LoRA weights", choices=SAVE_DTYPES)
    attention: str = config_field(
        "auto",
        "attention implementation: auto = cuDNN flash attention on a GPU in 16 bits, else XLA",
        choices=ATTENTION_IMPLS,
    )
    remat: bool = config_field(False, "recompute each layer in the backward pass (long sequences: less memory)")
    # -- bookkeeping --
    eval_every: int = config_field(0, "evaluate every N optimizer steps (0: only at the end)")
    save_every: int = config_field(50, "write an orbax checkpoint every N optimizer steps (0: never)")
    resume: bool = config_field(True, "continue from the latest checkpoint in output_dir if one is there")
    progress: bool = config_field(True, "show a progress bar with the loss and tokens/s")

    def __post_init__(self):
        for name in ("model", "data", "output_dir"):
            require(bool(getattr(self, name)), name, "is required")
        f = self.eval_fraction
        require(is_number(f) and 0.0 <= f < 1.0, "eval_fraction", f"must be in [0, 1), got {f!r:.40}")
        require(not (self.invocation and self.invocation_tokens), "invocation",
                "give the invocation as a string or as token ids, not both")  # fmt: skip
        require(all(is_int(t) and t >= 0 for t in self.invocation_tokens), "invocation_tokens",
                "must be non-negative token ids")  # fmt: skip
        require(self.invocation != "", "invocation", "must not be empty")
        require(self.append_invocation or self.is_alora, "append_invocation", "--no-append-invocation needs an "
                "invocation (a plain LoRA has none)")  # fmt: skip
        require(bool(self.target_modules), "target_modules", "must name at least one projection")
        bad = [m for m in self.target_modules if m not in MODULE_GROUP]
        require(not bad, "target_modules", f"{bad} are not projections ({', '.join(MODULE_GROUP)})")
        require(is_int(self.r) and self.r >= 1, "r", f"must be an integer >= 1, got {self.r}")
        for name, low, low_ok in (("lora_alpha", 0, False), ("learning_rate", 0, False), ("weight_decay", 0, True),
                                  ("epochs", 0, False), ("max_grad_norm", 0, True)):  # fmt: skip
            v = getattr(self, name)
            ok = is_number(v) and (v >= low if low_ok else v > low)
            require(ok, name, f"must be a finite number {'>=' if low_ok else '>'} {low}, got {v!r:.40}")
        d = self.lora_dropout
        require(is_number(d) and 0.0 <= d < 1.0, "lora_dropout", f"must be in [0, 1), got {d!r:.40}")
        for name, low in (("warmup_steps", 0), ("batch_size", 1), ("grad_accum", 1), ("eval_every", 0),
                          ("save_every", 0)):  # fmt: skip
            v = getattr(self, name)
            require(is_int(v) and v >= low, name, f"must be an integer >= {low}, got {v!r:.40}")
        require(self.max_steps is None or (is_int(self.max_steps) and self.max_steps >= 1), "max_steps",
                f"must be an integer >= 1, got {self.max_steps!r:.40}")  # fmt: skip
        require(self.max_seq_len is None or (is_int(self.max_seq_len) and self.max_seq_len >= 2), "max_seq_len",
                "must be an integer >= 2")  # fmt: skip
        require(is_int(self.seed) and 0 <= self.seed < 2**32, "seed", f"must be an integer in [0, 2**32), got "
                f"{self.seed!r:.40}")  # fmt: skip
        for name in ("append_invocation", "use_rslora", "append_eos", "remat", "resume", "progress"):
            require(isinstance(getattr(self, name), bool), name, f"must be a bool, got {getattr(self, name)!r:.40}")
        for name, choices in (("dtype", DTYPES), ("save_dtype", SAVE_DTYPES), ("attention", ATTENTION_IMPLS)):
            require(getattr(self, name) in choices, name, f"must be one of {', '.join(choices)}, got "
                    f"{getattr(self, name)!r:.40}")  # fmt: skip
        require(not os.path.exists(self.output_dir) or os.path.isdir(self.output_dir), "output_dir",
                f"{self.output_dir} is a file, not a directory")  # fmt: skip

    @property
    def is_alora(self) -> bool:
        return bool(self.invocation or self.invocation_tokens)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)
