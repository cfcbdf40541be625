"""The single-graph decoder (cpu, cuda): how it lowers the parts of an architecture's dataflow
that differ between targets.

One graph with dynamic batch and sequence, onnxruntime-genai's "decoder" contract:

    input_ids, attention_mask, past_key_values.{i} ─► embedding ─► layers ─► final norm
        ─► lm_head ─► logits, present.{i}

Attention is com.microsoft GroupQueryAttention with the rotary fused in (RotaryEmbedding ops
before it under LongRoPE); a tied table is stored once for the lookup and lm_head
(GatherBlockQuantized + MatMulNBits when quantized).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto
from tqdm.auto import tqdm

from builder.ops import (
    AttentionInputs, attention_inputs, causal_conv, embedding, embedding_quantized,
    group_query_attention, linear_transposed, matmul_nbits, position_ids, quantized_initializers,
    rope_cache, rotary,
)
from builder.ops.rotary import LONGROPE, RopeTables
from builder.config import RopeConfig
from builder.quant import QuantizedWeight
from builder.roles import TensorRole as R

if TYPE_CHECKING:
    from builder.models.base import DecoderBuilder

logger = logging.getLogger(__name__)
INT64 = TensorProto.INT64


class DecoderLowering:
    def __init__(self, builder: DecoderBuilder) -> None:
        self.b = builder
        self.explicit_rotary = False  # LongRoPE: see rotary_tables()
        self._table = None
        self._valid = None  # zero_padding's [B, S, 1] mask of the chunk's positions

    @property
    def takes_packed_qkv(self) -> bool:
        """GroupQueryAttention splits a packed QKV itself (unless rotary runs before it)."""
        return not self.explicit_rotary

    def build(self) -> None:
        b = self.b
        c, gb, x = b.config, b.gb, b.extra
        io = gb.float_type
        if x.exclude_embeds:
            tokens = gb.input("inputs_embeds", io, ["batch_size", "sequence_length",
                                                    c.hidden_size])
        else:
            tokens = gb.input("input_ids", INT64, ["batch_size", "sequence_length"])
        mask = gb.input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
        kv_shape = ["batch_size", c.num_key_value_heads, "past_sequence_length", c.head_dim]
        attention = [i for i in range(c.num_hidden_layers) if b.layer_kind(c, i) == "attention"]
        self.past = {i: (gb.input(f"past_key_values.{i}.key", io, kv_shape),
                         gb.input(f"past_key_values.{i}.value", io, kv_shape))
                     for i in attention}
        self.states = {(i, s.name): (gb.input(f"past.{i}.{s.name}", io,
                                               ["batch_size", *s.shape]), s.shape)
                       for i in range(c.num_hidden_layers) for s in b.layer_states(c, i)}
        self.mask = mask
        self.attn_inputs: AttentionInputs = attention_inputs(gb, tokens, mask,
                                                             b.target.attention_mask)
        ropes = [b.rope(layer) for layer in range(c.num_hidden_layers)]
        # GroupQueryAttention's fused rotary takes tables of a multiple of 8 columns only
        # (rotary dims a multiple of 16: "cos_cache dimension 1 must be <= head_size / 2 and a
        # multiple of 8" at the first run): other partial rotaries run as RotaryEmbedding ops
        self.explicit_rotary = any(r is not None and (
            r.type in LONGROPE or round(c.head_dim * r.partial_rotary_factor) % 16)
            for r in ropes) or (b.qk_norm_after_rotary and b.has_qk_norm(c))  # (HunYuan)
        self.ropes = RopeTables(ropes, self.rotary_tables, range(c.num_hidden_layers))
        self.positions = position_ids(gb, tokens, mask) if self.explicit_rotary else None

        h = tokens if x.exclude_embeds else b.embedding(tokens)
        residual = None
        for layer in tqdm(range(c.num_hidden_layers), desc="layers", unit="layer", disable=None):
            h, residual = b.decoder_layer(layer, h, residual)
        h = b.final_norm(h, residual)
        if x.include_hidden_states or x.exclude_lm_head:
            gb.output(h, "hidden_states", io, ["batch_size", "sequence_length", c.hidden_size])
        if not x.exclude_lm_head:
            positions = "sequence_length"
            if x.prune_lm_head:  # prefill needs only the last position's logits
                with gb.scope("/model/prune_lm_head"):
                    h = gb.node("Slice", [h, gb.constant([-1]), gb.constant([2**62]),
                                          gb.constant([1])])
                positions = 1
            gb.output(b.lm_head(h), "logits", io, ["batch_size", positions, c.vocab_size])
        present_shape = ["batch_size", c.num_key_value_heads, "total_sequence_length", c.head_dim]
        for i in attention:
            for kind in ("key", "value"):
                gb.output(f"present.{i}.{kind}", f"present.{i}.{kind}", io, present_shape)
        for (i, name), (_, shape) in self.states.items():
            gb.output(f"present.{i}.{name}", f"present.{i}.{name}", io, ["batch_size", *shape])
        b.weights.check_all_consumed(b.ignored())
        b.policy.check_exclusions()
        if gb.lora is not None:  # LoRA adapters kept apart: their files beside the model
            gb.lora.check_all_used()
            gb.lora.write(gb.data_path.parent)

    def rotary_tables(self, rope: RopeConfig, suffix: str) -> tuple[str, str, int]:
        """(cos cache, sin cache, rotary dims) of ``rope``; with LongRoPE, an If picks the
        long tables past the switch length.

        LongRoPE also sets ``explicit_rotary``: a switch of tables is not shift-invariant (cached
        keys keep the short rotation), so a left-padded row must be rotated at its true
        positions, which GroupQueryAttention's fused rotary does not take in the prompt.
        """
        c, gb = self.b.config, self.b.gb
        cache = rope_cache(rope, c.head_dim, c.max_position_embeddings)
        cos = gb.initializer(f"cos_cache{suffix}", cache.cos)
        sin = gb.initializer(f"sin_cache{suffix}", cache.sin)
        if cache.long is None:
            logger.info("rotary%s: fused into GroupQueryAttention (%d of %d dims, theta %g)",
                        suffix, cache.rotary_dim, c.head_dim, rope.theta)
            return cos, sin, cache.rotary_dim
        logger.info("rotary: LongRoPE, long factors beyond %d tokens; RotaryEmbedding ops with "
                    "positions from the attention mask", cache.switch_length)
        cos_l = gb.initializer(f"cos_cache_long{suffix}", cache.long[0])
        sin_l = gb.initializer(f"sin_cache_long{suffix}", cache.long[1])
        with gb.scope("/model/rotary"):
            longer = gb.node("Greater", [self.attn_inputs.total_length,
                                         gb.constant(cache.switch_length, np.int32)])
            shapes = [["positions", cache.rotary_dim // 2]] * 2
            cos, sin = gb.if_("If", longer, [cos_l, sin_l], [cos, sin], gb.float_type, shapes)
        return cos, sin, cache.rotary_dim

    def embedding_table(self) -> str | tuple[QuantizedWeight, list[str]]:
        """The embedding table, stored on first use (by the lookup or a shared lm_head): a float
        initializer name, or (quantized weight, its initializer names). Shared with lm_head, it
        is quantized as lm_head's policy says."""
        b = self.b
        if self._table is None:
            role, node = ((R.LM_HEAD, "/lm_head/MatMul") if b.shared_embeddings
                          else (R.EMBED, "/model/embed_tokens/Gather"))
            name = b.weight_name(R.EMBED)
            table = b.quantize(role, None, b.weight(R.EMBED), node)
            self._table = (
                (table, quantized_initializers(b.gb, table, name))
                if isinstance(table, QuantizedWeight) else b.gb.initializer(name, table))
        return self._table

    def lookup(self, input_ids: str) -> str:
        table = self.embedding_table()
        if isinstance(table, tuple):
            return embedding_quantized(self.b.gb, "/model/embed_tokens", input_ids, *table)
        return embedding(self.b.gb, "/model/embed_tokens", input_ids, table)

    def attend(self, layer: int, q: str, k: str, v: str) -> str:
        """[RotaryEmbedding under LongRoPE] → GroupQueryAttention (rotary fused otherwise)."""
        b = self.b
        c, gb = b.config, b.gb
        tables = self.ropes(b.rope(layer))  # None: a layer without rotary
        cos, sin, dims = tables or ("", "", 0)
        if self.explicit_rotary and tables:
            q, k = (rotary(gb, f"{n}_rotary", t, cos, sin, self.positions, num_heads=h,
                           rotary_dim=dims)
                    for n, t, h in (("q", q, c.num_attention_heads),
                                    ("k", k, c.num_key_value_heads)))
        q, k = b.after_rotary(layer, q, k)
        sinks = b.attention_sinks(layer)
        if sinks is not None:
            sinks = gb.initializer(sinks[1], sinks[0])
        return group_query_attention(
            gb, "GroupQueryAttention", q, k, v, self.past[layer],
            (f"present.{layer}.key", f"present.{layer}.value"), self.attn_inputs,
            cos, sin, num_heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
            scale=b.attention_scale(), softcap=b.attention_softcap(),
            window=b.sliding_window(layer),
            do_rotary=tables is not None and not self.explicit_rotary, head_sink=sinks)

    def state(self, layer: int, name: str) -> tuple[str, str]:
        """(past, present) of one of ``layer``'s states (``DecoderBuilder.layer_states``): the
        graph input to read and the output name to write."""
        return self.states[layer, name][0], f"present.{layer}.{name}"

    def experts(self, layer: int, x: str, router: str) -> str:
        """A mixture of experts' routed experts (``router``: the router's logits): onnxruntime's
        MoE / QMoE, which run the k picked per token."""
        return self.b.routed_experts(layer, x, router)

    def conv(self, name: str, layer: int, state: str, x: str, weight: np.ndarray,
             weight_name: str, bias: np.ndarray | None, bias_name: str | None,
             activation: str = "none") -> str:
        """A short causal convolution over ``x`` [B, S, C] with ``weight`` [C, 1, K] that
        carries its window in ``layer``'s state ``state``: onnxruntime's
        CausalConvWithState."""
        gb = self.b.gb
        past, present = self.state(layer, state)
        return causal_conv(gb, name, x, gb.initializer(weight_name, weight),
                           None if bias is None else gb.initializer(bias_name, bias), past,
                           present, activation)

    def recurrence(self, name: str, layer: int, state: str, q: str, k: str, v: str,
                   decay: str, rate: str | None, *, q_heads: int, v_heads: int,
                   update_rule: str, scale: float) -> str:
        """Linear attention's state update over ``layer``'s state ``state`` [B, v_heads, dk, dv]
        (``builder.ops.recurrence`` says the math): onnxruntime's LinearAttention."""
        past, present = self.state(layer, state)
        y, _ = self.b.gb.node("LinearAttention", [q, k, v, past, decay, rate or ""], name,
                              outputs=[None, present], domain="com.microsoft",
                              q_num_heads=q_heads, kv_num_heads=v_heads,
                              update_rule=update_rule, scale=scale)
        return y

    def zero_padding(self, x: str) -> str:
        """``x`` [B, S, hidden] with the rows of padding positions (attention_mask 0) set to 0,
        as transformers does before a convolution or recurrence, so that a left-padded row's
        state starts as it would without the padding."""
        gb = self.b.gb
        with gb.scope("/model/zero_padding"):
            if self._valid is None:
                rows = gb.node("Shape", [x], start=1, end=2)
                mask = gb.node("Slice", [self.mask, gb.node("Neg", [rows]),
                                         gb.constant([2**62]), gb.constant([1])])
                self._valid = gb.node("Unsqueeze", [gb.node("Cast", [mask], to=gb.float_type),
                                                    gb.constant([-1])])
            return gb.node("Mul", [x, self._valid])

    def lm_head_projection(self, x: str) -> str:
        b = self.b
        bias = b.lm_head_bias()
        bias_name = b.weight_name(R.LM_HEAD_BIAS) if bias is not None else None
        if b.shared_embeddings:
            table = self.embedding_table()
            if isinstance(table, tuple):  # quantized: MatMulNBits on the lookup's own codes
                with b.gb.scope("/lm_head"):
                    y = matmul_nbits(b.gb, x, *table, b.policy.accuracy_level)
            else:
                y = linear_transposed(b.gb, "/lm_head", x, table)
            if bias is None:
                return y
            with b.gb.scope("/lm_head"):
                return b.gb.node("Add", [y, b.gb.initializer(bias_name, bias)])
        role = R.EMBED if b.config.tie_word_embeddings else R.LM_HEAD
        return b.project("/lm_head", x, R.LM_HEAD, None, b.weight(role),
                         b.weight_name(R.LM_HEAD), bias, bias_name)
