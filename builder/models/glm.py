"""GLM-4 (glm-4-9b) and GLM-4-0414: mirror Hugging Face ``GlmForCausalLM`` and
``Glm4ForCausalLM``.

The Llama block with gate and up stored as one ``gate_up_proj``, biases on q, k and v (not o)
under ``attention_bias`` (default true), and interleaved rotary on ``partial_rotary_factor`` of
each head (default 0.5). GLM-4-0414 adds a norm on the attention's and on the MLP's output
before each residual add. onnxruntime-genai runs both graphs as Llama ones.
"""

from __future__ import annotations

import numpy as np

from builder.config import DecoderConfig
from builder.models.base import LLAMA_WEIGHT_NAMES, DecoderBuilder
from builder.roles import TensorRole as R

POST_ATTN, POST_MLP = "post_attention_norm", "post_mlp_norm"


class GlmBuilder(DecoderBuilder):
    architectures = ("GlmForCausalLM",)
    genai_model_type = "llama"
    config_defaults = {"attention_bias": True, "partial_rotary_factor": 0.5,
                       "rms_norm_eps": 1.5625e-07, "head_dim": 128}
    rotary_interleaved = True
    weight_names = {**LLAMA_WEIGHT_NAMES,
                    R.GATE_UP: "model.layers.{i}.mlp.gate_up_proj.weight"}

    def attention_biases(self, layer: int):
        if not self.config.attention_bias:
            return (None, None, None, None)
        return (*(self.weight(r, layer) for r in (R.Q_BIAS, R.K_BIAS, R.V_BIAS)), None)

    def packed_mlp_weights(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return self.weight(R.GATE_UP, layer), self.weight(R.DOWN, layer)

    def mlp_weights(self, layer: int):
        gate_up, down = self.packed_mlp_weights(layer)
        return (*np.split(gate_up, 2), down)


class Glm4Builder(GlmBuilder):
    architectures = ("Glm4ForCausalLM",)
    weight_names = {**GlmBuilder.weight_names,
                    POST_ATTN: "model.layers.{i}.post_self_attn_layernorm.weight",
                    POST_MLP: "model.layers.{i}.post_mlp_layernorm.weight"}

    @classmethod
    def role_shape(cls, c: DecoderConfig, role):
        return (c.hidden_size,) if role in (POST_ATTN, POST_MLP) else super().role_shape(c, role)

    def attention_output(self, layer: int, a: str) -> str:
        return self.norm("post_self_attn_layernorm", a, POST_ATTN, layer)

    def mlp_output(self, layer: int, m: str) -> str:
        return self.norm("post_mlp_layernorm", m, POST_MLP, layer)
