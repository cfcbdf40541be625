"""Qwen2: mirrors Hugging Face ``Qwen2ForCausalLM``.

The Llama block with biases on the q, k and v projections (not on o_proj), and no q/k norm.
Only the weights differ from Llama, so the only override is ``attention_biases``; the base class
packs q/k/v (and their biases) into one projection in front of GroupQueryAttention.
"""

from __future__ import annotations

from builder import TensorRole
from builder.models import LlamaBuilder


class Qwen2Builder(LlamaBuilder):
    architectures = ("Qwen2ForCausalLM",)

    def attention_biases(self, layer):
        q, k, v = (self.weight(role, layer) for role in
                   (TensorRole.Q_BIAS, TensorRole.K_BIAS, TensorRole.V_BIAS))
        return q, k, v, None  # o_proj has no bias
