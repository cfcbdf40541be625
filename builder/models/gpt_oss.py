"""GPT-OSS: mirrors Hugging Face ``GptOssForCausalLM``.

The mixture-of-experts template (``builder.models.moe``) with:

- attention sinks: a learned logit per head in every softmax's denominator
  (``self_attn.sinks``: GroupQueryAttention's ``head_sink`` input), biases on q, k, v and o,
  sliding-window layers alternating with full ones (``layer_types``), YaRN rotary;
- a router with a bias, whose top k logits are softmaxed (the same as the renormalized top k
  of the softmax over all experts, which onnxruntime's MoE computes);
- experts stored stacked: ``gate_up_proj`` [experts, hidden, 2 x intermediate] with gate and up
  in alternate columns (the fused, interleaved layout MoE takes, transposed) and its bias,
  ``down_proj`` [experts, intermediate, hidden] and its bias; read an expert at a time;
- the experts' SwiGLU (up + 1) * gate * sigmoid(1.702 gate), gate clamped at ``swiglu_limit``
  from above and up to ±limit (MoE's activation_alpha, activation_beta, swiglu_limit).

The released checkpoints store the experts in MXFP4 (``quantization_config`` quant_method
"mxfp4"): ``gate_up_proj_blocks`` [experts, 2I, hidden / 32, 16] (two 4-bit e2m1 codes a byte,
the low nibble first) and ``gate_up_proj_scales`` [experts, 2I, hidden / 32] (a power of two
per block of 32, 2^(s - 127)), ``down_proj_*`` alike; an expert at a time is decoded to its
exact values ([2I, hidden] rows, gate and up interleaved, as MoE takes them), as transformers
decodes them. cpu and cuda, float experts or -p int4 (QMoE: the decoded experts rounded again
onto int4 blocks). -e qnn refuses the model (routed experts, sinks).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from builder.config import DecoderConfig
from builder.errors import ConfigError
from builder.models.base import LLAMA_WEIGHT_NAMES
from builder.models.moe import MoeBuilder
from builder.ops.moe import SwiGLU
from builder.roles import TensorRole as R

MLP = "model.layers.{i}.mlp."
GATE_UP, DOWN = "experts_gate_up", "experts_down"  # the stacked experts' own roles
GATE_UP_BIAS, DOWN_BIAS = GATE_UP + "_bias", DOWN + "_bias"
ROUTER_BIAS, SINKS = "router_bias", "attention_sinks"
MXFP4 = {GATE_UP: ("experts_gate_up_blocks", "experts_gate_up_scales"),
         DOWN: ("experts_down_blocks", "experts_down_scales")}
# the 16 values of a 4-bit e2m1 code (sign, 2 exponent bits, 1 mantissa bit)
FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
STACKS = {R.EXPERT_GATE: GATE_UP, R.EXPERT_UP: GATE_UP, R.EXPERT_DOWN: DOWN}
YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 4096}


class GptOssConfig(DecoderConfig):
    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> DecoderConfig:
        """Without layer_types, even layers slide and odd ones attend to everything, as
        transformers fills them."""
        if d.get("layer_types") is None and isinstance(d.get("num_hidden_layers"), int):
            d = {**d, "layer_types": ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                      for i in range(d["num_hidden_layers"])]}
        if d.get("rope_parameters") is None and d.get("rope_scaling") is None:
            d = {**d, "rope_parameters": YARN}  # (GptOssConfig's, only where none is given)
        return super().from_hf(d, source)


class GptOssBuilder(MoeBuilder):
    architectures = ("GptOssForCausalLM",)
    config_class = GptOssConfig
    genai_model_type = "gptoss"
    config_keys = frozenset({"swiglu_limit", "swiglu_alpha", "experts_per_token",
                             "initial_context_length", "quantization_config"})
    # GptOssConfig's values for the keys a config.json may leave out
    config_defaults = {"attention_bias": True, "rms_norm_eps": 1e-5, "head_dim": 64,
                       "sliding_window": 128, "max_position_embeddings": 131072,
                       "rope_theta": 150000.0}
    experts_fields = ("num_local_experts",)
    expert_size_field = None  # the experts are intermediate_size wide
    weight_names = {**{r: n for r, n in LLAMA_WEIGHT_NAMES.items()
                       if r not in (R.GATE, R.UP, R.DOWN, R.GATE_BIAS, R.UP_BIAS, R.DOWN_BIAS)},
                    R.ROUTER: MLP + "router.weight", ROUTER_BIAS: MLP + "router.bias",
                    GATE_UP: MLP + "experts.gate_up_proj", DOWN: MLP + "experts.down_proj",
                    GATE_UP_BIAS: MLP + "experts.gate_up_proj_bias",
                    DOWN_BIAS: MLP + "experts.down_proj_bias",
                    SINKS: "model.layers.{i}.self_attn.sinks",
                    **{role: MLP + f"experts.{stack}_{part}"
                       for stack, roles in (("gate_up_proj", MXFP4[GATE_UP]),
                                            ("down_proj", MXFP4[DOWN]))
                       for part, role in zip(("blocks", "scales"), roles)}}

    @classmethod
    def role_shape(cls, c: DecoderConfig, role):
        experts, h, i = cls.num_experts(c), c.hidden_size, c.intermediate_size
        own = {GATE_UP: (experts, h, 2 * i), DOWN: (experts, i, h),
               GATE_UP_BIAS: (experts, 2 * i), DOWN_BIAS: (experts, h),
               ROUTER_BIAS: (experts,), SINKS: (c.num_attention_heads,)}
        for stack, (n, k) in ((GATE_UP, (2 * i, h)), (DOWN, (h, i))):  # MXFP4: [N, K] per expert
            blocks, scales = MXFP4[stack]
            own[blocks], own[scales] = (experts, n, k // 32, 16), (experts, n, k // 32)
        return own[role] if role in own else super().role_shape(c, role)

    def weight_name(self, role, layer=None, expert=None) -> str:
        """An expert's projection is named by the stack that holds it."""
        return super().weight_name(STACKS.get(role, role), layer, expert)

    def check_supported(self) -> None:
        super().check_supported()
        c = self.config
        q = c.extra.get("quantization_config")
        if q is not None and (not isinstance(q, dict) or q.get("quant_method") != "mxfp4"):
            raise ConfigError(f"config.json: quantization_config {q!r}: of GPT-OSS's "
                              "pre-quantized checkpoints only MXFP4 experts are read")
        if c.integer("experts_per_token", self.top_k()) != self.top_k():  # (both in released
            # configs; transformers reads num_experts_per_tok)
            raise ConfigError(f"config.json: experts_per_token={c.extra['experts_per_token']} "
                              f"and num_experts_per_tok={self.top_k()} disagree")
        if c.intermediate_size % 32 or c.hidden_size % 32:
            raise ConfigError("config.json: MXFP4 experts need hidden_size and "
                              "intermediate_size to be multiples of 32")

    def mxfp4(self, layer: int) -> bool:
        """Whether the checkpoint stores ``layer``'s experts in MXFP4 (as released)."""
        return self.weight_name(MXFP4[GATE_UP][0], layer) in self.weights

    def expert_dtype(self, layer: int, fused: bool) -> str:
        # (MXFP4 codes times powers of two: exact in bfloat16, which transformers decodes to)
        return "BF16" if self.mxfp4(layer) else \
            self.weights.dtype(self.weight_name(GATE_UP if fused else DOWN, layer))


    def swiglu(self) -> SwiGLU:
        c = self.config
        return SwiGLU(alpha=c.number("swiglu_alpha", 1.702), beta=1.0,
                      limit=c.number("swiglu_limit", 7.0))

    def router_bias(self, layer: int):
        return self.weight(ROUTER_BIAS, layer), self.weight_name(ROUTER_BIAS, layer)

    def attention_sinks(self, layer: int):
        return self.weight(SINKS, layer), self.weight_name(SINKS, layer)

    def expert_biases(self, layer: int) -> tuple[str, str]:
        return tuple(self.gb.initializer(self.weight_name(role, layer), self.weight(role, layer))
                     for role in (GATE_UP_BIAS, DOWN_BIAS))

    def expert_bias_values(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return self.weight(GATE_UP_BIAS, layer), self.weight(DOWN_BIAS, layer)

    def expert_weight(self, layer: int, expert: int, fused: bool) -> np.ndarray:
        """[2I, hidden] (gate and up rows interleaved, as stored in alternate columns) or
        [hidden, I]: the stack's expert, transposed; or decoded from MXFP4."""
        role = GATE_UP if fused else DOWN
        if self.mxfp4(layer):
            blocks, scales = (self.weights.code_rows(self.weight_name(r, layer),
                                                     self.expected_shape(r))[expert:expert + 1][0]
                              for r in MXFP4[role])
            return decode_mxfp4(blocks, scales)
        return np.ascontiguousarray(self.stacked_expert(role, layer, expert).T)


def decode_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 [N, K / 32, 16] bytes (two e2m1 codes each, the low nibble first) and [N, K / 32]
    E8M0 exponents → float32 [N, K]: each code's value times 2^(exponent - 127)."""
    codes = np.empty((*blocks.shape[:-1], 32), np.uint8)
    codes[..., 0::2], codes[..., 1::2] = blocks & 0x0F, blocks >> 4
    values = FP4[codes] * np.exp2(scales.astype(np.float32) - 127)[..., None]
    return values.reshape(blocks.shape[0], -1)
