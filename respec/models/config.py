"""Model configuration: one frozen dataclass for the Llama / Qwen2 / Qwen2.5 / Qwen3 decoder family.

The runtime layout is ours (`Transformer` in transformer.py); Hugging Face `config.json` files are
mapped onto this dataclass by `ModelConfig.from_hf` and written back by `to_hf`, so a checkpoint we
save loads unchanged in transformers and vice versa. Family differences are plain fields:

    llama   : no qkv bias, no q/k norm, rope_scaling may be "llama3"
    qwen2   : qkv bias (Qwen2 and Qwen2.5 share this architecture)
    qwen3   : per-head RMSNorm on q and k before RoPE, no qkv bias, explicit head_dim

Anything we cannot run exactly (sliding-window layers, unknown RoPE types, other architectures)
is refused with an error naming the key, never silently approximated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# HF model_type -> (architectures entry, qkv bias default, q/k norm)
_FAMILIES: dict[str, tuple[str, bool, bool]] = {
    "llama": ("LlamaForCausalLM", False, False),
    "qwen2": ("Qwen2ForCausalLM", True, False),
    "qwen3": ("Qwen3ForCausalLM", False, True),
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ConfigError(ValueError):
    """A model config.json we cannot run exactly; the message names the offending key."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters`, or legacy `rope_theta` + `rope_scaling`)."""

    theta: float = 10000.0
    type: str = "default"  # one of SUPPORTED_ROPE_TYPES
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling type {self.type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if not self.theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.theta}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer. Derived sizes are properties, not fields."""

    arch: str = "qwen2"  # HF model_type: llama | qwen2 | qwen3
    vocab_size: int = 64
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim_override: int | None = None  # HF `head_dim` when it differs from hidden/heads
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool | None = None  # None: the family default (qwen2: True)
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str = "float32"  # dtype the checkpoint is stored in

    def __post_init__(self) -> None:
        if self.arch not in _FAMILIES:
            raise ConfigError(
                f"model_type {self.arch!r} is not supported (supported: {', '.join(_FAMILIES)})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim_override is None and self.hidden_size % self.num_heads:
            raise ConfigError("hidden_size must be divisible by num_attention_heads when head_dim is absent")

    # ---- derived -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads

    @property
    def qkv_bias(self) -> bool:
        return _FAMILIES[self.arch][1] if self.attention_bias is None else self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return _FAMILIES[self.arch][2]

    def num_parameters(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0)
        attn += 2 * d if self.qk_norm else 0
        mlp = 3 * h * i
        layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json mapping ---------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Map a HF config dict onto ours; refuse what we cannot run exactly, naming the key."""
        arch = hf.get("model_type")
        if arch not in _FAMILIES:
            raise ConfigError(
                f"{source}: model_type {arch!r} is not supported (supported: {', '.join(_FAMILIES)})"
            )
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        layer_types = hf.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise ConfigError(f"{source}: layer_types other than full_attention are not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported (silu only)")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(hf.get(key), int):
                raise ConfigError(f"{source}: missing or non-integer key {key!r}")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim == hf["hidden_size"] // n_heads:
            head_dim = None
        try:
            return cls(
                arch=arch,
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=n_heads,
                num_kv_heads=hf.get("num_key_value_heads") or n_heads,
                head_dim_override=head_dim,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope=_rope_from_hf(hf, source),
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=hf.get("attention_bias"),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos_ids,
                pad_token_id=hf.get("pad_token_id"),
                torch_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """A config.json that transformers loads as the same architecture."""
        rope: dict[str, Any] = {"rope_type": self.rope.type, "rope_theta": self.rope.theta}
        if self.rope.type != "default":
            rope["factor"] = self.rope.factor
        if self.rope.type in ("llama3", "yarn"):
            rope["original_max_position_embeddings"] = (
                self.rope.original_max_position_embeddings or self.max_position_embeddings
            )
        if self.rope.type == "llama3":
            rope.update(low_freq_factor=self.rope.low_freq_factor, high_freq_factor=self.rope.high_freq_factor)
        if self.rope.type == "yarn":
            for k in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self.rope, k) is not None:
                    rope[k] = getattr(self.rope, k)
            rope["truncate"] = self.rope.truncate
        eos: Any = list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0]
        out: dict[str, Any] = {
            "architectures": [_FAMILIES[self.arch][0]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": rope,
            "rope_theta": self.rope.theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos if self.eos_token_ids else None,
            "pad_token_id": self.pad_token_id,
            "dtype": self.torch_dtype,
            "use_cache": True,
        }
        if self.arch == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        if self.arch == "qwen3":
            out["attention_bias"] = self.qkv_bias
        if self.arch in ("qwen2", "qwen3"):
            out["use_sliding_window"] = False
        return out


def _rope_from_hf(hf: dict[str, Any], source: str) -> RopeConfig:
    """Read RoPE settings from either the transformers-5 `rope_parameters` or the legacy keys."""
    # transformers >= 5 writes `rope_parameters`; older files carry `rope_scaling` + `rope_theta`.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope_scaling type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    kw: dict[str, Any] = {"theta": float(theta), "type": rope_type}
    if rope_type != "default":
        if "factor" not in params and rope_type != "yarn":
            raise ConfigError(f"{source}: rope_scaling of type {rope_type!r} needs 'factor'")
        kw["factor"] = float(params.get("factor") or 1.0)
    if rope_type in ("llama3", "yarn"):
        kw["original_max_position_embeddings"] = int(
            hf.get("original_max_position_embeddings")
            or params.get("original_max_position_embeddings")
            or hf.get("max_position_embeddings", 2048)
        )
    if rope_type == "llama3":
        kw["low_freq_factor"] = float(params.get("low_freq_factor", 1.0))
        kw["high_freq_factor"] = float(params.get("high_freq_factor", 4.0))
    if rope_type == "yarn":
        for k in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
            if params.get(k) is not None:
                kw[k] = float(params[k])
        kw["truncate"] = bool(params.get("truncate", True))
    return RopeConfig(**kw)


# Named presets (gpt-fast style). The built-in actor's preset is chosen by measurement (README).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
}
