"""Phi (phi-1, phi-1.5, phi-2): mirrors Hugging Face ``PhiForCausalLM``.

A parallel block: attention and an fc1 → GELU-tanh → fc2 MLP both read one LayerNorm (with a
bias) of the stream, and their outputs are summed into one residual add. Every projection has a
bias, lm_head's included; rotary turns half of each head (``partial_rotary_factor`` 0.5 when
config.json leaves it out); ``qk_layernorm`` adds a LayerNorm on each head of q and k.
"""

from __future__ import annotations

from builder.config import DecoderConfig
from builder.models.base import DecoderBuilder
from builder.roles import TensorRole as R

LAYER = "model.layers.{i}."


class PhiBuilder(DecoderBuilder):
    architectures = ("PhiForCausalLM",)
    config_keys = frozenset({"qk_layernorm"})
    config_defaults = {"partial_rotary_factor": 0.5, "rms_norm_eps": 1e-5,
                       "hidden_act": "gelu_new"}
    config_aliases = {"layer_norm_eps": "rms_norm_eps"}
    norm_kind = "layer"
    gated_mlp = False
    weight_names = {
        R.EMBED: "model.embed_tokens.weight",
        **{role: LAYER + name for role, name in {
            R.ATTN_NORM: "input_layernorm.weight", R.ATTN_NORM_BIAS: "input_layernorm.bias",
            R.Q: "self_attn.q_proj.weight", R.Q_BIAS: "self_attn.q_proj.bias",
            R.K: "self_attn.k_proj.weight", R.K_BIAS: "self_attn.k_proj.bias",
            R.V: "self_attn.v_proj.weight", R.V_BIAS: "self_attn.v_proj.bias",
            R.O: "self_attn.dense.weight", R.O_BIAS: "self_attn.dense.bias",
            R.Q_NORM: "self_attn.q_layernorm.weight", R.Q_NORM_BIAS: "self_attn.q_layernorm.bias",
            R.K_NORM: "self_attn.k_layernorm.weight", R.K_NORM_BIAS: "self_attn.k_layernorm.bias",
            R.UP: "mlp.fc1.weight", R.UP_BIAS: "mlp.fc1.bias",
            R.DOWN: "mlp.fc2.weight", R.DOWN_BIAS: "mlp.fc2.bias"}.items()},
        R.FINAL_NORM: "model.final_layernorm.weight",
        R.FINAL_NORM_BIAS: "model.final_layernorm.bias",
        R.LM_HEAD: "lm_head.weight",
        R.LM_HEAD_BIAS: "lm_head.bias",
    }

    @classmethod
    def has_qk_norm(cls, config: DecoderConfig) -> bool:
        return config.flag("qk_layernorm")

    def parallel_block(self) -> bool:
        return True

    def attention_biases(self, layer: int):
        return tuple(self.weight(r, layer) for r in (R.Q_BIAS, R.K_BIAS, R.V_BIAS, R.O_BIAS))

    def mlp_biases(self, layer: int):
        return None, self.weight(R.UP_BIAS, layer), self.weight(R.DOWN_BIAS, layer)
