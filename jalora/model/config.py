"""Model configuration read from a Hugging Face `config.json` (Llama, Granite, Mistral families)."""

import dataclasses
import json
import os

from jalora.errors import InvalidRequestError

SUPPORTED_MODEL_TYPES = ("llama", "granite", "mistral")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    # Granite multipliers; 1.0 / None reproduce Llama.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None  # None: 1 / sqrt(head_dim)
    logits_scaling: float = 1.0
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def sm_scale(self) -> float:
        if self.attention_multiplier is not None:
            return float(self.attention_multiplier)
        return self.head_dim**-0.5

    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = d * (self.q_size + 2 * self.kv_size) + self.q_size * d + 3 * d * f + 2 * d
        emb = v * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + d

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise InvalidRequestError(
                "config.model_type", f"{model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})"
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            head_dim = cfg.get("head_dim") or hidden // heads
            rope_scaling = cfg.get("rope_scaling")
            rope_theta = cfg.get("rope_theta")
            if rope_theta is None and isinstance(cfg.get("rope_parameters"), dict):
                rope_theta = cfg["rope_parameters"].get("rope_theta")
                if cfg["rope_parameters"].get("rope_type", "default") != "default":
                    rope_scaling = cfg["rope_parameters"]
            if rope_scaling is not None:
                kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
                if kind not in ("default", "llama3", "linear"):
                    raise InvalidRequestError("config.rope_scaling", f"rope type {kind!r} is not supported")
                if kind == "default":
                    rope_scaling = None
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            window = cfg.get("sliding_window") if model_type == "mistral" else None
            return cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                sliding_window=int(window) if window else None,
                embedding_multiplier=float(cfg.get("embedding_multiplier", 1.0)),
                residual_multiplier=float(cfg.get("residual_multiplier", 1.0)),
                attention_multiplier=(
                    float(cfg["attention_multiplier"]) if cfg.get("attention_multiplier") is not None else None
                ),
                logits_scaling=float(cfg.get("logits_scaling", 1.0)),
                rope_scaling=rope_scaling,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, InvalidRequestError):
                raise
            raise InvalidRequestError("config.json", f"malformed model config: {e!r}") from e

    @classmethod
    def from_dir(cls, model_dir: str) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise InvalidRequestError("model", f"{path} does not exist")
        try:
            with open(path) as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise InvalidRequestError("config.json", f"not valid JSON in {model_dir}: {e}") from e
        return cls.from_dict(cfg)
