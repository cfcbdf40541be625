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


def static_causal_conv(gb: GraphBuilder, name: str, x: str, taps: list[str], bias: str | None,
                       past: str, seq_len: int, last: str | None,
                       activation: str = "none") -> tuple[str, str]:
    """The same convolution from standard ops, for static-shape graphs (the HTP has no
    CausalConvWithState): ``past`` [B, C, K - 1] (in ``x``'s type) is transposed and put before
    ``x`` [B, S, C]; output t is the sum over taps j of ``taps[j]`` [C] times row t + j of that
    [B, K - 1 + S, C] window (+ ``bias``).

    Returns (output [B, S, C], the new state [B, C, K - 1]): the window's K - 1 rows that end
    at the call's last token: its last rows, or with ``last`` [B, 1, S] (a one-hot of the last
    real token of a prefill chunk whose end is padding) the K - 1 rows ending there."""
    if activation not in CONV_ACTIVATIONS:
        raise ValueError(f"activation {activation!r}: one of {', '.join(CONV_ACTIVATIONS)}")
    k = len(taps)
    with gb.scope(name):
        window = gb.node("Concat", [gb.node("Transpose", [past], perm=[0, 2, 1]), x],
                         axis=1)                                       # [B, K - 1 + S, C]

        def rows(start, name):
            return gb.node("Slice", [window, gb.constant([start]),
                                     gb.constant([start + seq_len]), gb.constant([1])],
                           f"{name}/Slice")

        y = None
        for j, tap in enumerate(taps):
            term = gb.node("Mul", [rows(j, f"tap_{j}"), tap], f"tap_{j}/Mul")
            y = term if y is None else gb.node("Add", [y, term], f"tap_{j}/Add")
        if bias is not None:
            y = gb.node("Add", [y, bias], "bias/Add")
        if activation == "silu":
            y = gb.node("Mul", [y, gb.node("Sigmoid", [y])], "silu/Mul")
        if last is None:
            state = gb.node("Slice", [window, gb.constant([seq_len]),
                                      gb.constant([seq_len + k - 1]), gb.constant([1])],
                            "state/Slice")                              # [B, K - 1, C]
        else:  # row j of the state: the window's row (last real token) + 1 + j, as the sum
            # of the rows times the one-hot column (not last @ rows: the HTP rounds a MatMul's
            # second 16-bit activation to 8 bits, 119 of 65536 steps off in a [64, 48] select)
            column = gb.node("Transpose", [last], "state/last/Transpose", perm=[0, 2, 1])
            state = gb.node("Concat", [gb.node("ReduceSum", [
                gb.node("Mul", [rows(1 + j, f"state_{j}"), column], f"state_{j}/Mul"),
                gb.constant([1])], f"state_{j}/ReduceSum", keepdims=1) for j in range(k - 1)],
                            "state/Concat", axis=1)
        return y, gb.node("Transpose", [state], "state/Transpose", perm=[0, 2, 1])
