"""Arcee (AFM-4.5B): mirrors Hugging Face ``ArceeForCausalLM``.

The Llama block with an MLP without a gate whose activation is squared ReLU (``relu2``).
onnxruntime-genai runs the graph as a Llama one.
"""

from __future__ import annotations

from builder.models.llama import LlamaBuilder
from builder.ops import relu2


class ArceeBuilder(LlamaBuilder):
    architectures = ("ArceeForCausalLM",)
    genai_model_type = "llama"
    config_defaults = {"hidden_act": "relu2", "rms_norm_eps": 1e-5}
    gated_mlp = False

    def mlp_activation(self):
        return relu2 if self.config.hidden_act == "relu2" else super().mlp_activation()
