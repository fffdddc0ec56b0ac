"""Model configuration read from a Hugging Face `config.json` (Llama, Granite, Mistral families)."""

import dataclasses
import json
import os

from jalora.errors import InvalidRequestError

SUPPORTED_MODEL_TYPES = ("llama", "granite", "mistral")
# What transformers' config class of each family takes for a field config.json leaves out (LlamaConfig,
# GraniteConfig, MistralConfig); a null num_key_value_heads is num_attention_heads in all three.
_FAMILY_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048},
    "granite": {"max_position_embeddings": 2048},
    "mistral": {"max_position_embeddings": 4096 * 32, "num_key_value_heads": 8, "sliding_window": 4096},
}


# ModelConfig's names that config.json spells otherwise
_HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads"}  # fmt: skip
# Keys each supported RoPE scaling needs (rope_inv_freq reads them), all positive numbers.
_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _rope_kind(rope: dict) -> str:
    return rope.get("rope_type", rope.get("type", "default"))


def _same_rope(scaling: dict, params: dict) -> bool:
    """Whether a v4 `rope_scaling` says what `rope_parameters` says (its type, under either name, and its keys)."""
    return _rope_kind(scaling) == _rope_kind(params) and all(
        params.get(k) == v for k, v in scaling.items() if k not in ("type", "rope_type"))


def _rope(cfg: dict) -> tuple[float | None, dict | None]:
    """(rope_theta, rope_scaling) of a config.json: transformers 5's `rope_parameters` where it is there (its theta
    and type win over a top-level `rope_theta`), else v4's `rope_theta` and `rope_scaling`. A scaling is checked
    here, not when the first step is traced."""
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise InvalidRequestError("config.rope_parameters", "must be an object")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    field = "config.rope_scaling"
    if scaling is not None and not isinstance(scaling, dict):
        raise InvalidRequestError(field, f"must be an object, got {scaling!r:.40}")
    if params:
        if scaling is not None and not _same_rope(scaling, params):
            # (transformers' versions read such a pair differently: which one wins is not the file's to say)
            raise InvalidRequestError(field, "disagrees with rope_parameters; give one of them")
        theta = params.get("rope_theta", theta)
        scaling, field = params, "config.rope_parameters"
    if scaling is None:
        return theta, None
    kind = _rope_kind(scaling)
    if kind == "default":
        return theta, None
    if kind not in _ROPE_KEYS:
        raise InvalidRequestError(field, f"rope type {kind!r} is not supported (default, linear, llama3)")
    for key in _ROPE_KEYS[kind]:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise InvalidRequestError(f"{field}.{key}", f"the {kind} rope needs a positive number, got {value!r:.40}")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise InvalidRequestError(f"{field}.high_freq_factor", "must be above low_freq_factor")
    return theta, scaling


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
        if not isinstance(cfg, dict):
            raise InvalidRequestError("config.json", f"must be a JSON object, got {type(cfg).__name__}")
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise InvalidRequestError(
                "config.model_type", f"{model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})"
            )
        defaults = _FAMILY_DEFAULTS[model_type]
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            head_dim = cfg.get("head_dim") or hidden // heads
            rope_theta, rope_scaling = _rope(cfg)
            act = cfg.get("hidden_act", "silu")
            if act not in ("silu", "swish"):  # the decoder's MLP is SwiGLU
                raise InvalidRequestError("config.hidden_act", f"{act!r} is not supported (only silu)")
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            window = cfg.get("sliding_window", defaults.get("sliding_window")) if model_type == "mistral" else None
            # (transformers' Mistral has no biases: it reads neither field, and ignores bias tensors)
            biased = model_type != "mistral"
            attention_multiplier = cfg.get("attention_multiplier")
            if attention_multiplier is None and model_type == "granite":
                attention_multiplier = 1.0  # (transformers' GraniteConfig default; Llama's is 1 / sqrt(head_dim))
            config = cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads", defaults.get("num_key_value_heads")) or heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                max_position_embeddings=int(cfg.get("max_position_embeddings", defaults["max_position_embeddings"])),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=biased and bool(cfg.get("attention_bias", False)),
                mlp_bias=biased and bool(cfg.get("mlp_bias", False)),
                sliding_window=int(window) if window else None,
                embedding_multiplier=float(cfg.get("embedding_multiplier", 1.0)),
                residual_multiplier=float(cfg.get("residual_multiplier", 1.0)),
                attention_multiplier=None if attention_multiplier is None else float(attention_multiplier),
                logits_scaling=float(cfg.get("logits_scaling", 1.0)),
                rope_scaling=rope_scaling,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
            if isinstance(e, InvalidRequestError):
                raise
            raise InvalidRequestError("config.json", f"malformed model config: {e!r}") from e
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):  # fmt: skip
            if getattr(config, name) < 1:
                raise InvalidRequestError(f"config.{_HF_NAMES.get(name, name)}", f"must be >= 1, "
                                          f"got {getattr(config, name)}")  # fmt: skip
        if config.num_heads % config.num_kv_heads:
            raise InvalidRequestError("config.num_key_value_heads", f"{config.num_kv_heads} does not divide "
                                      f"num_attention_heads={config.num_heads}")  # fmt: skip
        return config

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
