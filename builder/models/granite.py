"""Granite (3.x dense): mirrors Hugging Face ``GraniteForCausalLM``.

The Llama block with four multipliers from config.json: the embeddings times
``embedding_multiplier``, attention scaled by ``attention_multiplier`` (instead of
head_dim ** -0.5), each block's output times ``residual_multiplier`` before its residual add,
and the logits divided by ``logits_scaling``.
"""

from __future__ import annotations

import numpy as np

from builder.models.llama import LlamaBuilder


class GraniteBuilder(LlamaBuilder):
    architectures = ("GraniteForCausalLM",)
    config_keys = frozenset({"embedding_multiplier", "attention_multiplier",
                             "residual_multiplier", "logits_scaling"})

    def embedding_multiplier(self) -> float | None:
        m = self.config.number("embedding_multiplier", 1.0)
        return None if m == 1.0 else m

    def attention_scale(self) -> float:
        return self.config.number("attention_multiplier", 1.0)  # (transformers' default)

    def attention_output(self, layer: int, a: str) -> str:
        return self.times(a, "residual_multiplier")

    def mlp_output(self, layer: int, m: str) -> str:
        return self.times(m, "residual_multiplier")

    def logits(self, x: str) -> str:
        return self.times(super().logits(x), "logits_scaling", divide=True)

    def times(self, x: str, field: str, divide: bool = False) -> str:
        """``x`` times (or over) config.json's ``field``: as it is when that is 1."""
        m = self.config.number(field, 1.0)
        if m == 1.0:
            return x
        op = "Div" if divide else "Mul"
        with self.gb.scope(field):
            return self.gb.node(op, [x, self.gb.constant(m, np.float32)])
