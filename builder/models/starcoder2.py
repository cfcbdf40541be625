"""Starcoder2: mirrors Hugging Face ``Starcoder2ForCausalLM``.

The Llama attention with a LayerNorm (with a bias) before each sublayer and at the end, an MLP
without a gate (c_fc → GELU-tanh → c_proj), and every projection's bias under ``use_bias``
(default true). Its epsilon is ``norm_epsilon``; embeddings tied by default; onnxruntime-genai
runs the graph as a Llama one.
"""

from __future__ import annotations

from builder.models.base import LLAMA_WEIGHT_NAMES, DecoderBuilder
from builder.roles import TensorRole as R

LAYER = "model.layers.{i}."


class Starcoder2Builder(DecoderBuilder):
    architectures = ("Starcoder2ForCausalLM",)
    config_keys = frozenset({"use_bias"})
    genai_model_type = "llama"
    config_defaults = {"tie_word_embeddings": True, "rms_norm_eps": 1e-5, "use_bias": True,
                       "hidden_act": "gelu_pytorch_tanh"}
    config_aliases = {"norm_epsilon": "rms_norm_eps"}
    norm_kind = "layer"
    gated_mlp = False
    weight_names = {
        **{r: n for r, n in LLAMA_WEIGHT_NAMES.items()
           if r not in (R.GATE, R.UP, R.DOWN, R.GATE_BIAS, R.UP_BIAS, R.DOWN_BIAS)},
        R.ATTN_NORM_BIAS: LAYER + "input_layernorm.bias",
        R.MLP_NORM_BIAS: LAYER + "post_attention_layernorm.bias",
        R.UP: LAYER + "mlp.c_fc.weight", R.UP_BIAS: LAYER + "mlp.c_fc.bias",
        R.DOWN: LAYER + "mlp.c_proj.weight", R.DOWN_BIAS: LAYER + "mlp.c_proj.bias",
        R.FINAL_NORM_BIAS: "model.norm.bias",
    }

    def attention_biases(self, layer: int):
        if not self.config.flag("use_bias", True):
            return (None, None, None, None)
        return tuple(self.weight(r, layer) for r in (R.Q_BIAS, R.K_BIAS, R.V_BIAS, R.O_BIAS))

    def mlp_biases(self, layer: int):
        if not self.config.flag("use_bias", True):
            return (None, None, None)
        return None, self.weight(R.UP_BIAS, layer), self.weight(R.DOWN_BIAS, layer)
