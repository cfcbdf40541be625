"""OLMoE: mirrors Hugging Face ``OlmoeForCausalLM``.

The Llama block with q and k normed over the whole projection (as OLMo 2) and, in every
layer, a mixture of ``num_experts`` SwiGLU experts of ``intermediate_size``, the top
``num_experts_per_tok`` of the router's softmax renormalized only under ``norm_topk_prob``.
``clip_qkv`` (clamping q, k and v) is refused. cpu and cuda; onnxruntime-genai runs the graph
as a Llama one.
"""

from __future__ import annotations

from builder.config import DecoderConfig
from builder.errors import ConfigError
from builder.models.base import LLAMA_WEIGHT_NAMES
from builder.models.moe import MoeBuilder, expert_weight_names
from builder.roles import TensorRole as R


class OlmoeBuilder(MoeBuilder):
    architectures = ("OlmoeForCausalLM",)
    genai_model_type = "llama"
    config_defaults = {"rms_norm_eps": 1e-5}
    config_keys = frozenset({"norm_topk_prob", "clip_qkv"})
    experts_fields = ("num_experts",)
    expert_size_field = None  # the experts are intermediate_size wide
    qk_norm = True
    weight_names = {**LLAMA_WEIGHT_NAMES,
                    **expert_weight_names("mlp", "gate_proj", "up_proj", "down_proj")}

    @classmethod
    def role_shape(cls, c: DecoderConfig, role):
        if role in (R.Q_NORM, R.K_NORM):  # over the whole projection
            return (c.head_dim * (c.num_attention_heads if role == R.Q_NORM
                                  else c.num_key_value_heads),)
        return super().role_shape(c, role)

    def check_supported(self) -> None:
        if self.config.number("clip_qkv") is not None:
            raise ConfigError(f"config.json: clip_qkv={self.config.number('clip_qkv'):g} "
                              "(q, k and v clamped) is not supported yet")
        super().check_supported()

    def head_norm(self, name: str, x: str, role: R, layer: int, heads: int) -> str:
        return self.norm(name, x, role, layer)

    def normalize_top_k(self) -> bool:
        return self.config.flag("norm_topk_prob")
