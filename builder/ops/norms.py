"""RMS norms: standard RMSNormalization, and the residual-fusing SkipSimplifiedLayerNormalization."""

from __future__ import annotations

import numpy as np

from builder.graph import MS_DOMAIN, GraphBuilder


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
