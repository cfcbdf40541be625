"""EXAONE 4.0: mirrors Hugging Face ``Exaone4ForCausalLM``.

OLMo 2's norms after attention and the MLP, with q and k normed per head (not over the whole
projection), and hybrid attention: sliding-window layers that rotate and global layers
without rotary (``layer_types``, or every ``sliding_window_pattern``-th layer global, 4 by
default, or a string of its released configs: "LLLG", L local and G global, repeated). A
config.json whose ``sliding_window`` is null has no hybrid: every layer rotates.
onnxruntime-genai runs the graph as a Llama one.
"""

from __future__ import annotations

from typing import Any

from builder.config import DecoderConfig, RopeConfig
from builder.errors import ConfigError
from builder.models.base import DecoderBuilder
from builder.models.gemma import Gemma2Config
from builder.models.olmo2 import Olmo2Builder
from builder.roles import TensorRole as R

HYBRID = "_hybrid"  # whether config.json gives a sliding_window (even one that never binds)


class Exaone4Config(Gemma2Config):
    pattern = 4

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> DecoderConfig:
        pattern, layers = d.get("sliding_window_pattern"), d.get("num_hidden_layers")
        if d.get("layer_types") is None and isinstance(pattern, str) and isinstance(layers, int):
            if not pattern or set(pattern) - {"L", "G"}:
                raise ConfigError(f"{source}: sliding_window_pattern {pattern!r} must be L "
                                  "(local) and G (global) letters")
            d = {**d, "layer_types": ["sliding_attention" if pattern[i % len(pattern)] == "L"
                                      else "full_attention" for i in range(layers)]}
        return super().from_hf({**d, HYBRID: d.get("sliding_window") is not None}, source)


class Exaone4Builder(Olmo2Builder):
    architectures = ("Exaone4ForCausalLM",)
    genai_model_type = "llama"
    config_class = Exaone4Config
    config_defaults = {"rms_norm_eps": 1e-5, "sliding_window": 4096}
    config_keys = frozenset({"sliding_window_pattern", HYBRID})
    head_norm = DecoderBuilder.head_norm  # q and k normed per head

    @classmethod
    def role_shape(cls, c: DecoderConfig, role):
        return (c.head_dim,) if role in (R.Q_NORM, R.K_NORM) else super().role_shape(c, role)

    def rope(self, layer: int) -> RopeConfig | None:
        c = self.config
        if not c.extra[HYBRID] or c.layer_types[layer] == "sliding_attention":
            return super().rope(layer)
        return None
