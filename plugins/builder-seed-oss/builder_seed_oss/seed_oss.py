"""Seed-OSS: mirrors Hugging Face ``SeedOssForCausalLM`` (ByteDance-Seed/Seed-OSS-36B).

The Llama block with the attention's biases under two switches: ``attention_bias`` for the q,
k and v projections and ``attention_out_bias`` for o_proj (Llama's one ``attention_bias`` covers
all four). Only the weights differ from Llama, so the only override is ``attention_biases``;
the base class packs q/k/v and their biases into one projection. onnxruntime-genai does not
know the ``seed_oss`` model type, and runs the graph as a Llama one.
"""

from __future__ import annotations

from builder import TensorRole
from builder.models import LlamaBuilder


class SeedOssBuilder(LlamaBuilder):
    architectures = ("SeedOssForCausalLM",)
    config_keys = frozenset({"attention_out_bias"})
    genai_model_type = "llama"
    config_defaults = {"attention_bias": True}  # transformers' SeedOssConfig has q/k/v biases

    def attention_biases(self, layer):
        c = self.config
        qkv = (TensorRole.Q_BIAS, TensorRole.K_BIAS, TensorRole.V_BIAS)
        q, k, v = (self.weight(role, layer) if c.attention_bias else None for role in qkv)
        out = c.flag("attention_out_bias")  # config.json fields only Seed-OSS has: c.flag, c.number
        return q, k, v, self.weight(TensorRole.O_BIAS, layer) if out else None
