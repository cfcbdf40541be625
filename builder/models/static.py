"""Static-shape graphs for NPU targets (QNN HTP), built from any DecoderBuilder.

A model becomes four kinds of graph, run in turn by onnxruntime-genai's decoder-pipeline:

    input_ids ─► embeddings ─► inputs_embeds ─► transformer (S = P: prefill; S = 1: decode)
                                                    │  past_seq_len, past/present KV buffer
                                                    ▼
                                              hidden_states ─► lm_head (S = P or 1) ─► logits

The KV cache is a shared past/present buffer of C rows per layer where row = position (see
``builder.ops.attention.static_attention_inputs``); each transformer call writes its S rows into
it. A hybrid's layers of other kinds carry fixed-shape states instead (``lowering.conv``,
``lowering.recurrence``), which a prefill stops at the chunk's last real token (``CHUNK_MASK``,
from the embeddings graph). Every shape is fixed. The graphs run the architecture's own
dataflow and hooks (``DecoderBuilder.embedding``, ``decoder_layer``, ``attention``,
``final_norm``, ``lm_head``, its scale, soft-caps and windows); ``StaticLowering`` writes only
the parts that differ from the single-graph decoder. A builder method these graphs never call
is refused (``check_lowered``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto

from builder.config import RopeConfig
from builder.errors import ConfigError
from builder.ops import (
    decomposed_attention, embedding, linear, rope_cache, rotary_decomposed, split_heads,
    static_attention_inputs, static_attention_mask, static_causal_conv, write_kv,
)
from builder.ops.moe import dense_experts
from builder.ops.recurrence import static_linear_attention
from builder.ops.rotary import RopeTables
from builder.options import QDQ_PRECISIONS
from builder.roles import TensorRole as R

if TYPE_CHECKING:
    from builder.models.base import DecoderBuilder

KV_TYPE = TensorProto.FLOAT16  # the KV cache is fp16 whatever the graph's float type
STATE_TYPE = TensorProto.FLOAT16  # and so are the other layers' states (LFM2's conv window)
# a prefill call's [1, P] float mask of its real tokens: those before the chunk's first pad
# token, as onnxruntime-genai counts them; the embeddings graph computes it from input_ids
CHUNK_MASK = "chunk_mask"
INT32, INT64 = TensorProto.INT32, TensorProto.INT64
TABLE_ROWS = 8192  # vocabulary rows quantized at a time


def kv_names(layer: int) -> tuple[str, str, str, str]:
    return (f"past_key_{layer}", f"past_value_{layer}", f"present_key_{layer}",
            f"present_value_{layer}")


def state_names(layer: int, state: str) -> tuple[str, str]:
    """(past, present) names of one of a layer's states (``DecoderBuilder.layer_states``), as
    the single-graph decoder names them."""
    return f"past.{layer}.{state}", f"present.{layer}.{state}"


def has_states(cls, c) -> bool:
    return any(cls.layer_states(c, i) for i in range(c.num_hidden_layers))


def quantized_precision(b: DecoderBuilder) -> bool:
    """Calibrated QDQ builds (w8a16, w4a16 and their int8/int4 spellings)."""
    return b.options.precision in QDQ_PRECISIONS


def int8_table(b: DecoderBuilder, role: R, name: str,
               vocab: range | None = None) -> tuple[str, str, str]:
    """A [vocab, hidden] table stored as lm_head's MatMul weight: int8 [hidden, vocab],
    symmetric per vocab column (per output channel). Returns the initializer names of codes,
    scales and zero points; stored once in the shared data file, whichever graph comes first.
    ``vocab``: those rows only (their own names; each row's codes and scale as in the whole)."""
    tag = "" if vocab is None else f"_{vocab.start}_{vocab.stop}"
    gb, names = b.gb, (f"{name}_int8{tag}", f"{name}_scale{tag}", f"{name}_zero_point{tag}")
    if names[0] in gb.store.written:
        return tuple(gb.initializer(n, None) for n in names)
    w = b.weight_rows(role)  # the whole table is never in memory in its stored dtype
    if vocab is not None:
        w = w[vocab.start:vocab.stop]
    codes = np.empty(w.shape[::-1], np.int8)          # [hidden, vocab]
    scale = np.empty(w.shape[0], np.float32)
    for start in range(0, w.shape[0], TABLE_ROWS):    # no fp32 copy of the whole table
        rows = w[start:start + TABLE_ROWS].astype(np.float32)
        s = np.maximum(np.abs(rows).max(axis=1), np.float32(1e-12)) / np.float32(127)
        rows /= s[:, None]
        codes[:, start:start + TABLE_ROWS] = np.clip(np.rint(rows, out=rows), -127, 127).T
        scale[start:start + TABLE_ROWS] = s
    del w
    gb.initializer(names[0], codes)
    gb.initializer(names[1], scale.astype(np.float32), quantize=False)  # DequantizeLinear's
    gb.initializer(names[2], np.zeros(scale.shape, np.int8))
    return names


def dequantized(gb, codes: str, scale: str, zero_point: str) -> str:
    return gb.node("DequantizeLinear", [codes, scale, zero_point], "DequantizeLinear", axis=1)


class StaticLowering:
    """How static-shape graphs lower the parts of the dataflow that differ between targets:
    the lookup, rotary + KV cache + attention, and lm_head's projection. Everything else
    (norms, projections, MLP, the architecture's hooks) is the builder's own code."""

    takes_packed_qkv = False  # q, k and v are split before rotary
    vocab: range | None = None  # lm_head over these vocabulary rows only (build_lm_head)

    def __init__(self, builder: DecoderBuilder) -> None:
        self.b = builder

    def lookup(self, input_ids: str) -> str:
        """A float Gather; shared with lm_head, lm_head's int8 [hidden, vocab] table: the S
        columns' codes times their scales (dequantizing the whole table on every call would
        cost a vocabulary of work per token)."""
        b = self.b
        gb = b.gb
        if not b.extra.shared_embeddings:
            return embedding(gb, "/model/embed_tokens", input_ids,
                             gb.initializer(b.weight_name(R.EMBED), b.weight(R.EMBED)))
        with gb.scope("/model/embed_tokens"):  # gather the codes, then scale only those
            codes, scale, _ = int8_table(b, R.EMBED, b.weight_name(R.EMBED))  # zero points 0
            columns = gb.node("Gather", [codes, input_ids], axis=1)          # [hidden, 1, S]
            rows = gb.node("Transpose", [gb.node("Cast", [columns], to=gb.float_type)],
                           perm=[1, 2, 0])                                  # [1, S, hidden]
            scales = gb.node("Unsqueeze", [gb.node("Gather", [scale, input_ids], axis=0),
                                           gb.constant([2])])               # [1, S, 1]
            return gb.node("Mul", [rows, scales])

    def begin_transformer(self, seq_len: int, context_len: int, past_seq_len: str,
                          layers: range, batch: int | str = 1, rows: int | None = None) -> None:
        """Per transformer graph: the KV buffers of its layers (``rows`` rows, default C), the
        in-graph positions and masks, the rotary tables (C positions)."""
        b = self.b
        gb, c = b.gb, b.config
        rows = context_len if rows is None else rows
        kv_shape = [batch, c.num_key_value_heads, rows, c.head_dim]
        self.past = {i: (gb.input(kv_names(i)[0], KV_TYPE, kv_shape),
                         gb.input(kv_names(i)[1], KV_TYPE, kv_shape))
                     for i in layers if b.layer_kind(c, i) == "attention"}
        self.present: dict[int, tuple[str, str]] = {}
        self.seq_len, self.batch = seq_len, batch
        self.inputs = static_attention_inputs(gb, past_seq_len, seq_len, rows, batch)
        self.masks: dict[int | None, str] = {}
        self.states = {(i, st.name): (gb.input(state_names(i, st.name)[0], STATE_TYPE,
                                               [batch, *st.shape]), st.shape)
                       for i in layers for st in b.layer_states(c, i)}
        self.present_states: dict[tuple[int, str], str] = {}
        self._last = self._mask = None
        self.ropes = RopeTables([b.rope(layer) for layer in range(c.num_hidden_layers)],
                                functools.partial(self.rotary_tables, context_len), layers)

    def rotary_tables(self, context_len: int, rope: RopeConfig,
                      suffix: str) -> tuple[str, str, int]:
        """(cos cache, sin cache, rotary dims) of ``rope`` over C positions."""
        b = self.b
        gb, c = b.gb, b.config
        cache = rope_cache(rope, c.head_dim, context_len, c.max_position_embeddings)
        if cache.long is not None and context_len > cache.switch_length:
            raise ConfigError(f"LongRoPE beyond {cache.switch_length} tokens needs a run-time "
                              f"switch of tables, which static graphs cannot take: choose "
                              f"qnn_context_length <= {cache.switch_length}")
        return (gb.initializer(f"cos_cache{suffix}", cache.cos),
                gb.initializer(f"sin_cache{suffix}", cache.sin), cache.rotary_dim)

    def mask(self, window: int | None) -> str:
        """The additive mask for a window (None: causal only), made once per graph. A
        calibrated QDQ graph quantizes the scores together with the mask: a mask of -65504
        would leave uint16 activations a step of about 1, so those graphs get a 0 / -1
        indicator that attention scales by each row's own score spread (relative_mask)."""
        if window not in self.masks:
            self.masks[window] = static_attention_mask(
                self.b.gb, self.inputs, window, -1.0 if quantized_precision(self.b) else None)
        return self.masks[window]

    def attend(self, layer: int, q: str, k: str, v: str) -> str:
        """rotary at the call's positions → write k/v rows into the cache → attention over
        the whole cache."""
        b, s, batch = self.b, self.seq_len, self.batch
        c, gb = b.config, b.gb
        tables = self.ropes(b.rope(layer))  # None: a layer without rotary
        if tables is not None:
            cos, sin, dims = tables
            q, k = (rotary_decomposed(gb, f"{n}_rotary", t, cos, sin, self.inputs.positions,
                                      num_heads=h, head_dim=c.head_dim, rotary_dim=dims,
                                      seq_len=s, batch=batch)
                    for n, t, h in (("q", q, c.num_attention_heads),
                                    ("k", k, c.num_key_value_heads)))
        q, k = b.after_rotary(layer, q, k)
        sinks = b.attention_sinks(layer)
        past, kv_type = self.past[layer], KV_TYPE
        if quantized_precision(b):  # the cache update in the float type: onnxruntime's CPU EP
            # quantizes fp16 13x slower than fp32 (calibration and the accuracy report run it)
            kv_type = gb.float_type
            past = [gb.node("Cast", [p], f"{n}_cache/past/Cast", to=kv_type)
                    for n, p in zip("kv", past)]
        keys, values = (write_kv(gb, f"{n}_cache", p, split_heads(
            gb, f"{n}_heads", t, c.num_key_value_heads, c.head_dim, s, batch), self.inputs,
            kv_type) for n, p, t in zip("kv", past, (k, v)))
        self.present[layer] = (keys, values) if kv_type == KV_TYPE else tuple(
            gb.node("Cast", [t], f"{n}_cache/present/Cast", to=KV_TYPE)
            for n, t in zip("kv", (keys, values)))
        return decomposed_attention(gb, "attention", q, keys, values,
                                    self.mask(b.sliding_window(layer)),
                                    num_heads=c.num_attention_heads,
                                    kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                                    seq_len=s, kv_type=kv_type, scale=b.attention_scale(),
                                    softcap=b.attention_softcap(),
                                    relative_mask=quantized_precision(b), batch=batch,
                                    sinks=None if sinks is None else sinks[0])

    def chunk_mask(self) -> str:
        """The prefill graph's ``CHUNK_MASK`` input [B, S], declared on first use."""
        if self._mask is None:
            self._mask = self.b.gb.input(CHUNK_MASK, self.b.gb.float_type,
                                         [self.batch, self.seq_len])
        return self._mask

    def last_token(self) -> str | None:
        """A prefill call's [B, 1, S] one-hot of its last real token (``CHUNK_MASK``: the mask
        minus itself shifted by one), made once per graph; None in a decode graph (S = 1: its
        token is real)."""
        if self.seq_len == 1:
            return None
        if self._last is None:
            gb, s = self.b.gb, self.seq_len
            mask = self.chunk_mask()
            with gb.scope("/model/chunk_mask"):
                # the next token's mask: the mask moved one left, a 0 after it (data movement:
                # a MatMul with a shift matrix is 1/254 off on the HTP, and the conv states it
                # selects 0.3-3 off, cosine 0.994 against the CPU EP)
                following = gb.node("Pad", [gb.node("Slice", [
                    mask, gb.constant([1]), gb.constant([s]), gb.constant([1])]),
                    gb.constant([0, 0, 0, 1])])
                self._last = gb.node("Unsqueeze", [gb.node("Sub", [mask, following]),
                                                   gb.constant([1])])
        return self._last

    def experts(self, layer: int, x: str, router: str) -> str:
        """A mixture of experts' routed experts from standard ops (``ops.moe.dense_experts``):
        every expert runs on every token and its output is weighted by the routing weight
        onnxruntime's MoE gives it (the softmax's top k, renormalized where the architecture
        says; 0 for the others): the HTP has no op that picks weights by a token's route."""
        b = self.b
        experts = []
        for e in b.experts(layer):
            fc1 = b.expert_weight(layer, e, True)  # gate row j at 2j, up row j at 2j + 1
            experts.append((fc1[0::2], fc1[1::2], b.expert_weight(layer, e, False)))
        biases = b.expert_bias_values(layer)
        prefix = b.weight_name(R.ROUTER, layer).rsplit(".", 2)[0] + ".experts"

        roles = {"gate_proj": R.EXPERT_GATE, "up_proj": R.EXPERT_UP,
                 "down_proj": R.EXPERT_DOWN}

        def project(name, x, e, weight, bias):
            weight_name = f"{prefix}.{e}.{name}.weight"
            return b.project(name, x, roles[name], layer, weight, weight_name, bias,
                             None if bias is None else weight_name.replace("weight", "bias"))

        return dense_experts(b.gb, "experts", x, router, experts, project, k=b.top_k(),
                             normalize=b.normalize_top_k(), swiglu=b.swiglu(), biases=biases)

    def conv(self, name: str, layer: int, state: str, x: str, weight: np.ndarray,
             weight_name: str, bias: np.ndarray | None, bias_name: str | None,
             activation: str = "none") -> str:
        """The short causal convolution from standard ops (``static_causal_conv``): the
        window's K - 1 rows before the call come from the state buffer (fp16, [B, C, K - 1]),
        and the K - 1 rows up to the call's last real token go back into it."""
        gb = self.b.gb
        taps = [gb.initializer(f"{weight_name}.tap{j}", weight[:, 0, j])
                for j in range(weight.shape[-1])]
        y, present = static_causal_conv(
            gb, name, x, taps, None if bias is None else gb.initializer(bias_name, bias),
            self._past(name, layer, state), self.seq_len, self.last_token(), activation)
        self._present(name, layer, state, present)
        return y

    def recurrence(self, name: str, layer: int, state: str, q: str, k: str, v: str,
                   decay: str, rate: str | None, *, q_heads: int, v_heads: int,
                   update_rule: str, scale: float) -> str:
        """Linear attention's state update from standard ops, token by token
        (``static_linear_attention``), over the fp16 state buffer; padded tokens leave the
        state as it is."""
        _, key_dim, value_dim = self.states[layer, state][1]
        mask = None if self.seq_len == 1 else self.chunk_mask()
        y, present = static_linear_attention(
            self.b.gb, name, q, k, v, self._past(name, layer, state), decay, rate,
            q_heads=q_heads, v_heads=v_heads, key_dim=key_dim, value_dim=value_dim,
            seq_len=self.seq_len, scale=scale, update_rule=update_rule, mask=mask,
            quantized=quantized_precision(self.b))
        self._present(name, layer, state, present)
        return y

    def _past(self, name: str, layer: int, state: str) -> str:
        """A state buffer as the graph computes with it (in its float type)."""
        gb, past = self.b.gb, self.states[layer, state][0]
        if gb.float_type == STATE_TYPE:
            return past
        return gb.node("Cast", [past], f"{name}/past/Cast", to=gb.float_type)

    def _present(self, name: str, layer: int, state: str, value: str) -> None:
        """The new state, back in the buffer's type, for ``build_transformer`` to output."""
        gb = self.b.gb
        if gb.float_type != STATE_TYPE:
            value = gb.node("Cast", [value], f"{name}/present/Cast", to=STATE_TYPE)
        self.present_states[layer, state] = value

    def state(self, layer: int, name: str) -> tuple[str, str]:
        """The static graphs write a state through ``conv`` and ``recurrence`` only: a mixer
        that reads one itself (for an op of its own) has no lowering here."""
        raise ConfigError(f"{type(self.b).__name__}'s layer {layer} reads its state {name!r} "
                          "for an op of its own, which the static graphs cannot lower: write "
                          "it with lowering.conv or lowering.recurrence, or leave its kind out "
                          "of static_layer_kinds")

    def zero_padding(self, x: str) -> str:
        """Static graphs take no left padding: a prefill's padding is at its end, after every
        real token (``last_token``)."""
        return x

    def lm_head_projection(self, x: str) -> str:
        """Float MatMul, or in quantized builds int8 per channel (DequantizeLinear → MatMul);
        calibration then adds the uint16 Quantize/Dequantize pairs around it
        (``builder.quant.calibration``)."""
        b = self.b
        gb, c = b.gb, b.config
        role = R.EMBED if c.tie_word_embeddings else R.LM_HEAD
        bias = b.lm_head_bias()
        bias_name = b.weight_name(R.LM_HEAD_BIAS) if bias is not None else None
        if not quantized_precision(b):
            if self.vocab is not None:
                raise ValueError("a vocabulary slice of lm_head is for calibrated builds only")
            return linear(gb, "/lm_head", x, b.weight(role), b.weight_name(R.LM_HEAD), bias,
                          bias_name)
        name = b.weight_name(R.EMBED if b.extra.shared_embeddings else R.LM_HEAD)
        with gb.scope("/lm_head"):
            y = gb.node("MatMul", [x, dequantized(gb, *int8_table(b, role, name, self.vocab))])
            if bias is None:
                return y
            if self.vocab is not None:  # the slice's own bias rows
                bias = bias[self.vocab.start:self.vocab.stop]
                bias_name = f"{bias_name}_{self.vocab.start}_{self.vocab.stop}"
            return gb.node("Add", [y, gb.initializer(bias_name, bias)])


# DecoderBuilder methods the static graphs never call: an architecture that overrides one
# would be a different model here, so the build stops instead.
NOT_LOWERED = {"build": "the single-graph decoder's frame (inputs, outputs, layer loop)"}


def check_lowered(b: DecoderBuilder, target: str) -> None:
    """Stop before anything is written when the architecture asks for what these graphs
    cannot lower, naming the method."""
    from builder.models.base import DecoderBuilder

    def owner(name):
        return next(k for k in type(b).__mro__ if name in vars(k)).__name__

    for name, what in NOT_LOWERED.items():
        if getattr(type(b), name) is not getattr(DecoderBuilder, name):
            raise ConfigError(f"{owner(name)}.{name} overrides {what}, which -e {target} "
                              f"does not use: it has no lowering for -e {target} yet")
    check_layer_kinds(type(b), b.config, target)


def other_layer_kinds(cls, c) -> list[str]:
    """The model's layer kinds beside attention, sorted."""
    return sorted({cls.layer_kind(c, i) for i in range(c.num_hidden_layers)} - {"attention"})


def check_layer_kinds(cls, c, target: str) -> None:
    """Static graphs lower attention layers and the kinds an architecture says they lower
    (``DecoderBuilder.static_layer_kinds``: LFM2's conv layers); a layer of another kind
    (Qwen3.5's linear attention) stops the build, naming it."""
    kinds = set(other_layer_kinds(cls, c)) - set(cls.static_layer_kinds)
    if kinds:
        raise ConfigError(f"{cls.__name__}'s {', '.join(sorted(kinds))} layers (config.json's "
                          f"layer_types) have no lowering for -e {target}'s static graphs yet")


def build_embeddings(b: DecoderBuilder, pad: int | None = None) -> None:
    """input_ids [1, S] (any S) → inputs_embeds; run on the CPU EP. With ``pad`` (the pad
    token id) in a model whose layers carry states: also ``CHUNK_MASK``, 1 at the tokens before
    the first pad, which the prefill graphs read to stop each state at the chunk's last real
    token (onnxruntime-genai pads a prompt's last chunk at its end)."""
    gb, c = b.gb, b.config
    ids = gb.input("input_ids", INT64, [1, "sequence_length"])
    gb.output(b.embedding(ids), "inputs_embeds", gb.float_type,
              [1, "sequence_length", c.hidden_size])
    if pad is not None and has_states(type(b), c):
        with gb.scope("/model/chunk_mask"):
            pads = gb.node("CumSum", [gb.node("Cast", [gb.node(
                "Equal", [ids, gb.constant([pad])])], to=INT64), gb.constant(1)])
            real = gb.node("Equal", [pads, gb.constant([0])], "Equal_1")
            gb.output(gb.node("Cast", [real], "Cast_1", to=gb.float_type), CHUNK_MASK,
                      gb.float_type, [1, "sequence_length"])


def build_lm_head(b: DecoderBuilder, seq_len: int, batch: int | str = 1,
                  vocab: range | None = None) -> None:
    """hidden_states [1, S, hidden] (already normed) → logits [1, S, vocab]; ``batch``: B
    instead of 1, or a name for any batch; ``vocab``: the logits of those rows of the
    vocabulary only (calibrated builds: calibration and the accuracy report run lm_head a slice
    at a time, since onnxruntime dequantizes the whole int8 table to fp32 at every call)."""
    gb, c = b.gb, b.config
    h = gb.input("hidden_states", gb.float_type, [batch, seq_len, c.hidden_size])
    b.lowering.vocab = vocab
    try:
        logits = b.lm_head(h)
    finally:
        b.lowering.vocab = None
    gb.output(logits, "logits", gb.float_type,
              [batch, seq_len, c.vocab_size if vocab is None else len(vocab)])


def build_logits(b: DecoderBuilder) -> None:
    """projected [1, N, V] → logits: the builder's ``logits`` step alone (Gemma 2's soft-cap,
    Granite's scaling), for logits projected outside a graph (the accuracy report's fp32
    reference), on the vocabulary or a slice of it (V: as the calibrated lm_head graphs, which
    apply it to their slice)."""
    gb = b.gb
    x = gb.input("projected", gb.float_type, [1, "rows", "vocab"])
    logits = b.logits(x)
    if logits == x:
        logits = gb.node("Identity", [x], "/lm_head/Identity")
    gb.output(logits, "logits", gb.float_type, [1, "rows", "vocab"])


def layer_stream(layer: int) -> str:
    """The name of the hidden stream entering ``layer`` between two layer-range graphs."""
    return f"hidden_states_layer_{layer}"


def build_transformer(b: DecoderBuilder, seq_len: int, context_len: int,
                      layers: range | None = None, batch: int | str = 1,
                      rows: int | None = None) -> None:
    """inputs_embeds [1, S, hidden] + the KV buffers → hidden_states (after the final norm).

    ``layers``: a consecutive range of layers only, with the KV buffers of those layers. A range
    that does not start at 0 takes the stream entering its first layer
    (``hidden_states_layer_<start>``) instead of inputs_embeds; one that does not end at the
    last layer outputs the stream entering the next (``hidden_states_layer_<stop>``), without
    the final norm. Chained in order, the ranges compute what the whole graph does.

    ``batch``: B calls at once instead of 1 (each with its own past_seq_len row and KV
    buffers), or a name for any batch. ``rows``: KV buffers (and mask columns) of fewer rows
    than C, for calls that reach no further (the rotary tables still span C). Calibration's
    graphs use both: row by row the shipped graphs' math, and every value they compute but the
    extra empty (masked, all-zero) rows of the full buffer."""
    gb, c = b.gb, b.config
    layers = range(c.num_hidden_layers) if layers is None else layers
    rows = context_len if rows is None else rows
    if not (0 <= layers.start < layers.stop <= c.num_hidden_layers and layers.step == 1):
        raise ValueError(f"layers {layers} is not a consecutive range of the model's "
                         f"{c.num_hidden_layers} layers")
    hidden = [batch, seq_len, c.hidden_size]
    first = "inputs_embeds" if layers.start == 0 else layer_stream(layers.start)
    x = gb.input(first, gb.float_type, hidden)
    past_seq_len = gb.input("past_seq_len", INT32, [batch, 1])
    gb.input("total_seq_len", INT32, [1])  # required beside past_seq_len by the runtime; unused
    lowering = b.lowering
    lowering.begin_transformer(seq_len, context_len, past_seq_len, layers, batch, rows)
    residual = None
    for layer in layers:
        x, residual = b.decoder_layer(layer, x, residual)
    if layers.stop == c.num_hidden_layers:
        gb.output(b.final_norm(x, residual), "hidden_states", gb.float_type, hidden)
    else:
        if residual is not None:  # a norm that fuses the residual add left it separate
            x = gb.node("Add", [x, residual], f"/model/layers.{layers.stop}/stream/Add")
        gb.output(x, layer_stream(layers.stop), gb.float_type, hidden)
    kv_shape = [batch, c.num_key_value_heads, rows, c.head_dim]
    for i in layers:
        if i in lowering.present:
            gb.output(lowering.present[i][0], kv_names(i)[2], KV_TYPE, kv_shape)
            gb.output(lowering.present[i][1], kv_names(i)[3], KV_TYPE, kv_shape)
    for (i, name), (_, shape) in lowering.states.items():
        gb.output(lowering.present_states[i, name], state_names(i, name)[1], STATE_TYPE,
                  [batch, *shape])
