"""Qwen2 and Qwen2.5: mirror Hugging Face ``Qwen2ForCausalLM``.

The Llama block with biases on the q, k and v projections (not on o_proj) whatever
``attention_bias`` says (transformers' Qwen2 has them always); the base class packs q/k/v and
their biases into one projection. A config without ``layer_types`` (before transformers 5)
windows only the layers from ``max_window_layers`` on (Qwen3 too).
"""

from __future__ import annotations

from builder.models.llama import LlamaBuilder
from builder.roles import TensorRole as R


class Qwen2Builder(LlamaBuilder):
    architectures = ("Qwen2ForCausalLM",)

    def attention_biases(self, layer: int):
        return (*(self.weight(r, layer) for r in (R.Q_BIAS, R.K_BIAS, R.V_BIAS)), None)

    def sliding_window(self, layer: int) -> int | None:
        c = self.config
        if c.layer_types is None and layer < c.number("max_window_layers", 28):
            return None  # as transformers fills layer_types from max_window_layers
        return LlamaBuilder.sliding_window(self, layer)  # (Qwen3 shares this method)
