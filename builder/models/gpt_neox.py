"""GPT-NeoX (Pythia, GPT-NeoX-20B): mirrors Hugging Face ``GPTNeoXForCausalLM``.

LayerNorms with biases; attention and MLP side by side on the stream, each with its own norm
(``use_parallel_residual``, default true; false: one after the other); q, k and v in one
``query_key_value`` tensor whose rows go head by head (each head's q, k, v in turn); a GELU MLP
without a gate; rotary on ``rotary_pct`` of each head (default 0.25) with base
``rotary_emb_base``, as older configs name them; lm_head stored as ``embed_out``.
onnxruntime-genai runs the graph as a Llama one.
"""

from __future__ import annotations

import numpy as np

from builder.models.base import DecoderBuilder
from builder.roles import TensorRole as R

LAYER = "gpt_neox.layers.{i}."
QKV_BIAS = "qkv_bias"  # the packed projection's bias, in the same head-by-head order


class GPTNeoXBuilder(DecoderBuilder):
    architectures = ("GPTNeoXForCausalLM",)
    config_keys = frozenset({"use_parallel_residual"})
    genai_model_type = "llama"
    config_defaults = {"rms_norm_eps": 1e-5, "partial_rotary_factor": 0.25, "hidden_act": "gelu",
                       "attention_bias": True, "use_parallel_residual": True}
    config_aliases = {"layer_norm_eps": "rms_norm_eps", "rotary_pct": "partial_rotary_factor",
                      "rotary_emb_base": "rope_theta"}
    norm_kind = "layer"
    gated_mlp = False
    weight_names = {
        R.EMBED: "gpt_neox.embed_in.weight",
        **{role: LAYER + name for role, name in {
            R.ATTN_NORM: "input_layernorm.weight", R.ATTN_NORM_BIAS: "input_layernorm.bias",
            R.QKV: "attention.query_key_value.weight", QKV_BIAS: "attention.query_key_value.bias",
            R.O: "attention.dense.weight", R.O_BIAS: "attention.dense.bias",
            R.MLP_NORM: "post_attention_layernorm.weight",
            R.MLP_NORM_BIAS: "post_attention_layernorm.bias",
            R.UP: "mlp.dense_h_to_4h.weight", R.UP_BIAS: "mlp.dense_h_to_4h.bias",
            R.DOWN: "mlp.dense_4h_to_h.weight", R.DOWN_BIAS: "mlp.dense_4h_to_h.bias"}.items()},
        R.FINAL_NORM: "gpt_neox.final_layer_norm.weight",
        R.FINAL_NORM_BIAS: "gpt_neox.final_layer_norm.bias",
        R.LM_HEAD: "embed_out.weight",  # (transformers 5 too: lm_head as it loads, this saved)
    }

    @classmethod
    def role_shape(cls, c, role):
        if role == QKV_BIAS:
            return (3 * c.num_attention_heads * c.head_dim,)
        return super().role_shape(c, role)

    def parallel_block(self) -> bool:
        return self.config.flag("use_parallel_residual", True)

    def by_kind(self, packed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [head, (q, k, v), head_dim] → q's rows, k's, v's."""
        c = self.config
        per_head = packed.reshape(c.num_attention_heads, 3, c.head_dim, *packed.shape[1:])
        return tuple(per_head[:, kind].reshape(-1, *packed.shape[1:]) for kind in range(3))

    def attention_weights(self, layer: int):
        return self.by_kind(self.weight(R.QKV, layer))

    def attention_biases(self, layer: int):
        if not self.config.attention_bias:
            return (None, None, None, None)
        return (*self.by_kind(self.weight(QKV_BIAS, layer)), self.weight(R.O_BIAS, layer))

    def mlp_biases(self, layer: int):
        return None, self.weight(R.UP_BIAS, layer), self.weight(R.DOWN_BIAS, layer)
