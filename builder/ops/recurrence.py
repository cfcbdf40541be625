"""Linear attention's recurrence from standard ops, for static-shape graphs (the HTP has no
LinearAttention): Qwen3.5's Gated DeltaNet and Mamba2's gated state update, token by token.

Per value head h (reading q/k head h // (value heads / q heads)), with the state S [dk, dv] and
for each token t: ``S = exp(g_t) S``; then the ``"gated"`` rule adds ``k_t v_t^T``, the
``"gated_delta"`` rule adds ``k_t (beta_t (v_t - S^T k_t))^T``; the output is ``scale S^T q_t``.
This is onnxruntime's com.microsoft LinearAttention (what the cpu/cuda graphs run) written out:
the decode step is two products with the state and an outer product per head, the prefill the
same step unrolled over the call's P tokens.
"""

from __future__ import annotations

import numpy as np

from builder.graph import GraphBuilder

UPDATE_RULES = ("gated", "gated_delta")


def _heads(gb: GraphBuilder, name: str, x: str, heads: int, dim: int, seq_len: int,
           repeat: int = 1) -> str:
    """[B, S, heads * dim] → [B, heads * repeat, S, dim] (each head repeated ``repeat``
    times in a row: the value heads that read it)."""
    x = gb.node("Transpose", [gb.node("Reshape", [x, gb.constant([0, seq_len, heads, dim])],
                                      f"{name}/Reshape")], f"{name}/Transpose",
                perm=[0, 2, 1, 3])
    if repeat == 1:
        return x
    x = gb.node("Tile", [gb.node("Unsqueeze", [x, gb.constant([2])], f"{name}/Unsqueeze"),
                         gb.constant([1, 1, repeat, 1, 1])], f"{name}/Tile")
    return gb.node("Reshape", [x, gb.constant([0, heads * repeat, seq_len, dim])],
                   f"{name}/Reshape_1")


def time_step_decay(gb: GraphBuilder, x: str, bias: np.ndarray, bias_name: str,
                    a_log: np.ndarray, a_log_name: str) -> tuple[str, str]:
    """(dt = softplus(x + dt_bias), the log decay dt · A with A = -exp(A_log)), per head:
    Mamba2's time step and Gated DeltaNet's decay (with ``x`` its ``a`` projection)."""
    dt = gb.node("Softplus", [gb.node("Add", [x, gb.initializer(bias_name, bias)])])
    a = (-np.exp(np.asarray(a_log, np.float32))).astype(np.float32)
    return dt, gb.node("Mul", [dt, gb.initializer(a_log_name + ".neg_exp", a)])


def _times_state(gb: GraphBuilder, name: str, row: str, state: str, quantized: bool) -> str:
    """``row`` [B, H, 1, dk] @ ``state`` [B, H, dk, dv] → [B, H, 1, dv]. In quantized builds
    (their QDQ graphs and the float graphs that calibrate them) as a broadcast product summed
    over dk: the HTP rounds a MatMul's second input to 8 bits when both are 16-bit activations
    (see ``ops.attention.activation_matmul``), which here is the state, carried over every
    token (measured: HTP against the CPU EP on the same w8a16 graphs of a trained tiny
    Qwen3.5, min logit cosine 0.960)."""
    if not quantized:
        return gb.node("MatMul", [row, state], f"{name}/MatMul")
    column = gb.node("Transpose", [row], f"{name}/Transpose", perm=[0, 1, 3, 2])
    return gb.node("ReduceSum", [gb.node("Mul", [column, state], f"{name}/Mul"),
                                 gb.constant([2])], f"{name}/ReduceSum", keepdims=1)


def static_linear_attention(gb: GraphBuilder, name: str, q: str, k: str, v: str, past: str,
                            decay: str, rate: str | None, *, q_heads: int, v_heads: int,
                            key_dim: int, value_dim: int, seq_len: int, scale: float,
                            update_rule: str, mask: str | None = None,
                            quantized: bool = False) -> tuple[str, str]:
    """q, k [B, S, q_heads * key_dim], v [B, S, v_heads * value_dim], ``past`` [B, v_heads,
    key_dim, value_dim], ``decay`` (log space) and ``rate`` (beta; gated_delta only) [B, S,
    v_heads] → (output [B, S, v_heads * value_dim], the state after the call's last real token).
    ``mask`` [B, S] (a prefill chunk padded at its end): a padded token leaves the state as it
    is (no decay, no update). ``quantized``: a build of QDQ graphs (``_times_state``)."""
    if update_rule not in UPDATE_RULES:
        raise ValueError(f"update_rule {update_rule!r}: one of {', '.join(UPDATE_RULES)}")
    if (rate is None) != (update_rule == "gated"):
        raise ValueError("the gated_delta rule takes a rate (beta); the gated rule none")
    repeat = v_heads // q_heads
    with gb.scope(name):
        qh = _heads(gb, "q", gb.node("Mul", [q, gb.constant(scale, np.float32)], "q/Mul")
                    if scale != 1.0 else q, q_heads, key_dim, seq_len, repeat)
        kh = _heads(gb, "k", k, q_heads, key_dim, seq_len, repeat)    # [B, Hv, S, dk]
        vh = _heads(gb, "v", v, v_heads, value_dim, seq_len)         # [B, Hv, S, dv]
        gates = [decay] if rate is None else [decay, rate]
        if mask is not None:  # padded tokens: log decay 0, rate 0 (or no value: gated)
            m = gb.node("Unsqueeze", [mask, gb.constant([-1])], "mask/Unsqueeze")
            gates = [gb.node("Mul", [g, m], f"mask/Mul_{i}") for i, g in enumerate(gates)]
            if rate is None:
                vh = gb.node("Mul", [vh, gb.node("Unsqueeze", [mask, gb.constant([1, 3])],
                                                 "mask/Unsqueeze_v")], "mask/Mul_v")
        factor = gb.node("Exp", [gates[0]], "decay/Exp")
        per_token = [gb.node("Unsqueeze", [gb.node("Transpose", [g], f"{n}/Transpose",
                                                   perm=[0, 2, 1]), gb.constant([-1])],
                             f"{n}/Unsqueeze")          # [B, Hv, S, 1]
                     for n, g in zip(("decay", "rate"), [factor, *gates[1:]])]

        def tokens(x, what):  # S views [B, Hv, 1, d] (or [B, Hv, 1, 1])
            if seq_len == 1:
                return [x]
            return gb.node("Split", [x, gb.constant([1] * seq_len)], f"{what}/Split",
                           outputs=seq_len, axis=2)

        qs, ks, vs = tokens(qh, "q"), tokens(kh, "k"), tokens(vh, "v")
        gs = [tokens(g, n) for g, n in zip(per_token, ("decay", "rate"))]
        state, outputs = past, []
        for t in range(seq_len):
            with gb.scope(f"token_{t}"):
                state = gb.node("Mul", [state, gs[0][t]], "decay/Mul")
                k_col = gb.node("Transpose", [ks[t]], "k/Transpose", perm=[0, 1, 3, 2])
                if update_rule == "gated":
                    new = vs[t]
                else:  # beta (v - S^T k): what the state should give for k, less what it gives
                    memory = _times_state(gb, "memory", ks[t], state, quantized)
                    new = gb.node("Mul", [gb.node("Sub", [vs[t], memory], "delta/Sub"),
                                          gs[1][t]], "delta/Mul")
                # the outer product k new^T, broadcast ([dk, 1] times [1, dv])
                state = gb.node("Add", [state, gb.node("Mul", [k_col, new], "update/Mul")],
                                "update/Add")
                outputs.append(_times_state(gb, "output", qs[t], state, quantized))
        out = outputs[0] if seq_len == 1 else gb.node("Concat", outputs, "output/Concat",
                                                      axis=2)  # [B, Hv, S, dv]
        out = gb.node("Reshape", [gb.node("Transpose", [out], "output/Transpose",
                                          perm=[0, 2, 1, 3]),
                                  gb.constant([0, seq_len, v_heads * value_dim])],
                      "output/Reshape")
        return out, state

