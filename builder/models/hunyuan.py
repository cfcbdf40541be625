"""HunYuan dense (Hunyuan-0.5B to 7B): mirrors Hugging Face ``HunYuanDenseV1ForCausalLM``.

The Llama block with q and k normed per head *after* rotary (``query_layernorm``,
``key_layernorm``): ``qk_norm_after_rotary``, which every target's lowering applies right after
its rotary. The released checkpoints' rotary, labelled ``dynamic`` with an ``alpha``, is a
fixed NTK stretch of the base: theta x alpha ** (head_dim / (head_dim - 2)), whatever the
length. onnxruntime-genai runs the graph as a Llama one.
"""

from __future__ import annotations

import dataclasses

from builder.config import RopeConfig
from builder.models.base import LLAMA_WEIGHT_NAMES
from builder.models.llama import LlamaBuilder
from builder.roles import TensorRole as R


class HunYuanDenseV1Builder(LlamaBuilder):
    architectures = ("HunYuanDenseV1ForCausalLM",)
    genai_model_type = "llama"
    config_defaults = {"rms_norm_eps": 1e-5}
    config_keys = frozenset({"eod_token_id"})  # (a token id: generation's, not the graph's)
    qk_norm = True
    qk_norm_after_rotary = True
    weight_names = {**LLAMA_WEIGHT_NAMES,
                    R.Q_NORM: "model.layers.{i}.self_attn.query_layernorm.weight",
                    R.K_NORM: "model.layers.{i}.self_attn.key_layernorm.weight"}

    def rope(self, layer: int) -> RopeConfig | None:
        rope = super().rope(layer)
        alpha = rope.params.get("alpha") if rope is not None else None
        if rope is None or rope.type != "dynamic" or not alpha:
            return rope
        hd = self.config.head_dim
        params = {k: v for k, v in rope.params.items() if k not in ("alpha", "factor")}
        return dataclasses.replace(rope, theta=rope.theta * float(alpha) ** (hd / (hd - 2)),
                                   type="default", params=params)
