"""Static-shape graphs for NPU targets (QNN HTP), built from any DecoderBuilder.

A model becomes four kinds of graph, run in turn by onnxruntime-genai's decoder-pipeline:

    input_ids ─► embeddings ─► inputs_embeds ─► transformer (S = P: prefill; S = 1: decode)
                                                    │  past_seq_len, past/present KV buffer
                                                    ▼
                                              hidden_states ─► lm_head (S = P or 1) ─► logits

The KV cache is a shared past/present buffer of C rows per layer where row = position (see
``builder.ops.attention.static_attention_inputs``); each transformer call writes its S rows into
it. Every shape is fixed; the architecture's own weights, projections and norms are reused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto

from builder.errors import ConfigError
from builder.ops import (
    decomposed_attention, embedding, linear, rms_norm, rope_cache, rotary_decomposed,
    split_heads, static_attention_inputs, write_kv,
)
from builder.options import QDQ_PRECISIONS
from builder.roles import TensorRole as R

if TYPE_CHECKING:
    from builder.models.base import DecoderBuilder

KV_TYPE = TensorProto.FLOAT16  # the KV cache is fp16 whatever the graph's float type
INT32, INT64 = TensorProto.INT32, TensorProto.INT64


def kv_names(layer: int) -> tuple[str, str, str, str]:
    return (f"past_key_{layer}", f"past_value_{layer}", f"present_key_{layer}",
            f"present_value_{layer}")


def quantized_precision(b: DecoderBuilder) -> bool:
    """Calibrated QDQ builds (w8a16, w4a16 and their int8/int4 spellings)."""
    return b.options.precision in QDQ_PRECISIONS


def int8_table(b: DecoderBuilder, role: R, name: str) -> tuple[str, str, str]:
    """A [vocab, hidden] table stored as lm_head's MatMul weight: int8 [hidden, vocab],
    symmetric per vocab column (per output channel). Returns the initializer names of codes,
    scales and zero points; stored once in the shared data file, whichever graph comes first."""
    gb, names = b.gb, (f"{name}_int8", f"{name}_scale", f"{name}_zero_point")
    if names[0] in gb.store.written:
        return tuple(gb.initializer(n, None) for n in names)
    w = b.weight(role).astype(np.float32)
    scale = np.maximum(np.abs(w).max(axis=1), np.float32(1e-12)) / np.float32(127)
    codes = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    gb.initializer(names[0], np.ascontiguousarray(codes.T))
    gb.initializer(names[1], scale.astype(np.float32))
    gb.initializer(names[2], np.zeros(scale.shape, np.int8))
    return names


def dequantized(gb, codes: str, scale: str, zero_point: str) -> str:
    return gb.node("DequantizeLinear", [codes, scale, zero_point], "DequantizeLinear", axis=1)


def build_embeddings(b: DecoderBuilder) -> None:
    """input_ids [1, S] (any S) → inputs_embeds; a lookup, run on the CPU EP. Shared with
    lm_head, it reads lm_head's int8 [hidden, vocab] table: the S columns' codes times their
    scales (dequantizing the whole table on every call would cost a vocabulary of work per
    token)."""
    gb, c = b.gb, b.config
    ids = gb.input("input_ids", INT64, [1, "sequence_length"])
    if b.extra.shared_embeddings:
        with gb.scope("/model/embed_tokens"):  # gather the codes, then scale only those
            codes, scale, _ = int8_table(b, R.EMBED, b.weight_name(R.EMBED))  # zero points 0
            columns = gb.node("Gather", [codes, ids], axis=1)               # [hidden, 1, S]
            rows = gb.node("Transpose", [gb.node("Cast", [columns], to=TensorProto.FLOAT)],
                           perm=[1, 2, 0])                                  # [1, S, hidden]
            scales = gb.node("Unsqueeze", [gb.node("Gather", [scale, ids], axis=0),
                                           gb.constant([2])])               # [1, S, 1]
            out = gb.node("Mul", [rows, scales])
    else:
        out = embedding(gb, "/model/embed_tokens", ids,
                        gb.initializer(b.weight_name(R.EMBED), b.weight(R.EMBED)))
    gb.output(out, "inputs_embeds", gb.float_type, [1, "sequence_length", c.hidden_size])


def build_lm_head(b: DecoderBuilder, seq_len: int) -> None:
    """hidden_states [1, S, hidden] (already normed) → logits [1, S, vocab]. In quantized
    builds lm_head is int8 per channel (DequantizeLinear → MatMul); calibration then adds the
    uint16 Quantize/Dequantize pairs around it (``builder.quant.calibration``)."""
    gb, c = b.gb, b.config
    h = gb.input("hidden_states", gb.float_type, [1, seq_len, c.hidden_size])
    role = R.EMBED if c.tie_word_embeddings else R.LM_HEAD
    if quantized_precision(b):
        name = b.weight_name(R.EMBED if b.extra.shared_embeddings else R.LM_HEAD)
        with gb.scope("/lm_head"):
            logits = gb.node("MatMul", [h, dequantized(gb, *int8_table(b, role, name))])
    else:
        logits = linear(gb, "/lm_head", h, b.weight(role), b.weight_name(R.LM_HEAD))
    gb.output(logits, "logits", gb.float_type, [1, seq_len, c.vocab_size])


def build_transformer(b: DecoderBuilder, seq_len: int, context_len: int) -> None:
    """inputs_embeds [1, S, hidden] + the KV buffers → hidden_states (after the final norm)."""
    gb, c = b.gb, b.config
    x = gb.input("inputs_embeds", gb.float_type, [1, seq_len, c.hidden_size])
    past_seq_len = gb.input("past_seq_len", INT32, [1, 1])
    gb.input("total_seq_len", INT32, [1])  # required beside past_seq_len by the runtime; unused
    kv_shape = [1, c.num_key_value_heads, context_len, c.head_dim]
    b.past = [(gb.input(kv_names(i)[0], KV_TYPE, kv_shape),
               gb.input(kv_names(i)[1], KV_TYPE, kv_shape)) for i in range(c.num_hidden_layers)]
    # A calibrated QDQ graph quantizes the scores together with the mask: a mask of -65504
    # would leave uint16 activations a step of about 1, so those graphs use -50.
    quantized = quantized_precision(b)
    b.static = static_attention_inputs(gb, past_seq_len, seq_len, context_len,
                                       c.sliding_window, -50.0 if quantized else None)
    b.present = {}
    b.static_seq_len = seq_len
    cache = rope_cache(c.rope, c.head_dim, context_len, c.max_position_embeddings)
    if cache.long is not None and context_len > cache.switch_length:
        raise ConfigError(f"LongRoPE beyond {cache.switch_length} tokens needs a run-time switch "
                          f"of tables, which static graphs cannot take: choose "
                          f"qnn_context_length <= {cache.switch_length}")
    b.rotary_dim = cache.rotary_dim
    b.rope = (gb.initializer("cos_cache", cache.cos), gb.initializer("sin_cache", cache.sin))

    residual = None
    for layer in range(c.num_hidden_layers):
        x, residual = b.decoder_layer(layer, x, residual)
    with gb.scope(f"/model/layers.{c.num_hidden_layers}"):
        h = rms_norm(gb, "final_norm_layernorm", x, b.weight(R.FINAL_NORM),
                     b.weight_name(R.FINAL_NORM), c.rms_norm_eps)
    gb.output(h, "hidden_states", gb.float_type, [1, seq_len, c.hidden_size])
    for i in range(c.num_hidden_layers):
        gb.output(b.present[i][0], kv_names(i)[2], KV_TYPE, kv_shape)
        gb.output(b.present[i][1], kv_names(i)[3], KV_TYPE, kv_shape)


def static_attention(b: DecoderBuilder, layer: int, x: str) -> str:
    """q/k/v → [q/k norm] → rotary at the call's positions → write k/v rows into the cache →
    attention over the whole cache → o_proj."""
    c, gb, s = b.config, b.gb, b.static_seq_len
    with gb.scope("attn"):
        q, k, v = b.qkv_projections(layer, x)
        if b.qk_norm:
            q = b.head_norm("q_norm", q, R.Q_NORM, layer, c.num_attention_heads)
            k = b.head_norm("k_norm", k, R.K_NORM, layer, c.num_key_value_heads)
        q, k = (rotary_decomposed(gb, f"{n}_rotary", t, *b.rope, b.static.positions,
                                  num_heads=h, head_dim=c.head_dim, rotary_dim=b.rotary_dim,
                                  seq_len=s)
                for n, t, h in (("q", q, c.num_attention_heads),
                                ("k", k, c.num_key_value_heads)))
        keys = write_kv(gb, "k_cache", b.past[layer][0],
                        split_heads(gb, "k_heads", k, c.num_key_value_heads, c.head_dim, s),
                        b.static, KV_TYPE)
        values = write_kv(gb, "v_cache", b.past[layer][1],
                          split_heads(gb, "v_heads", v, c.num_key_value_heads, c.head_dim, s),
                          b.static, KV_TYPE)
        b.present[layer] = (keys, values)
        out = decomposed_attention(gb, "attention", q, keys, values, b.static.bias,
                                   num_heads=c.num_attention_heads,
                                   kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                                   seq_len=s, kv_type=KV_TYPE)
        return b.project("o_proj", out, R.O, layer, b.weight(R.O, layer),
                         b.weight_name(R.O, layer), b.attention_biases(layer)[3])
