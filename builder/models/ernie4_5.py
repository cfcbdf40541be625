"""ERNIE 4.5 (dense): mirrors Hugging Face ``Ernie4_5ForCausalLM``.

The Llama block with interleaved rotary, every projection's bias under ``use_bias`` (default
false; the MLP's too) and embeddings tied by default.
"""

from __future__ import annotations

from builder.models.base import DecoderBuilder
from builder.roles import TensorRole as R


class Ernie4_5Builder(DecoderBuilder):
    architectures = ("Ernie4_5ForCausalLM",)
    config_defaults = {"tie_word_embeddings": True, "rms_norm_eps": 1e-5, "head_dim": 128}
    config_keys = frozenset({"use_bias"})
    rotary_interleaved = True

    def attention_biases(self, layer: int):
        if not self.config.flag("use_bias"):
            return (None, None, None, None)
        return tuple(self.weight(r, layer) for r in (R.Q_BIAS, R.K_BIAS, R.V_BIAS, R.O_BIAS))

    def mlp_biases(self, layer: int):
        if not self.config.flag("use_bias"):
            return (None, None, None)
        return tuple(self.weight(r, layer) for r in (R.GATE_BIAS, R.UP_BIAS, R.DOWN_BIAS))
