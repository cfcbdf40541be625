"""Cohere (Command-R) and Cohere2 (Command-R7B, Command-A): mirror Hugging Face
``CohereForCausalLM`` and ``Cohere2ForCausalLM``.

Attention and the gated SiLU MLP side by side on one LayerNorm (without a bias) of the stream;
interleaved rotary (pairs 2i, 2i + 1); the logits times ``logit_scale``; embeddings tied by
default. Cohere's ``use_qk_norm`` norms each head of q and k with weights of its own per head.
Cohere2 slides a window on three layers of four (``layer_types``, or an older config's
``sliding_window_pattern``) and rotates only on those. onnxruntime-genai runs both graphs as
Llama ones.
"""

from __future__ import annotations

import numpy as np

from builder.config import DecoderConfig, RopeConfig
from builder.models.base import LLAMA_WEIGHT_NAMES, DecoderBuilder
from builder.models.gemma import Gemma2Config
from builder.ops import norm
from builder.roles import TensorRole as R


class CohereBuilder(DecoderBuilder):
    architectures = ("CohereForCausalLM",)
    config_keys = frozenset({"logit_scale", "use_qk_norm"})
    genai_model_type = "llama"
    config_defaults = {"tie_word_embeddings": True, "rms_norm_eps": 1e-5, "logit_scale": 0.0625}
    config_aliases = {"layer_norm_eps": "rms_norm_eps"}
    norm_kind = "layer"
    rotary_interleaved = True
    weight_names = {r: n for r, n in LLAMA_WEIGHT_NAMES.items() if r != R.MLP_NORM}

    @classmethod
    def has_qk_norm(cls, config: DecoderConfig) -> bool:
        return config.flag("use_qk_norm")

    @classmethod
    def role_shape(cls, c: DecoderConfig, role):
        if role in (R.Q_NORM, R.K_NORM):  # a weight per head
            heads = c.num_attention_heads if role == R.Q_NORM else c.num_key_value_heads
            return (heads, c.head_dim)
        return super().role_shape(c, role)

    def parallel_block(self) -> bool:
        return True

    def head_norm(self, name: str, x: str, role: R, layer: int, heads: int) -> str:
        """LayerNorm over each head, then each head's own weights (one [heads * hd] Mul)."""
        gb, hd = self.gb, self.config.head_dim
        weight_name = self.weight_name(role, layer)
        zeros = np.zeros(hd, np.float32) if self.target.static_shapes else None
        with gb.scope(name):
            split = gb.node("Reshape", [x, gb.constant([0, -1, hd])], "Reshape")
            normed = norm(gb, "layer", "", split, np.ones(hd, np.float32), weight_name + ".unit",
                          self.config.rms_norm_eps, zeros, weight_name + ".zero_bias")[0]
            joined = gb.node("Reshape", [normed, gb.constant([0, -1, heads * hd])], "Reshape_1")
            w = gb.initializer(weight_name, self.weight(role, layer).reshape(-1))
            return gb.node("Mul", [joined, w], "Mul")

    def logits(self, x: str) -> str:
        scale = self.config.number("logit_scale", 0.0625)
        if scale == 1.0:
            return x
        with self.gb.scope("/lm_head/logit_scale"):
            return self.gb.node("Mul", [x, self.gb.constant(scale, np.float32)])


class Cohere2Config(Gemma2Config):
    pattern = 4  # without layer_types: every 4th layer global


class Cohere2Builder(CohereBuilder):
    architectures = ("Cohere2ForCausalLM",)
    config_keys = frozenset({"sliding_window_pattern", "_sliding_window_pattern"})
    config_class = Cohere2Config
    config_defaults = {**CohereBuilder.config_defaults, "sliding_window": 4096}

    @classmethod
    def has_qk_norm(cls, config: DecoderConfig) -> bool:
        return False

    def rope(self, layer: int) -> RopeConfig | None:
        kinds = self.config.layer_types
        return super().rope(layer) if kinds[layer] == "sliding_attention" else None
