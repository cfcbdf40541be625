"""Norms over the last axis: RMS (RMSNormalization) and Layer (LayerNormalization, with or
without a bias), each also fused with the residual add before it (com.microsoft
SkipSimplifiedLayerNormalization / SkipLayerNormalization)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from builder.graph import MS_DOMAIN, GraphBuilder

NORM_KINDS = ("rms", "layer")


def to_float32(gb: GraphBuilder, x: str) -> str:
    """``x`` in float32 for a norm written out of elementwise ops (sums of squares overflow
    fp16 from values of 256); as it is in a float32 graph."""
    if gb.float_dtype == np.float32:
        return x
    return gb.node("Cast", [x], "Cast_float32", to=TensorProto.FLOAT)


def float32_constant(gb: GraphBuilder, value: float) -> str:
    """A scalar for such a norm's float32 arithmetic (in an fp16 graph: its fp16 value, cast)."""
    return to_float32(gb, gb.constant(value, np.float32))


def from_float32(gb: GraphBuilder, x: str) -> str:
    """A float32 result back in the graph's float type."""
    if gb.float_dtype == np.float32:
        return x
    return gb.node("Cast", [x], "Cast_back", to=gb.float_type)


def rms_norm(gb: GraphBuilder, name: str, x: str, weight: np.ndarray, weight_name: str,
             eps: float) -> str:
    """y = x / sqrt(mean(x², -1) + eps) * weight, computed in fp32 (ONNX RMSNormalization-23)."""
    w = gb.initializer(weight_name, weight)
    with gb.scope(name):
        return gb.node("RMSNormalization", [x, w], "RMSNormalization", axis=-1,
                       epsilon=float(eps), stash_type=1)


def skip_rms_norm(gb: GraphBuilder, name: str, x: str, skip: str, weight: np.ndarray,
                  weight_name: str, eps: float) -> tuple[str, str]:
    """Residual add fused with the next RMS norm; returns (normed, x + skip)."""
    w = gb.initializer(weight_name, weight)
    with gb.scope(name):
        out = gb.node("SkipSimplifiedLayerNormalization", [x, skip, w],
                      outputs=[None, "", "", None], domain=MS_DOMAIN, epsilon=float(eps))
    return out[0], out[3]


def norm(gb: GraphBuilder, kind: str, name: str, x: str, weight: np.ndarray, weight_name: str,
         eps: float, bias: np.ndarray | None = None, bias_name: str | None = None,
         skip: str | None = None) -> tuple[str, str]:
    """(the norm of ``x`` (+ ``skip``, fused), the sum it normed). ``kind``: "rms"
    (x / rms(x) * w) or "layer" ((x - mean) / std * w (+ bias)), both in fp32."""
    if kind not in NORM_KINDS:
        raise ValueError(f"norm kind {kind!r}: one of {', '.join(NORM_KINDS)}")
    if kind == "rms":
        if bias is not None:
            raise ValueError(f"{weight_name}: an RMS norm has no bias")
        if skip is not None:
            return skip_rms_norm(gb, name, x, skip, weight, weight_name, eps)
        return rms_norm(gb, name, x, weight, weight_name, eps), x
    inputs = [gb.initializer(weight_name, weight)]
    if bias is not None:
        inputs.append(gb.initializer(bias_name, bias))
    with gb.scope(name):
        if skip is not None:
            out = gb.node("SkipLayerNormalization", [x, skip, *inputs],
                          outputs=[None, "", "", None], domain=MS_DOMAIN, epsilon=float(eps))
            return out[0], out[3]
        return gb.node("LayerNormalization", [x, *inputs], "LayerNormalization", axis=-1,
                       epsilon=float(eps), stash_type=1), x
