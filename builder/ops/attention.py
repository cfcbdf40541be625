"""Attention emitters.

``attention_inputs`` turns the 2-D attention_mask into what every layer's attention needs; it is
emitted once and shared by all layers:

    attention_mask [B, T] ─┬─ Shape[1] ─► total_len (int32 scalar) ─ -1, Expand[B] ─► seqlens_k
                           └─ (1 - mask) * min_float, [B, 1, S, T] ───────────────► pad bias

GroupQueryAttention treats seqlens_k as the end of a right-padded row, so every row gets the full
padded length and the additive bias masks the padding (left or right); the causal mask is GQA's
own. Rotary positions are then the index in the padded row, in the prompt as in each decode
step. A left-padded row is thus rotated by a constant offset (its pad count), which rotary
attention cannot see: scores depend only on position differences. (GQA ignores a position_ids
input in the first prompt, so passing mask-derived positions would be inconsistent.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from builder.graph import MS_DOMAIN, GraphBuilder


@dataclass(frozen=True)
class AttentionInputs:
    seqlens_k: str        # [B] int32: total length - 1
    total_length: str     # scalar int32
    bias: str             # [B, 1, S, T] float additive mask for padding ('' when none)


def attention_inputs(gb: GraphBuilder, tokens: str, attention_mask: str,
                     mode: str = "bias") -> AttentionInputs:
    """``tokens`` is input_ids [B, S] or inputs_embeds [B, S, H]: only its dim 1 is used.

    ``mode`` "seqlens" instead gives seqlens_k = (tokens in each row) - 1 and no bias: GQA's own
    convention, which assumes right padding (the attention_mask of a batch of one is all ones).
    """
    with gb.scope("/model/attn_mask"):
        mask_shape = gb.node("Shape", [attention_mask], "mask/Shape")
        total = gb.node("Gather", [mask_shape, gb.constant(1)], "total/Gather", axis=0)
        total_len = gb.node("Cast", [total], "total/Cast", to=6)  # INT32
        if mode == "seqlens":
            count = gb.node("ReduceSum", [attention_mask, gb.constant([1])], "seqlens_k/ReduceSum",
                            keepdims=0)
            last = gb.node("Sub", [count, gb.constant(1)], "seqlens_k/Sub")
            return AttentionInputs(gb.node("Cast", [last], "seqlens_k/Cast", to=6), total_len, "")
        batch = gb.node("Slice", [mask_shape, gb.constant([0]), gb.constant([1])], "batch/Slice")
        last = gb.node("Sub", [total_len, gb.constant(1, np.int32)], "seqlens_k/Sub")
        seqlens_k = gb.node("Expand", [last, batch], "seqlens_k/Expand")

        seq_len = gb.node("Slice", [gb.node("Shape", [tokens], "seq/Shape"),
                                    gb.constant([1]), gb.constant([2])], "seq/Slice")

        mask_f = gb.node("Cast", [attention_mask], "bias/Cast", to=gb.float_type)
        pad = gb.node("Sub", [gb.constant(1.0, np.float32), mask_f], "bias/Sub")
        lowest = float(np.finfo(np.float16).min if gb.float_dtype == np.float16
                       else np.finfo(np.float32).min)  # bf16 shares fp32's range
        bias_2d = gb.node("Mul", [pad, gb.constant(lowest, np.float32)], "bias/Mul")
        bias_4d = gb.node("Unsqueeze", [bias_2d, gb.constant([1, 2])], "bias/Unsqueeze")
        rows = gb.node("Concat", [gb.constant([1, 1]), seq_len, gb.constant([1])],
                       "bias/Concat", axis=0)
        bias = gb.node("Expand", [bias_4d, rows], "bias/Expand")
    return AttentionInputs(seqlens_k, total_len, bias)


def group_query_attention(gb: GraphBuilder, name: str, q: str, k: str, v: str,
                          past: tuple[str, str], present: tuple[str, str],
                          inputs: AttentionInputs, cos_cache: str, sin_cache: str, *,
                          num_heads: int, kv_heads: int, head_dim: int,
                          window: int | None = None, do_rotary: bool = True) -> str:
    """com.microsoft GroupQueryAttention with fused rotary; k and v are '' when q is packed QKV.

    Writes the present key/value to the graph outputs named in ``present``. ``window`` is a
    sliding window as Hugging Face counts it: each query sees itself and window - 1 earlier
    keys, which is also what onnxruntime's local_window_size means (checked against
    transformers in the tests; older onnxruntime sources counted one more key). With
    ``do_rotary`` false, q and k arrive rotated and the caches are not passed.
    """
    if not do_rotary:
        cos_cache = sin_cache = ""
    with gb.scope(name):
        out = gb.node(
            "GroupQueryAttention",
            [q, k, v, past[0], past[1], inputs.seqlens_k, inputs.total_length, cos_cache,
             sin_cache, "", inputs.bias],
            outputs=[None, present[0], present[1]], domain=MS_DOMAIN,
            num_heads=num_heads, kv_num_heads=kv_heads, scale=float(head_dim ** -0.5),
            do_rotary=int(do_rotary), rotary_interleaved=0,
            local_window_size=-1 if window is None else window, softcap=0.0)
    return out[0]
