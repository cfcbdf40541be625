"""Gemma 2 and Gemma 3 (text): mirror Hugging Face ``Gemma2ForCausalLM`` and
``Gemma3ForCausalLM``.

The Llama block with: embeddings times sqrt(hidden_size); RMSNorms that scale by (1 + weight);
a norm on the attention's and on the MLP's output (before each residual add) beside the
pre-norms; a GELU-tanh MLP (``hidden_activation``); attention scaled by
query_pre_attn_scalar ** -0.5; sliding-window and global layers (``layer_types``; in configs
written before transformers 5, every ``sliding_window_pattern``-th layer global). Gemma 2
soft-caps the attention scores and the final logits; Gemma 3 norms q and k per head and rotates
its local and global layers differently (``rope_parameters`` by layer type, or an older
config's ``rope_local_base_freq``).
"""

from __future__ import annotations

import math
from typing import Any


from builder.config import DecoderConfig
from builder.errors import ConfigError
from builder.models.base import LLAMA_WEIGHT_NAMES
from builder.models.llama import LlamaBuilder
from builder.roles import TensorRole as R

POST_ATTN, POST_MLP = "post_attention_norm", "post_feedforward_norm"


class Gemma2Config(DecoderConfig):
    pattern = 2  # without layer_types: every pattern-th layer global, the others local

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> DecoderConfig:
        """Configs written before transformers 5 have no layer_types: transformers fills them
        in, every ``sliding_window_pattern``-th layer global (Gemma 2: every other one)."""
        if d.get("layer_types") is None and isinstance(d.get("num_hidden_layers"), int):
            every = d.get("sliding_window_pattern", d.get("_sliding_window_pattern", cls.pattern))
            if not isinstance(every, int) or isinstance(every, bool) or every < 1:
                raise ConfigError(f"{source}: sliding_window_pattern must be a positive "
                                  f"integer, got {every!r}")
            d = {**d, "layer_types": ["sliding_attention" if (i + 1) % every else
                                      "full_attention" for i in range(d["num_hidden_layers"])]}
        return super().from_hf(d, source)


class Gemma3Config(Gemma2Config):
    pattern = 6

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> DecoderConfig:
        """Configs written before transformers 5 give the global layers' rotary as rope_theta
        and rope_scaling, and the local layers' base as rope_local_base_freq (defaults: 1e6
        and 1e4, as transformers has them): rope_parameters by layer type."""
        params = d.get("rope_parameters")
        if not isinstance(params, dict):  # older config: rope_scaling is the global layers'
            scaling = d.get("rope_scaling") or {}
            params = {"sliding_attention": {"rope_type": "default"},
                      "full_attention": {"rope_type": "default", **(
                          scaling if isinstance(scaling, dict) else {"rope_scaling": scaling})}}
            d = {k: v for k, v in d.items() if k != "rope_scaling"}
        if all(isinstance(v, dict) for v in params.values()):  # each type's theta, if unsaid
            thetas = {"sliding_attention": d.get("rope_local_base_freq", 1e4),
                      "full_attention": d.get("rope_theta", 1e6)}
            params = {kind: {"rope_theta": thetas[kind], **sub} if kind in thetas else sub
                      for kind, sub in params.items()}  # (another type: refused later)
        d = {**d, "rope_parameters": params}
        return super().from_hf(d, source)


class Gemma2Builder(LlamaBuilder):
    architectures = ("Gemma2ForCausalLM",)
    config_keys = frozenset({"query_pre_attn_scalar", "attn_logit_softcapping",
                             "final_logit_softcapping", "use_bidirectional_attention",
                             "sliding_window_pattern", "_sliding_window_pattern"})
    config_class = Gemma2Config
    config_defaults = {"tie_word_embeddings": True, "head_dim": 256, "query_pre_attn_scalar": 256,
                       "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 4096,
                       "max_position_embeddings": 8192, "attn_logit_softcapping": 50.0,
                       "final_logit_softcapping": 30.0}
    weight_names = {
        **LLAMA_WEIGHT_NAMES,
        R.MLP_NORM: "model.layers.{i}.pre_feedforward_layernorm.weight",
        POST_ATTN: "model.layers.{i}.post_attention_layernorm.weight",
        POST_MLP: "model.layers.{i}.post_feedforward_layernorm.weight",
    }
    norm_offset = 1.0  # Gemma's norms scale by 1 + weight

    @classmethod
    def role_shape(cls, c: DecoderConfig, role: R | str) -> tuple[int, ...]:
        return (c.hidden_size,) if role in (POST_ATTN, POST_MLP) else super().role_shape(c, role)

    def check_supported(self) -> None:
        super().check_supported()
        if self.config.flag("use_bidirectional_attention"):
            raise ConfigError("config.json: use_bidirectional_attention=true (attention that "
                              "sees later tokens, for embedding models) is not supported")

    def embedding_multiplier(self) -> float:
        return math.sqrt(self.config.hidden_size)

    def attention_scale(self) -> float:
        return self.config.number("query_pre_attn_scalar", self.config.head_dim) ** -0.5

    def attention_softcap(self) -> float | None:
        return self.config.number("attn_logit_softcapping")

    def final_logit_softcap(self) -> float | None:
        return self.config.number("final_logit_softcapping")

    def attention_output(self, layer: int, a: str) -> str:
        return self.norm("post_attention_norm", a, POST_ATTN, layer)

    def mlp_output(self, layer: int, m: str) -> str:
        return self.norm("post_feedforward_layernorm", m, POST_MLP, layer)


class Gemma3Builder(Gemma2Builder):
    architectures = ("Gemma3ForCausalLM",)
    config_keys = frozenset({"rope_local_base_freq"})
    config_class = Gemma3Config
    config_defaults = {**Gemma2Builder.config_defaults, "max_position_embeddings": 131072,
                       "attn_logit_softcapping": None, "final_logit_softcapping": None}
    qk_norm = True
