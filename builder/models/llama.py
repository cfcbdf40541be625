"""Llama: mirrors Hugging Face ``LlamaForCausalLM`` (and Mistral, the same block).

Everything is the DecoderBuilder default: RMSNorm pre-norm blocks, packed QKV into
GroupQueryAttention with rotary, SwiGLU MLP, untied lm_head. Llama 3.x ``rope_scaling`` type
``llama3`` is baked into the rotary caches by ``builder.ops.rotary``.
"""

from __future__ import annotations

from builder.models.base import DecoderBuilder


class LlamaBuilder(DecoderBuilder):
    architectures = ("LlamaForCausalLM", "MistralForCausalLM")
