"""Qwen2 and Qwen2.5: mirror Hugging Face ``Qwen2ForCausalLM``.

The Llama block with biases on the q, k and v projections (not on o_proj) whatever
``attention_bias`` says (transformers' Qwen2 has them always); the base class packs q/k/v and
their biases into one projection. A config without ``layer_types`` (before transformers 5)
windows only the layers from ``max_window_layers`` on (Qwen3 too).
"""

from __future__ import annotations

from builder.errors import ConfigError
from builder.models.llama import LlamaBuilder
from builder.roles import TensorRole as R


class Qwen2Builder(LlamaBuilder):
    architectures = ("Qwen2ForCausalLM",)
    config_keys = frozenset({"max_window_layers"})
    config_defaults = {"use_sliding_window": False, "max_position_embeddings": 32768}

    def attention_biases(self, layer: int):
        return (*(self.weight(r, layer) for r in (R.Q_BIAS, R.K_BIAS, R.V_BIAS)), None)

    def sliding_window(self, layer: int) -> int | None:
        c = self.config
        if c.layer_types is None and c.sliding_window is not None:
            first = c.extra.get("max_window_layers", 28)  # as transformers fills layer_types
            if not isinstance(first, int) or isinstance(first, bool) or first < 0:
                raise ConfigError(f"config.json: max_window_layers must be a layer count, got "
                                  f"{first!r:.80}")
            if layer < first:
                return None
        return LlamaBuilder.sliding_window(self, layer)  # (Qwen3 shares this method)
