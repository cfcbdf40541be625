"""Nemotron (Nemotron-3, Minitron): mirrors Hugging Face ``NemotronForCausalLM``.

LayerNorms with biases that scale by 1 + weight (LayerNorm1P), an MLP without a gate whose
activation is squared ReLU (``relu2``), rotary on ``partial_rotary_factor`` of each head
(default 0.5), biases under ``attention_bias`` and ``mlp_bias``; its epsilon is ``norm_eps``.
"""

from __future__ import annotations

from builder.models.base import LLAMA_WEIGHT_NAMES, DecoderBuilder
from builder.ops import relu2
from builder.roles import TensorRole as R

LAYER = "model.layers.{i}."


class NemotronBuilder(DecoderBuilder):
    architectures = ("NemotronForCausalLM",)
    config_defaults = {"rms_norm_eps": 1e-5, "partial_rotary_factor": 0.5, "hidden_act": "relu2"}
    config_aliases = {"norm_eps": "rms_norm_eps"}
    norm_kind = "layer"
    norm_offset = 1.0
    gated_mlp = False
    weight_names = {
        **LLAMA_WEIGHT_NAMES,
        R.ATTN_NORM_BIAS: LAYER + "input_layernorm.bias",
        R.MLP_NORM_BIAS: LAYER + "post_attention_layernorm.bias",
        R.FINAL_NORM_BIAS: "model.norm.bias",
    }

    def mlp_activation(self):
        return relu2 if self.config.hidden_act == "relu2" else super().mlp_activation()
