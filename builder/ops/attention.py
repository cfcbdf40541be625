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

import ml_dtypes
import numpy as np

from builder.graph import MS_DOMAIN, GraphBuilder, batch_dim
from builder.ops.softcap import softcap as softcap_op
from builder.quant.qdq import activation_params


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
        lowest = float(ml_dtypes.finfo(gb.float_dtype).min)  # finite in the graph's type
        bias_2d = gb.node("Mul", [pad, gb.constant(lowest, np.float32)], "bias/Mul")
        bias_4d = gb.node("Unsqueeze", [bias_2d, gb.constant([1, 2])], "bias/Unsqueeze")
        rows = gb.node("Concat", [gb.constant([1, 1]), seq_len, gb.constant([1])],
                       "bias/Concat", axis=0)
        bias = gb.node("Expand", [bias_4d, rows], "bias/Expand")
    return AttentionInputs(seqlens_k, total_len, bias)


def group_query_attention(gb: GraphBuilder, name: str, q: str, k: str, v: str,
                          past: tuple[str, str], present: tuple[str, str],
                          inputs: AttentionInputs, cos_cache: str, sin_cache: str, *,
                          num_heads: int, kv_heads: int, scale: float,
                          softcap: float | None = None, window: int | None = None,
                          do_rotary: bool = True, head_sink: str | None = None) -> str:
    """com.microsoft GroupQueryAttention with fused rotary; k and v are '' when q is packed QKV.

    Writes the present key/value to the graph outputs named in ``present``. ``window`` is a
    sliding window as Hugging Face counts it: each query sees itself and window - 1 earlier
    keys, which is also what onnxruntime's local_window_size means (checked against
    transformers in the tests; older onnxruntime sources counted one more key). With
    ``do_rotary`` false, q and k arrive rotated and the caches are not passed. ``scale``
    multiplies q·k; ``softcap`` (None: none) makes the scores cap * tanh(scores / cap).
    ``head_sink`` [num_heads] (GPT-OSS's sinks): one more logit per head in each softmax's
    denominator, attending to nothing (onnxruntime >= 1.23).
    """
    if not do_rotary:
        cos_cache = sin_cache = ""
    with gb.scope(name):
        out = gb.node(
            "GroupQueryAttention",
            [q, k, v, past[0], past[1], inputs.seqlens_k, inputs.total_length, cos_cache,
             sin_cache, "", inputs.bias, *([head_sink] if head_sink else [])],
            outputs=[None, present[0], present[1]], domain=MS_DOMAIN,
            num_heads=num_heads, kv_num_heads=kv_heads, scale=float(scale),
            do_rotary=int(do_rotary), rotary_interleaved=0,
            local_window_size=-1 if window is None else window,
            softcap=0.0 if softcap is None else float(softcap))
    return out[0]


@dataclass(frozen=True)
class StaticAttentionInputs:
    """What every layer of a static-shape graph needs, from the past_seq_len input alone."""

    positions: str    # [B, S] int32: absolute position of each token (start + i)
    rows: str         # [1, C] int32: 0 .. C-1
    queries: str      # [S, 1] int32: the positions as a column
    place: str        # [C, S] float one-hot: the new token i goes to cache row start + i
    place_t: str | None  # [S, C]: its transpose (None when S = 1)
    keep: str         # [C, 1] float: 1 for cache rows this call does not write
    # (batched: queries [B, 1, S, 1], place [B, 1, C, S], place_t [B, 1, S, C], keep [B, 1, C, 1])
    seq_len: int
    context_len: int
    batch: int | str = 1  # B (1 in the shipped graphs); a name: any batch


def static_attention_inputs(gb: GraphBuilder, past_seq_len: str, seq_len: int,
                            context_len: int, batch: int | str = 1) -> StaticAttentionInputs:
    """The KV cache is one buffer of C rows where row = absolute position (onnxruntime-genai's
    shared past/present buffer). past_seq_len [B, 1] int32 is the row of the call's last token,
    so the call's tokens go to rows start .. start + S - 1 with start = past_seq_len + 1 - S.
    Everything is int32 or float, as the HTP prefers. The shipped graphs have B = 1;
    calibration runs many calls at once through graphs of any batch (``batch`` a name), whose
    per-row tensors gain a batch axis."""
    i32 = np.int32
    with gb.scope("/model/attn_mask"):
        last = gb.node("Reshape", [past_seq_len, gb.constant([1] if batch == 1 else [0, 1])],
                       "last/Reshape")                                          # [1] or [B, 1]
        start = gb.node("Sub", [last, gb.constant([seq_len - 1], i32)], "start/Sub")
        positions = gb.node("Add", [start, gb.constant(np.arange(seq_len)[None], i32)],
                            "positions/Add")                                        # [B, S]
        rows = gb.constant(np.arange(context_len)[:, None], i32)                   # [C, 1]
        row_t = gb.node("Transpose", [rows], "rows/Transpose", perm=[1, 0])           # [1, C]
        if batch == 1:
            queries = gb.node("Transpose", [positions], "pos/Transpose", perm=[1, 0])  # [S, 1]
            targets = positions                                                     # [1, S]
        else:
            queries = gb.node("Unsqueeze", [positions, gb.constant([1, 3])],
                              "pos/Unsqueeze")                                # [B, 1, S, 1]
            targets = gb.node("Unsqueeze", [positions, gb.constant([1, 2])],
                              "place/Unsqueeze")                              # [B, 1, 1, S]
        place = gb.node("Cast", [gb.node("Equal", [rows, targets], "place/Equal")],
                        "place/Cast", to=gb.float_type)                       # [(B, 1,) C, S]
        place_t = None if seq_len == 1 else gb.node(  # (write_kv's prefill form)
            "Cast", [gb.node("Equal", [queries, row_t], "place_t/Equal")], "place_t/Cast",
            to=gb.float_type)                                                 # [(B, 1,) S, C]
        written = gb.node("ReduceSum", [place, gb.constant([1] if batch == 1 else [3])],
                          "keep/ReduceSum", keepdims=1)
        keep = gb.node("Sub", [gb.constant(1.0, np.float32), written], "keep/Sub")  # [.., C, 1]
    return StaticAttentionInputs(positions, row_t, queries, place, place_t, keep, seq_len,
                                 context_len, batch)


def static_attention_mask(gb: GraphBuilder, inputs: StaticAttentionInputs,
                          window: int | None = None, mask_value: float | None = None) -> str:
    """[B, 1, S, C] additive mask: key row j is visible to the query at position p iff j <= p
    (rows past a query's own position, later tokens or a prompt's trailing pads, stay masked)
    and, with a sliding ``window``, j > p - window. ``mask_value`` defaults to fp16's lowest;
    -1 makes it an indicator for ``decomposed_attention``'s ``relative_mask``."""
    i32 = np.int32
    with gb.scope("/model/attn_mask" if window is None else f"/model/attn_mask/window_{window}"):
        visible = gb.node("LessOrEqual", [inputs.rows, inputs.queries], "visible/LessOrEqual")
        if window is not None:
            oldest = gb.node("Sub", [inputs.queries, gb.constant(window, i32)], "window/Sub")
            visible = gb.node("And", [visible, gb.node("Greater", [inputs.rows, oldest],
                                                        "window/Greater")], "window/And")
        if mask_value == -1.0:  # visible - 1, in ops that quantize well: in a QDQ graph the
            # HTP selects wrongly between two constants of their own quantization (Where)
            shown = gb.node("Cast", [visible], "bias/Cast", to=gb.float_type)
            bias = gb.node("Sub", [shown, gb.constant(1.0, np.float32)], "bias/Sub")  # [S, C]
        else:
            lowest = float(np.finfo(np.float16).min) if mask_value is None else mask_value
            bias = gb.node("Where", [visible, gb.constant(0.0, np.float32),
                                     gb.constant(lowest, np.float32)], "bias/Where")   # [S, C]
        return gb.node("Reshape", [bias, gb.constant([batch_dim(inputs.batch), 1, inputs.seq_len,
                                                      inputs.context_len])], "bias/Reshape")


def write_kv(gb: GraphBuilder, name: str, past: str, new: str, inputs: StaticAttentionInputs,
             kv_type: int) -> str:
    """present = past with rows start .. start+S-1 replaced by ``new`` [B, kv, S, hd]: the new
    rows placed by the one-hot (exact: each row sums one product with 1.0) and a row mask.

    The HTP multiplies two 16-bit activations with the second one rounded to 8 bits (measured
    on the simulator: a one-hot MatMul moved the new rows by up to 128 of their 65536 steps), so
    the new rows are never MatMul's second input: one row (decode) is a broadcast product, more
    (prefill) new^T @ place^T, whose second input, 0 or 1, is exact at any width."""
    with gb.scope(name):
        def as_kv(x, what):
            return x if kv_type == gb.float_type else gb.node("Cast", [x], f"{what}/Cast",
                                                              to=kv_type)

        new, keep = as_kv(new, "new"), as_kv(inputs.keep, "keep")
        if inputs.seq_len == 1:
            place = as_kv(inputs.place, "place")
            written = gb.node("Mul", [place, new], "place/Mul")  # [C, 1] * [B, kv, 1, hd]
        else:
            place_t = as_kv(inputs.place_t, "place")
            new_t = gb.node("Transpose", [new], "place/new/Transpose", perm=[0, 1, 3, 2])
            written = gb.node("Transpose", [gb.node("MatMul", [new_t, place_t], "place/MatMul")],
                              "place/Transpose", perm=[0, 1, 3, 2])       # [B, kv, C, hd]
        kept = gb.node("Mul", [past, keep], "keep/Mul")
        return gb.node("Add", [kept, written], "Add")


def split_heads(gb: GraphBuilder, name: str, x: str, heads: int, head_dim: int,
                seq_len: int, batch: int | str = 1) -> str:
    """[B, S, heads*hd] → [B, heads, S, hd]."""
    with gb.scope(name):
        split = gb.node("Reshape", [x, gb.constant([batch_dim(batch), seq_len, heads,
                                                    head_dim])])
        return gb.node("Transpose", [split], perm=[0, 2, 1, 3])


def activation_matmul(gb: GraphBuilder, name: str, a: str, b: str, a_row_sum: float) -> str:
    """MatMul of two activations, ``a`` @ ``b``. In a QDQ graph of 16-bit activations the HTP
    rounds the second input of such a MatMul to 8 bits (measured on the simulator: a 64-deep
    product 91 of 65536 steps off, against 1 with an 8-bit second input), so there ``b`` goes in
    as 8-bit terms: its high part on an 8-bit grid over its range (the KV buffer's own grid when
    the cache is 8-bit, where that part is ``b`` exactly) and, otherwise, the rest, ``b`` - high,
    8-bit over half a step each side; a MatMul each, summed (the HTP: 9 steps off). The rest's
    product is at most ``a_row_sum`` (a bound on the sum of |a| along a row) times half a step.
    The MatMul of the high part keeps the plain MatMul's name, and so its calibrated range."""
    qdq = gb.qdq
    if qdq is None or qdq.bits != 16:
        return gb.node("MatMul", [a, b], f"{name}/MatMul")
    lo, hi = gb.calibrated_range(b)
    on_kv_grid = qdq.kv_bits == 8
    high = gb.node("Identity", [b], f"{name}/high/Identity")
    gb.narrow[high] = (lo, hi, 8, on_kv_grid)
    out = gb.node("MatMul", [a, high], f"{name}/MatMul")
    if on_kv_grid:
        return out
    step = float(activation_params(lo, hi, 8)[0])
    rest = gb.node("Sub", [b, high], f"{name}/rest/Sub")
    gb.narrow[rest] = (-step / 2, step / 2, 8, False)
    small = gb.node("MatMul", [a, rest], f"{name}/rest/MatMul")
    gb.narrow[small] = (-a_row_sum * step / 2, a_row_sum * step / 2, 16, False)
    total = gb.node("Add", [out, small], f"{name}/rest/Add")
    gb.narrow[total] = (*gb.calibrated_range(out), 16, False)
    return total


RELATIVE_MASK_MARGIN = 30.0  # exp(-30) ~ 1e-13: a masked key's weight, at most


def decomposed_attention(gb: GraphBuilder, name: str, q: str, keys: str, values: str,
                         bias: str, *, num_heads: int, kv_heads: int, head_dim: int,
                         seq_len: int, kv_type: int, scale: float,
                         softcap: float | None = None, relative_mask: bool = False,
                         batch: int | str = 1, sinks: np.ndarray | None = None) -> str:
    """Attention from MatMul/Softmax for static-shape targets (no GroupQueryAttention).

    q [B, S, heads*hd] (rotated); keys and values [B, kv, T, hd], the whole cache with this
    call's rows written; bias [B, 1, S, T]; ``scale`` on q·k, then ``softcap`` (None: none)
    as cap * tanh(scores / cap), before the mask. With ``relative_mask`` (calibrated QDQ
    graphs) ``bias`` is 0 / -1 and masked scores are pushed RELATIVE_MASK_MARGIN below their
    row's smallest score: a fixed mask small enough for uint16 activations (-50) leaves a key
    masked by less than the spread of a model's scores visible (large attention logits are
    common: a tiny trained Llama reaches 118). ``sinks`` [heads] (GPT-OSS's): one more logit
    per head in each row's softmax, a column of its own that no value reads (dropped after the
    Softmax). Grouped queries are folded into the sequence axis, [1, kv, groups*S, hd], so no
    key/value head is ever repeated:

        q ─ [1, heads, S, hd] ─ Reshape ─ [1, kv, g*S, hd] ─┐
        keys ─ Transpose ─ [1, kv, hd, T] ───────── MatMul · scale + Tile(bias) ─ Softmax ─┐
        values [1, kv, T, hd] ───────────────────────────────────────────────────── MatMul
    """
    groups, b = num_heads // kv_heads, batch_dim(batch)
    with gb.scope(name):
        if kv_type != gb.float_type:
            keys = gb.node("Cast", [keys], "k/Cast", to=gb.float_type)
            values = gb.node("Cast", [values], "v/Cast", to=gb.float_type)
        qh = gb.node("Reshape", [split_heads(gb, "q", q, num_heads, head_dim, seq_len, batch),
                                 gb.constant([b, kv_heads, groups * seq_len, head_dim])],
                     "q/Group")
        kt = gb.node("Transpose", [keys], "k/Transpose", perm=[0, 1, 3, 2])
        q_sum = head_dim * max(map(abs, gb.calibrated_range(q))) if gb.qdq is not None else 0.0
        scores = activation_matmul(gb, "scores", qh, kt, q_sum)
        scores = gb.node("Mul", [scores, gb.constant(scale, np.float32)], "scores/Mul")
        if softcap is not None:
            scores = softcap_op(gb, "scores/softcap", scores, softcap)
        if groups > 1:
            bias = gb.node("Tile", [bias, gb.constant([1, 1, groups, 1])], "bias/Tile")
        if relative_mask:  # bias is 0 / -1: masked scores go below the row's minimum
            top = gb.node("ReduceMax", [scores, gb.constant([-1])], "span/ReduceMax")
            bottom = gb.node("ReduceMin", [scores, gb.constant([-1])], "span/ReduceMin")
            depth = gb.node("Add", [gb.node("Sub", [top, bottom], "span/Sub"),
                                    gb.constant(RELATIVE_MASK_MARGIN, np.float32)], "span/Add")
            bias = gb.node("Mul", [bias, depth], "bias/Mul")
        scores = gb.node("Add", [scores, bias], "scores/Add")
        if sinks is not None:  # row (kv head j, group i, position s) is head j * groups + i's
            column = gb.constant(np.repeat(
                np.asarray(sinks, np.float32).reshape(kv_heads, groups, 1), seq_len,
                axis=1).reshape(1, kv_heads, groups * seq_len, 1), np.float32)
            if b != 1:  # as many rows as the scores' batch
                rows = gb.node("Slice", [gb.node("Shape", [scores], "sinks/Shape"),
                                         gb.constant([0]), gb.constant([1])], "sinks/batch")
                column = gb.node("Expand", [column, gb.node("Concat", [
                    rows, gb.constant([kv_heads, groups * seq_len, 1])], "sinks/shape",
                    axis=0)], "sinks/Expand")
            scores = gb.node("Concat", [scores, column], "sinks/Concat", axis=-1)
        probs = gb.node("Softmax", [scores], "Softmax", axis=-1)
        if sinks is not None:
            probs = gb.node("Slice", [probs, gb.constant([0]), gb.constant([-1]),
                                      gb.constant([-1])], "sinks/Slice")
        out = activation_matmul(gb, "out", probs, values, 1.0)  # a row of weights sums to 1
        out = gb.node("Reshape", [out, gb.constant([b, num_heads, seq_len, head_dim])],
                      "out/Ungroup")
        out = gb.node("Transpose", [out], "out/Transpose", perm=[0, 2, 1, 3])
        return gb.node("Reshape", [out, gb.constant([b, seq_len, num_heads * head_dim])],
                       "out/Reshape")
