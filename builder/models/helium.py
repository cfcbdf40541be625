"""Helium (Kyutai's Helium-1): mirrors Hugging Face ``HeliumForCausalLM``.

The Llama block with interleaved rotary (pairs 2i, 2i + 1) and ``attention_bias`` on q, k and v
only. onnxruntime-genai runs the graph as a Llama one.
"""

from __future__ import annotations

from builder.models.llama import LlamaBuilder
from builder.roles import TensorRole as R


class HeliumBuilder(LlamaBuilder):
    architectures = ("HeliumForCausalLM",)
    genai_model_type = "llama"
    config_defaults = {"rms_norm_eps": 1e-8, "head_dim": 128}
    rotary_interleaved = True

    def attention_biases(self, layer: int):
        if not self.config.attention_bias:
            return (None, None, None, None)
        return (*(self.weight(r, layer) for r in (R.Q_BIAS, R.K_BIAS, R.V_BIAS)), None)
