"""OLMo 2: mirrors Hugging Face ``Olmo2ForCausalLM``.

The Llama block with its norms moved after the sublayers: no norm before attention or the MLP,
an RMSNorm on each one's output before its residual add (``post_attention_layernorm``,
``post_feedforward_layernorm``), and q and k normed over the whole projection (all heads at
once) before rotary.
"""

from __future__ import annotations

from builder.config import DecoderConfig
from builder.models.base import LLAMA_WEIGHT_NAMES
from builder.models.llama import LlamaBuilder
from builder.roles import TensorRole as R

POST_ATTN, POST_MLP = "post_attention_norm", "post_feedforward_norm"


class Olmo2Builder(LlamaBuilder):
    architectures = ("Olmo2ForCausalLM",)
    genai_model_type = "olmo"
    config_defaults = {"rms_norm_eps": 1e-5}
    qk_norm = True
    weight_names = {
        **{r: n for r, n in LLAMA_WEIGHT_NAMES.items() if r not in (R.ATTN_NORM, R.MLP_NORM)},
        POST_ATTN: "model.layers.{i}.post_attention_layernorm.weight",
        POST_MLP: "model.layers.{i}.post_feedforward_layernorm.weight",
    }

    @classmethod
    def role_shape(cls, c: DecoderConfig, role: R | str) -> tuple[int, ...]:
        if role in (R.Q_NORM, R.K_NORM):  # over the whole projection
            return (c.head_dim * (c.num_attention_heads if role == R.Q_NORM
                                  else c.num_key_value_heads),)
        return (c.hidden_size,) if role in (POST_ATTN, POST_MLP) else super().role_shape(c, role)

    def pre_norm(self, layer, name, role, x, residual, add="residual/Add"):
        stream = x if residual is None else self.gb.node("Add", [residual, x], add)
        return stream, stream  # the sublayer reads the stream itself

    def attention_output(self, layer: int, a: str) -> str:
        return self.norm("post_attention_layernorm", a, POST_ATTN, layer)

    def mlp_output(self, layer: int, m: str) -> str:
        return self.norm("post_feedforward_layernorm", m, POST_MLP, layer)

    def head_norm(self, name: str, x: str, role: R, layer: int, heads: int) -> str:
        return self.norm(name, x, role, layer)
