"""Execution targets described as data. Emitters read capabilities, never a target's name.

This module is also the built-in plugin that registers the targets (entry point ``targets``).
"""

from __future__ import annotations

from dataclasses import dataclass

from builder.hookspecs import hookimpl
from builder.options import Precision


@dataclass(frozen=True)
class TargetCaps:
    """What one execution provider's graphs may contain."""

    name: str
    precisions: tuple[Precision, ...]       # -p values this target builds; the first is -p's default
    # float type of activations, KV cache and unquantized weights when -p is int4/int8
    quantized_float: Precision = Precision.FP32
    attention: str = "gqa"                  # "gqa": com.microsoft GroupQueryAttention
    # How padding reaches attention: "bias" (seqlens_k = padded length, an additive mask; exact
    # for left and right padding) or "seqlens" (seqlens_k = each row's token count: GQA's own
    # right-padding convention, for kernels without an attention_bias input)
    attention_mask: str = "bias"
    skip_norm: bool = True                  # SkipSimplifiedLayerNormalization fuses residual adds
    pack_matmuls: bool = True               # default for unpack_matmul: one GEMM for q/k/v
    # Static-shape pipeline (embeddings, prefill, decode, lm_head graphs) instead of one decoder
    static_shapes: bool = False
    genai_provider: str | None = None       # provider_options entry in genai_config.json (None: CPU)
    nbits_accuracy_level: int = 4           # MatMulNBits default: int8 activations on CPU
    description: str = ""


CPU = TargetCaps(
    name="cpu",
    precisions=(Precision.FP32, Precision.FP16, Precision.INT4, Precision.INT8),
    description="onnxruntime CPU EP: GroupQueryAttention decoder",
)

CUDA = TargetCaps(
    name="cuda",
    # CUDA GroupQueryAttention has no fp32 kernel; int4/int8 keep fp16 activations
    precisions=(Precision.FP16, Precision.BF16, Precision.INT4, Precision.INT8),
    attention_mask="seqlens",                     # no attention_bias on the CUDA kernel path
    genai_provider="cuda",
    nbits_accuracy_level=0,
    quantized_float=Precision.FP16,
    description="onnxruntime CUDA EP: fp16/bf16 GroupQueryAttention decoder",
)


QNN = TargetCaps(
    name="qnn",
    # fp32 graphs run at fp16 precision on the HTP; int8 = w8a16, int4 = w4a16: calibrated QDQ
    precisions=(Precision.FP16, Precision.FP32, Precision.W8A16, Precision.INT8,
                Precision.W4A16, Precision.INT4, Precision.W8A8),
    attention="decomposed",   # GroupQueryAttention is filtered off the HTP; opset-23 Attention
                              # fails to execute inside QDQ graphs
    skip_norm=False,          # SkipSimplifiedLayerNormalization is not supported by the QNN EP
    pack_matmuls=False,       # keep the checkpoint's projections; nothing to gain on HTP
    attention_mask="static",  # past_seq_len input: rows and positions are computed in-graph
    static_shapes=True,       # dynamic dims are rejected by the QNN EP
    genai_provider="qnn",
    description="Qualcomm QNN HTP: static prefill/decode graphs in an onnxruntime-genai "
                "decoder-pipeline",
)


@hookimpl
def register_targets(register):
    register(CPU)
    register(CUDA)
    register(QNN)
