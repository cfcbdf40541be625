"""Phi-3 family: mirrors Hugging Face ``Phi3ForCausalLM`` (Phi-3-mini 4k/128k, Phi-3.5-mini,
Phi-4-mini).

The Llama block with q/k/v stored fused as ``qkv_proj`` and gate/up as ``gate_up_proj``: packed
builds use them as they are, unpacked builds split them by rows. LongRoPE (``rope_scaling`` type
``longrope`` or ``su``), partial rotary (Phi-4-mini) and the sliding window (Phi-3-mini) are
handled by the shared rotary and attention emitters.
"""

from __future__ import annotations

import numpy as np

from builder.models.base import LLAMA_WEIGHT_NAMES
from builder.models.llama import LlamaBuilder
from builder.roles import TensorRole as R


class Phi3Builder(LlamaBuilder):
    architectures = ("Phi3ForCausalLM",)
    # (Phi-4-mini's hub config has these three; transformers' Phi-3 reads none of them)
    config_keys = frozenset({"full_attn_mod", "interpolate_factor", "lm_head_bias"})
    weight_names = {
        **LLAMA_WEIGHT_NAMES,
        R.QKV: "model.layers.{i}.self_attn.qkv_proj.weight",
        R.GATE_UP: "model.layers.{i}.mlp.gate_up_proj.weight",
    }

    def packed_attention_weight(self, layer: int) -> np.ndarray:
        return self.weight(R.QKV, layer)

    def attention_weights(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = self.config
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        return tuple(np.split(self.packed_attention_weight(layer), [q, q + kv]))

    def packed_mlp_weights(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return self.weight(R.GATE_UP, layer), self.weight(R.DOWN, layer)

    def mlp_weights(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        gate_up, down = self.packed_mlp_weights(layer)
        gate, up = np.split(gate_up, 2)
        return gate, up, down
