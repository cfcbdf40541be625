"""The checkpoint's config.json, parsed once into a typed, frozen DecoderConfig."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.errors import ConfigError

logger = logging.getLogger(__name__)

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, from either ``rope_parameters`` (transformers 5) or
    ``rope_theta`` + ``rope_scaling`` (older configs)."""

    theta: float = 10000.0
    type: str = "default"
    partial_rotary_factor: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> RopeConfig:
        params = dict(d.get("rope_parameters") or {})
        params.update(d.get("rope_scaling") or {})
        theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        partial = params.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        if d.get("original_max_position_embeddings"):  # Phi-3 keeps it at the top level
            params.setdefault("original_max_position_embeddings",
                              d["original_max_position_embeddings"])
        return cls(theta=float(theta), type=str(rope_type),
                   partial_rotary_factor=float(partial), params=params)


@dataclass(frozen=True)
class DecoderConfig:
    """What a decoder builder needs from config.json. Unknown keys stay in ``extra``."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope: RopeConfig
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    sliding_window: int | None = None   # None: full attention
    # per-layer attention kinds ("full_attention" | "sliding_attention"); None: every layer
    # uses sliding_window (Mistral, Phi-3)
    layer_types: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` as Hugging Face applies it: with ``layer_types``, only
        on "sliding_attention" layers; without, on every layer."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @classmethod
    def from_file(cls, path: Path) -> DecoderConfig:
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_hf(d, source=str(path))

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> DecoderConfig:
        archs = d.get("architectures")
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise ConfigError(f"{source}: 'architectures' must be a non-empty list of names")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
        for key in (*_REQUIRED, "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if d.get(key) is not None and (not isinstance(d[key], int) or d[key] <= 0):
                raise ConfigError(f"{source}: {key} must be a positive integer, got {d[key]!r}")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")
        head_dim = d.get("head_dim")
        if head_dim is None:
            if d["hidden_size"] % heads:
                raise ConfigError(f"{source}: hidden_size is not a multiple of "
                                  "num_attention_heads and head_dim is not given")
            head_dim = d["hidden_size"] // heads
            logger.debug("head_dim not in config: using hidden_size / num_attention_heads = %d",
                         head_dim)
        max_pos = d.get("max_position_embeddings")
        if max_pos is None:
            max_pos = 4096
            logger.info("max_position_embeddings not in config: falling back to %d", max_pos)
        window = d.get("sliding_window")
        if not d.get("use_sliding_window", True) or not window or window >= max_pos:
            window = None  # the window never binds: plain causal attention
        layer_types = d.get("layer_types")
        if layer_types is not None:
            kinds = ("full_attention", "sliding_attention")
            if (not isinstance(layer_types, list) or len(layer_types) < d["num_hidden_layers"]
                    or any(t not in kinds for t in layer_types)):
                raise ConfigError(f"{source}: layer_types must list one of {', '.join(kinds)} "
                                  f"for each of the {d['num_hidden_layers']} layers, got "
                                  f"{layer_types!r}")
            layer_types = tuple(layer_types)
        known = {f for f in cls.__dataclass_fields__} | {
            "architectures", "rope_theta", "rope_scaling", "rope_parameters",
            "partial_rotary_factor", "use_sliding_window"}
        return cls(
            architecture=archs[0],
            model_type=str(d.get("model_type", "")),
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            rope=RopeConfig.from_hf(d),
            hidden_act=str(d.get("hidden_act", "silu")),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            sliding_window=window,
            layer_types=layer_types,
            extra={k: v for k, v in d.items() if k not in known},
        )
