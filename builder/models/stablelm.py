"""StableLM (StableLM-2, StableLM-3B-4E1T, StableCode): mirrors Hugging Face
``StableLmForCausalLM``.

The Llama block with LayerNorms (with biases), rotary on ``partial_rotary_factor`` of each head
(default 0.25), q/k/v biases under ``use_qkv_bias``, and with ``use_parallel_residual`` the
attention and MLP side by side on the one input norm. ``qk_layernorm`` (a separate LayerNorm
per head) is refused. onnxruntime-genai runs the graph as a Llama one.
"""

from __future__ import annotations

from builder.errors import ConfigError
from builder.models.base import LLAMA_WEIGHT_NAMES, DecoderBuilder
from builder.roles import TensorRole as R

LAYER = "model.layers.{i}."


class StableLmBuilder(DecoderBuilder):
    architectures = ("StableLmForCausalLM",)
    config_keys = frozenset({"use_qkv_bias", "qk_layernorm", "use_parallel_residual"})
    genai_model_type = "llama"
    config_defaults = {"rms_norm_eps": 1e-5, "partial_rotary_factor": 0.25}
    config_aliases = {"layer_norm_eps": "rms_norm_eps"}
    norm_kind = "layer"
    weight_names = {
        **LLAMA_WEIGHT_NAMES,
        R.ATTN_NORM_BIAS: LAYER + "input_layernorm.bias",
        R.MLP_NORM_BIAS: LAYER + "post_attention_layernorm.bias",
        R.FINAL_NORM_BIAS: "model.norm.bias",
    }

    def check_supported(self) -> None:
        super().check_supported()
        if self.config.flag("qk_layernorm"):
            raise ConfigError("config.json: qk_layernorm=true (a LayerNorm of its own for each "
                              "head of q and k) is not supported yet")

    def parallel_block(self) -> bool:
        return self.config.flag("use_parallel_residual")

    def parallel_mlp_norm(self) -> bool:
        return False  # (the checkpoint has no post_attention_layernorm then)

    def attention_biases(self, layer: int):
        if not self.config.flag("use_qkv_bias"):
            return (None, None, None, None)
        return (*(self.weight(r, layer) for r in (R.Q_BIAS, R.K_BIAS, R.V_BIAS)), None)
