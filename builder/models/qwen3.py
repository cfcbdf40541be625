"""Qwen3: mirrors Hugging Face ``Qwen3ForCausalLM``.

The Llama block plus a per-head RMSNorm on q and k (over head_dim, before rotary). head_dim is
explicit in the config and may differ from hidden_size / num_attention_heads; small models tie
lm_head to embed_tokens, which the base class handles from ``tie_word_embeddings``.
"""

from __future__ import annotations

from builder.models.llama import LlamaBuilder
from builder.models.qwen2 import Qwen2Builder


class Qwen3Builder(LlamaBuilder):
    architectures = ("Qwen3ForCausalLM",)
    config_keys = frozenset({"max_window_layers"})
    qk_norm = True
    config_defaults = {"use_sliding_window": False, "max_position_embeddings": 32768}
    sliding_window = Qwen2Builder.sliding_window  # max_window_layers, as Qwen2
