"""Short causal depthwise convolutions that carry their window from call to call (LFM2's conv
layers; the convolution before Qwen3.5's and Mamba2's recurrences).

Each channel c of ``x`` [B, S, C] is convolved over time with its own kernel of K taps:
``y[t, c] = sum_j w[c, j] x[t - K + 1 + j, c]`` (+ bias), where the positions before the first
of this call come from the state: the last K - 1 inputs of the previous calls (zeros at first).
"""

from __future__ import annotations

from builder.graph import GraphBuilder

CONV_ACTIVATIONS = ("none", "silu")


def causal_conv(gb: GraphBuilder, name: str, x: str, weight: str, bias: str | None,
                past: str, present: str, activation: str = "none") -> str:
    """onnxruntime's com.microsoft CausalConvWithState on ``x`` [B, S, C] (transposed to its
    [B, C, S] and back); ``weight`` [C, 1, K], ``past`` [B, C, K - 1] → output [B, S, C], and the
    new state written to ``present``."""
    if activation not in CONV_ACTIVATIONS:
        raise ValueError(f"activation {activation!r}: one of {', '.join(CONV_ACTIVATIONS)}")
    with gb.scope(name):
        channels_first = gb.node("Transpose", [x], perm=[0, 2, 1])
        y, _ = gb.node("CausalConvWithState", [channels_first, weight, bias or "", past],
                       outputs=[None, present], domain="com.microsoft", ndim=1,
                       activation=activation)
        return gb.node("Transpose", [y], "Transpose_1", perm=[0, 2, 1])
