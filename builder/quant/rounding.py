"""Data-aware weight rounding in the layer stream: GPTQ with each layer's own calibration inputs.

For ``-p int4`` / ``int8`` with ``int4_algo_config=gptq`` (or ``gptq_last``). The calibration
prompts run through the model one layer at a time (``quant.stream``, the static pipeline's
float layers: the same definition every target lowers): a layer first runs as it stands, and
the inputs of its projections on every prompt token (padding excluded) add up to one Hessian
per input (``2 X^T X``: q, k and v share one, gate and up another); then its projections are
rounded by GPTQ against them (``quant.gptq``), written to the work folder, and the layer runs
again with the rounded weights (as MatMulNBits, as the built graph will), so that the next
layer's Hessians come from what the rounded model computes. Memory: one layer's weights, its
Hessians (hidden^2 and intermediate^2 float32: 38 MB at intermediate 3072) and the prompts'
hidden states. The graph writer then reads the rounded weights back (``quant.rounded``).
Projections that share an input (q/k/v, gate/up) are rounded as one weight: GPTQ rounds each
output row on its own, given the Hessian.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

from builder.errors import ConfigError, OptionError
from builder.quant.gptq import (DAMP, damping, gptq_matmul_nbits, gptq_qdq, inverse_factor,
                                rows_times_inverse, times_inverse)
from builder.quant.rounded import RoundedWeights, role_name, split_rows
from builder.roles import TensorRole as R

logger = logging.getLogger(__name__)

ROLES = (R.Q, R.K, R.V, R.O, R.GATE, R.UP, R.DOWN)  # what the static graphs project with


def stream_lengths(config) -> tuple[int, int]:
    """(P, C) of the -e qnn graphs that cpu/cuda data-aware rounding runs the layers as: 64 and
    512, or half the model's context where that is shorter."""
    prefill, context = 64, min(512, config.max_position_embeddings)
    return (max(1, context // 2) if context <= prefill else prefill), context


def hybrid_problem(cls, config, algorithm: str) -> str | None:
    """Why ``algorithm`` does not take this model's layers of other kinds than attention, or
    its experts; None when it does: no such layers, or gptq and the measured *_mixed knowing
    their projections (``DecoderBuilder.kind_projections``)."""
    from builder.models.moe import MoeBuilder
    from builder.models.static import other_layer_kinds
    from builder.quant.policy import DATA_AWARE, MEASURED

    if algorithm not in DATA_AWARE and algorithm not in MEASURED:
        return None  # (rtn, k_quant: every projection alike)
    if issubclass(cls, MoeBuilder) and cls.num_experts(config):  # (Granite 4.0-H-Micro: none)
        return (f"{algorithm} rounds, scales or measures attention and dense MLP projections, "
                "and this model's MLPs are experts")
    kinds = other_layer_kinds(cls, config)
    if not kinds:
        return None
    if DATA_AWARE.get(algorithm, "gptq") != "gptq":
        return (f"{algorithm} scales attention and MLP projections only, and this model has "
                f"{', '.join(kinds)} layers (gptq and the *_mixed methods take them)")
    uncovered = [k for k in kinds if k not in cls.kind_projections]
    if uncovered:
        return (f"{algorithm} does not know the projections of its {', '.join(uncovered)} "
                "layers (DecoderBuilder.kind_projections)")
    return None


def roles_of(builder, layer: int | None = None) -> tuple:
    """The roles ``builder``'s layers (``layer``'s) project with: ROLES, no gate in an MLP
    without one; a layer of another kind its own projections (``kind_projections``) instead of
    attention's."""
    roles = ROLES if builder.gated_mlp else tuple(r for r in ROLES if r != R.GATE)
    kind = "attention" if layer is None else builder.layer_kind(builder.config, layer)
    if kind == "attention":
        return roles
    return tuple(builder.kind_projections[kind]) + tuple(
        r for r in roles if r in (R.GATE, R.UP, R.DOWN))


class GptqRounding:
    """``LayerStream.run``'s ``rounding``: Hessians from a layer's recorded calls, then GPTQ.

    ``sequential``: a layer's projections are rounded an input at a time, in the layer's order
    (q/k/v, o, gate/up, down; a layer of another kind its own projections first), each against
    what the layer computes with the ones before it rounded, and towards what it computed in
    float: the recorded calls run once more per input after the first (``more``), and a
    projection whose inputs X moved from the float layer's X_f is rounded from
    ``W + W (X_f - X)^T X H^-1`` (the least-squares weight that maps the inputs it gets to the
    outputs the float layer gave: ``X W'^T`` nearest ``X_f W^T``), so that o makes up for
    q/k/v's rounding, gate/up for o's, down for theirs. Otherwise every projection is rounded
    from one pass of the layer as it stood (GPTQ's own order)."""

    def __init__(self, builder, work: Path, rounded: RoundedWeights, round_weight,
                 policy, sequential: bool = False, *, ordered: bool) -> None:
        self.b, self.work, self.rounded = builder, work, rounded
        self.round_weight = round_weight  # (weight [N, K], Hessian, its factor, bits, damping)
        # -> rounded
        self.damped: set[int] = set()  # input widths whose damping the log said
        self.policy = policy  # the static builder's policy once a layer is rounded (its bits
        # per projection: mixed precision's promoted ones at 8)
        self.sequential = sequential
        self.ordered = ordered  # GPTQ in act order (``gptq.gptq``)
        self.hessians: dict[str, np.ndarray] = {}
        self.crosses: dict[str, np.ndarray] = {}  # (X_f - X)^T X of the input being rounded,
        # or W (X_f - X)^T X where the weights reading it have at most half as many rows as
        # it has columns (``by_rows``: the cheaper product, and N x K instead of K x K)
        self.weights: dict[R, np.ndarray] = {}  # those weights (float32), read for it
        self.stacked: dict[str, dict[R, slice]] = {}  # and each one's rows in W C
        self.kept: dict[str, tuple[list, list]] = {}  # by rows, while the tokens are few
        # enough (``by_tokens``): the token rows (X_f - X) W^T and X themselves instead of
        # W C (``rows_times_inverse``: W C H^-1 from them, T x T instead of K x K)
        self.pending: dict[str, list[np.ndarray]] = {}  # token rows not yet in the Hessian
        self.reference: dict[str, dict[tuple, np.ndarray]] = {}  # the float layer's rows of
        # each later input, by call
        self.tokens = 0
        self.inputs: dict[R, str] | None = None
        self.order: list[list[str]] = []  # the layer's inputs, in the groups rounded a pass
        # at a time
        self.step = 0  # the input rounded next

    reruns = True  # the layer's recorded calls run again once it is rounded
    ROWS = 1024  # token rows gathered per input before they enter its Hessian: a product
    # X^T X costs about the same for 8 rows as for hundreds (it writes all K x K; a decode
    # batch has one row per sequence), 2.5 s at K = 12288 on 2 cores

    def add(self, layer: int, calls: list, sequences: list, values: dict) -> None:
        from builder.quant.stream import PREFILL

        if self.inputs is None:
            self.inputs = projection_inputs(self.b, self.work, layer, "gptq")
            self.layer = layer
            inputs = list(dict.fromkeys(self.inputs[r] for r in roles_of(self.b, layer)))
            # sequential: a pass per input (measured on the trained checkpoints, w4a16's
            # report KL: the first input alone then the others together, or all but the last
            # then the last, keep a third to a half of the gain, for one pass instead of three;
            # the first, the middle ones, the last: on the HTP below one pass per input in
            # all six architectures, below plain GPTQ in two)
            self.order = [[v] for v in inputs] if self.sequential else [inputs]
            self.step = 0
        now = self.order[self.step]  # (the later inputs' float rows: kept on the first pass)
        later = [v for group in self.order[1:] for v in group] if self.step == 0 else []
        keys = [(id(s), id(c)) for c, s in zip(calls, sequences)]
        for value in now:
            rows = self.pending.setdefault(value, [])
            rows.append(token_rows(values[value], calls, sequences))
            if self.step > 0:  # the float layer's rows of the same calls
                ref = self.reference[value]
                self.pending.setdefault(value + "/reference", []).append(
                    np.concatenate([ref.pop(k) for k in keys]))
            if sum(map(len, rows)) >= self.ROWS:
                self._accumulate(value)
        for value in later:  # (the later inputs' passes run the prompts' prefill calls: a
            # decode call is one token, most of a pass's time in a few percent of its tokens)
            kept = self.reference.setdefault(value, {})
            for key, call, rows in zip(keys, calls, token_slices(values[value], calls,
                                                                 sequences)):
                if call.kind == PREFILL:
                    kept[key] = np.array(rows, np.float32)
        self.tokens += sum(valid(c, s) for c, s in zip(calls, sequences))

    def _accumulate(self, value: str) -> None:
        rows = self.pending.pop(value, [])
        if not rows:
            return
        x = np.concatenate(rows)
        g = np.dot(x.T, x)  # (float32, as GPTQ's own: thousands of tokens; dot, not @:
        if value in self.hessians:  # a product with its own transpose, half the work)
            self.hessians[value] += g
        else:
            self.hessians[value] = g
        reference = self.pending.pop(value + "/reference", [])
        if reference:
            moved = np.concatenate(reference) - x
            w = self._reading(value)
            if w is None:
                cross = np.dot(moved.T, x)
            else:  # (T x N then N x K: 2 T N K, against T K^2 and N K^2 after)
                moved = np.dot(moved, w.T)
                kept = self.kept.pop(value, ([], []))
                if value not in self.crosses and by_tokens(
                        sum(map(len, kept[1])) + len(x), *w.shape):
                    self.kept[value] = (kept[0] + [moved], kept[1] + [x])
                    return
                # (too many tokens: W C it is)
                moved, x = np.concatenate(kept[0] + [moved]), np.concatenate(kept[1] + [x])
                cross = np.dot(moved.T, x)
            if value in self.crosses:
                self.crosses[value] += cross
            else:
                self.crosses[value] = cross

    def _reading(self, value: str) -> np.ndarray | None:
        """The weights reading ``value``, their rows stacked in ``roles_of``'s order (float32),
        where W (X_f - X)^T X is the cheaper to gather (``by_rows``); None where (X_f - X)^T X
        is."""
        roles = [r for r in roles_of(self.b, self.layer) if self.inputs[r] == value]
        if value not in self.stacked:
            every = layer_weights(self.b, self.layer, roles)
            sizes = [len(every[r]) for r in roles]
            if not by_rows(sum(sizes), np.shape(every[roles[0]])[1]):
                self.stacked[value] = None
            else:
                self.weights.update((r, np.asarray(every[r], np.float32)) for r in roles)
                ends = np.cumsum(sizes)
                self.stacked[value] = {r: slice(e - n, e) for r, e, n in
                                       zip(roles, ends, sizes)}
        if self.stacked[value] is None:
            return None
        return np.concatenate([self.weights[r] for r in roles]) if len(roles) > 1 \
            else self.weights[roles[0]]

    GUARD_ROWS = 256  # output rows the choice between W and its target is measured on

    def _sample(self, rows: int) -> slice:
        """The GUARD_ROWS of a weight's rows the choice of ``_towards`` is measured on."""
        return slice(None, None, max(1, rows // self.GUARD_ROWS))

    def _towards(self, w: np.ndarray, h: np.ndarray, factor, bits: int, damp: float,
                 shift: np.ndarray, wc: np.ndarray, weights: int):
        """``w`` rounded for the float layer's outputs: W + W C H^-1 (``shift``, H damped)
        rounded, or W where that lands closer to them. The target is rounded whole; W is
        rounded on GUARD_ROWS of its rows (``_sample``; ``wc``: W C on those rows) and measured
        against the same rows of it (rows are rounded apart, and the error is the sum of
        theirs: a sample measures it), and rounded whole only where it is the closer. (By
        weight, not by row: each row's closer of the two fits the calibration prompts, and
        measured worse on the HTP in 5 of 6 architectures.)"""
        from builder.quant.policy import dequantized

        shift += w  # (the target, in place)
        towards = self.round_weight(shift, h, factor, bits, damp)
        sample = self._sample(len(w))
        rows = np.ascontiguousarray(w[sample])
        plain = self.round_weight(rows, h, factor, bits, damp)
        closer = error_change(dequantized(plain, rows.shape),
                              dequantized(towards, w.shape)[sample], rows, h, wc) < 0
        self.rounded.towards[0] += weights * closer
        self.rounded.towards[1] += weights
        if closer:
            return towards
        return plain if len(rows) == len(w) else self.round_weight(w, h, factor, bits, damp)

    def more(self, layer: int) -> list[str]:
        """The inputs the layer has left to round next (``sequential``), none when it is
        rounded: its recorded prefill calls run again first, with the projections rounded so
        far, for those values."""
        return [] if self.inputs is None else self.order[self.step]

    def last(self, layer: int) -> bool:
        """Whether the inputs ``more`` names are the layer's last to round: no pass follows
        theirs (the values it computes are not handed on)."""
        return self.inputs is None or self.step == len(self.order) - 1

    def round(self, layer: int, smoothing=None) -> None:
        """GPTQ on the layer's projections. ``smoothing`` (``quant.awq.AwqGptq``): the weights
        are rounded with AWQ's scales on their input columns, against the Hessians of the
        inputs the scaled layer sees (``x / s``: ``H / s s^T``)."""
        b = self.b
        now = set(self.order[self.step])  # (with smoothing: not sequential, every input)
        weights = {**layer_weights(b, layer, [r for r in roles_of(b, layer) if self.inputs[r]
                                               in now and r not in self.weights]),
                   **self.weights}  # (those read for W C: float32)
        if smoothing is not None:
            weights = {r: smoothing.scaled(r, layer, w) for r, w in weights.items()}
        by_input: dict[tuple[str, int], list[R]] = {}  # q/k/v (and gate/up) share an input:
        for role in roles_of(b, layer):  # rounded as one weight at each bits (rows are
            # rounded alone, given H)
            bits = self.policy.bits_for(b.policy_role(role), layer, "", own=role) \
                or self.policy.bits
            by_input.setdefault((self.inputs[role], bits), []).append(role)
        # one input's Hessian at a time (the groups of an input are consecutive)
        current = h = factor = damp = cross = stacked = inverse_cross = None
        for (value, bits), roles in by_input.items():
            if value not in now:
                continue
            if value != current:
                current, h, factor = value, None, None
                self._accumulate(value)
                h = self.hessians.pop(value)
                h *= np.float32(2 / max(1, self.tokens))  # 2 X^T X, in place
                s = None if smoothing is None else smoothing.input_scales(roles[0], layer)
                if s is not None:
                    h /= s[:, None]
                    h /= s[None, :]
                damp = damping(self.tokens, len(h))
                if damp > DAMP and len(h) not in self.damped:
                    self.damped.add(len(h))
                    logger.info("GPTQ: %d calibration tokens against %d inputs: the Hessian "
                                "damped by %.3g of its mean diagonal (%g where tokens are "
                                "many times the inputs)", self.tokens, len(h), damp, DAMP)
                factor = inverse_factor(h, damp, self.ordered)
                cross = self.crosses.pop(value, None)  # C, or W C (``stacked``: its rows)
                stacked = self.stacked.pop(value, None)
                kept = self.kept.pop(value, None)  # or the token rows of W C (by rows)
                if kept is not None:
                    kept = tuple(np.concatenate(part) for part in kept)
                inverse_cross = None
                if cross is not None:
                    cross *= np.float32(2 / max(1, self.tokens))
                    # W C H^-1 as W (C H^-1) where the weights reading the input have more
                    # rows than it has columns (q/k/v, gate/up): 2 K^3 + N K^2 multiply-adds
                    # instead of 3 N K^2 (at an 8B model's gate/up, 0.44x the work)
                    if stacked is None and len(cross) < sum(
                            len(weights[r]) for r in roles_of(b, layer)
                            if self.inputs[r] == value):
                        inverse_cross = times_inverse(cross, h, factor, damp)
            parts = [np.asarray(weights.pop(r), np.float32) for r in roles]
            w = np.concatenate(parts)
            if cross is None and kept is None:
                rounded = self.round_weight(w, h, factor, bits, damp)
            else:
                sample = self._sample(len(w))
                if kept is not None:  # (the token rows: W C H^-1 and the sample's W C)
                    moved = np.concatenate([kept[0][:, stacked[r]] for r in roles], axis=1)
                    scale = 2 / max(1, self.tokens)
                    shift = rows_times_inverse(moved, kept[1], scale, h, damp)
                    wc = np.float32(scale) * np.dot(
                        np.ascontiguousarray(moved[:, sample].T), kept[1])
                elif stacked is not None:  # (W C: the rows of these weights)
                    wc = np.concatenate([cross[stacked[r]] for r in roles])
                    shift, wc = times_inverse(wc, h, factor, damp), wc[sample]
                elif inverse_cross is not None:
                    shift, wc = w @ inverse_cross, w[sample] @ cross
                else:
                    wc = w @ cross
                    shift, wc = times_inverse(wc, h, factor, damp), wc[sample]
                rounded = self._towards(w, h, factor, bits, damp, shift, wc, len(roles))
            sizes = [p.shape[0] for p in parts]
            for role, part in zip(roles, split_rows(rounded, sizes)):
                self.rounded.save(role, layer, part)
        self.hessians, self.crosses, self.pending, self.tokens = {}, {}, {}, 0
        self.stacked, self.weights, self.kept = {}, {}, {}
        self.step += 1
        if self.step < len(self.order):  # the next pass: this layer with the inputs rounded so
            # far rounded, the others in float
            later = {v for group in self.order[self.step:] for v in group}
            left = {(layer, r) for r in roles_of(b, layer) if self.inputs[r] in later}
            self.b.policy = self.policy.only_layers(set(range(layer + 1)), left)
            return
        self.inputs, self.order, self.reference = None, [], {}
        # the next pass runs this layer with its rounded weights; the next layer's first pass
        # runs it in float
        self.b.policy = self.policy.only_layers(set(range(layer + 1)))


def by_rows(n: int, k: int) -> bool:
    """Whether W (X_f - X)^T X, W [N, K], is the cheaper to gather over the calibration
    tokens as (X_f - X) W^T then its product with X (2 T N K), than (X_f - X)^T X then W times
    it (T K^2 + N K^2): where N is at most half of K (an o_proj of more heads than the hidden
    size, a down_proj); it is held N x K then, against K x K (at an 8B model's down_proj,
    0.2 GB against 0.6 GB)."""
    return 2 * n <= k


def by_tokens(t: int, n: int, k: int) -> bool:
    """Whether W C H^-1, W [N, K], is the cheaper to compute from the T token rows themselves
    (``rows_times_inverse``: T^2 K + T^2 N + N T K, and T^3 for the T x T system's inverse in
    float64, counted twice) than from W C and the factor of H^-1 (``times_inverse``: 2 N K^2):
    where the calibration tokens are well under the inputs (an 8B model's down_proj, 12,288
    inputs: 2,600 tokens cost a fifth; a 0.6B model's, 3,072: three times as much)."""
    return t * t * k + t * t * n + n * t * k + 2 * t ** 3 < 2 * n * k * k


def error_change(before: np.ndarray, after: np.ndarray, w: np.ndarray, h: np.ndarray,
                 wc: np.ndarray) -> float:
    """How much the squared error of a rounded weight's outputs (its values [N, K]) on the
    inputs X against the float layer's X_f W^T changes from ``before`` to ``after``, from the
    Hessian H = X^T X and W C, C = (X_f - X)^T X (over the tokens). The error of Q is
    tr(Q H Q^T) - 2 tr(Q X^T X_f W^T) and a constant, X^T X_f = C^T + H; with D = after -
    before, the change is tr(D H (after + before - 2 W)^T) - 2 tr(D (W C)^T): one product."""
    d = after - before
    return float(np.sum((d @ h) * (after + before - 2 * w)) - 2 * np.sum(d * wc))


def projection_inputs(builder, work: Path, layer: int, why: str) -> dict[R, str]:
    """Each projection's input value (ROLES), from the layer's prefill graph as written."""
    return {role: pair[0] for role, pair in projection_values(builder, work, layer, why).items()}


def projection_values(builder, work: Path, layer: int, why: str) -> dict[R, tuple[str, str]]:
    """Each projection's (input, output) values (ROLES), from the layer's prefill graph."""
    graph = onnx.load(str(work / "context.onnx"), load_external_data=False).graph
    by_weight = {n.input[1]: (n.input[0], n.output[0]) for n in graph.node
                 if n.op_type in ("MatMul", "Conv")}
    values = {}
    for role in roles_of(builder, layer):
        name = builder.initializer_name(role, layer)
        if name not in by_weight:
            raise OptionError(f"int4_algo_config={why}: {type(builder).__name__} has no "
                              f"{role_name(role)} projection reading {name} in layer {layer} (it "
                              "writes its attention or MLP its own way): use rtn or k_quant "
                              "for this architecture")
        values[role] = by_weight[name]
    return values


def layer_weights(builder, layer: int, roles=None) -> dict:
    """The layer's projection weights (``roles_of``; ``roles``: those alone, the others read
    with them let go at once) as the architecture hands them to them."""
    kind = builder.layer_kind(builder.config, layer)
    wanted = set(roles_of(builder, layer) if roles is None else roles)
    weights = {}
    if kind == "attention":
        if wanted & {R.Q, R.K, R.V}:
            weights.update(zip((R.Q, R.K, R.V), builder.attention_weights(layer)))
        if R.O in wanted:
            weights[R.O] = builder.weight(R.O, layer)
    else:
        weights = {r: builder.projection_weight(r, layer) for r in builder.kind_projections[kind]
                   if r in wanted}
    if wanted & {R.GATE, R.UP, R.DOWN}:
        weights.update((r, w) for r, w in zip((R.GATE, R.UP, R.DOWN),
                                              builder.mlp_weights(layer))
                       if w is not None)  # (gate: None in an MLP without one)
    return {r: w for r, w in weights.items() if r in wanted}


def token_rows(x: np.ndarray, calls: list, sequences: list) -> np.ndarray:
    """A projection input's rows of prompt tokens, float32 [tokens, K], from a batch's value
    ([batch, S, K]; a 1x1 Conv's: [batch, K, 1, S]), padding left out."""
    return np.concatenate(list(token_slices(x, calls, sequences))).astype(np.float32,
                                                                           copy=False)


def token_slices(x: np.ndarray, calls: list, sequences: list):
    """``token_rows``' rows a call at a time, as views [tokens, K] of ``x``."""
    if x.ndim == 4:
        x = x[:, :, 0, :].transpose(0, 2, 1)
    return (x[b, :valid(c, s)] for b, (c, s) in enumerate(zip(calls, sequences)))


def valid(call, sequence) -> int:
    """How many of a call's rows are prompt tokens: the rows a Hessian counts."""
    from builder.quant.stream import real_tokens

    return real_tokens(call, sequence)


ORDER_LOG = {True: "columns in act order (largest input first; gptq_act_order)",
             False: "columns in the weight's order (gptq_act_order=false)"}


def qdq_rounding(builder, work: Path, folder: Path, policy,
                 sequential: bool = False, *, ordered: bool) -> GptqRounding:
    """``LayerStream.run``'s rounding for a calibrated static (QNN) build: GPTQ onto the QDQ
    weights ``policy`` (``QuantPolicy.static_qdq``) writes, in the calibration stream (its
    ``work`` folder); the layers then calibrate with their rounded weights, kept in ``folder``.
    Sets ``policy.rounded``."""
    rounded = RoundedWeights(folder)
    object.__setattr__(policy, "rounded", rounded)

    def block(bits):
        return policy.block_size if bits == 4 and not policy.qdq_conv else None

    logger.info("GPTQ: each layer's projections rounded onto %s int%d weights against the "
                "inputs the rounded layers before it give them, before its ranges are "
                "calibrated; %s", f"blocks of {block(policy.bits)}" if block(policy.bits)
                else "per-channel", policy.bits, ORDER_LOG[ordered])
    return GptqRounding(builder, work, rounded, lambda w, h, f, bits, damp: gptq_qdq(
        w, h, bits, block(bits), bool(policy.qdq_conv), f, policy.lpbq, damp), policy,
        sequential, ordered=ordered)


def static_stream(cls, config, options, weights, plugins, source: Path, work: Path):
    """The static pipeline's float layers (``qnn`` target, P 64, C 512 or
    max_position_embeddings) for a cpu/cuda build's data-aware steps, with the calibration
    prompts as sequences: (builder, stream, sequences, prompts' token ids)."""
    import dataclasses

    from builder.models.static import check_lowered
    from builder.options import ExecutionProvider, Precision
    from builder.package import generation, token_ids
    from builder.quant.calibration import prompts
    from builder.quant.policy import QuantPolicy
    from builder.quant.stream import LayerStream, sequence

    static = plugins.targets.get("qnn")
    prefill, context = stream_lengths(config)
    o = dataclasses.replace(options, execution_provider=ExecutionProvider.QNN,
                            precision=Precision.FP32, extra=dataclasses.replace(
                                options.extra, qnn_prefill_length=prefill,
                                qnn_context_length=context))
    try:
        builder = cls(config, o, static, weights, None, QuantPolicy())
        check_lowered(builder, "qnn")
        problem = hybrid_problem(cls, config, options.extra.int4_algo_config)
        if problem:
            raise ConfigError(problem)
    except ConfigError as e:  # what the static graphs cannot take: said as this option's
        raise OptionError(f"int4_algo_config={options.extra.int4_algo_config} runs the layers "
                          f"as -e qnn's graphs, and {e}: use rtn or k_quant for this model"
                          ) from None
    pad = token_ids(config, generation(source))[2]
    ids = prompts(options.extra, source, context)
    sequences = [sequence(p, [], prefill, pad, True, False) for p in ids]
    return builder, LayerStream(builder, work, prefill, context, np.float32), sequences, ids


def round_layers(cls, config, options, weights, policy, plugins, source: Path, work: Path,
                 scaled: bool = False, held_out: list = ()) -> None:
    """GPTQ for every layer's projections of a cpu/cuda build, streamed (``static_stream``):
    ``policy.rounded`` then serves them to the graph writer. ``scaled`` (awq_gptq): AWQ's
    scales first, in the same pass (``policy.smoothing``, folded by the graph writer).
    ``held_out``: not recorded, through each layer's first (float) pass only."""
    from builder.quant.awq import AwqGptq, AwqRounding, Smoothing
    from builder.quant.policy import QuantPolicy

    builder, stream, sequences, ids = static_stream(cls, config, options, weights, plugins,
                                                    source, work / "stream")
    rounded = RoundedWeights(work / "rounded")
    smoothing = Smoothing() if scaled else None
    layer_policy = QuantPolicy(bits=policy.bits, block_size=policy.block_size,
                               promoted=policy.promoted,
                               symmetric=policy.symmetric, accuracy_level=policy.accuracy_level,
                               quantizers=policy.quantizers, rounded=rounded,
                               smoothing=smoothing)
    logger.info("GPTQ: %d layers, one at a time, on %d calibration prompts (%d tokens): each "
                "layer's q/k/v, o (or its kind's own projections), gate/up and down rounded "
                "against the inputs the rounded layers before it give them%s; %s",
                config.num_hidden_layers, len(ids),
                sum(map(len, ids)), ", their input channels scaled first by AWQ's search"
                if scaled else "", ORDER_LOG[options.extra.gptq_act_order])
    everything = sequences + list(held_out)
    stream.embed(everything)
    rounding = GptqRounding(builder, stream.work, rounded,
                            lambda w, h, f, bits, damp: gptq_matmul_nbits(
                                w, h, bits, policy.block_size, policy.symmetric, f, damp,
                                options.extra.gptq_act_order),
                            layer_policy, sequential=not scaled and options.extra.gptq_sequential,
                            ordered=options.extra.gptq_act_order)
    if scaled:
        rounding = AwqGptq(AwqRounding(builder, stream.work, smoothing, layer_policy, True),
                           rounding)
    stream.run(everything, desc="GPTQ", rounding=rounding)
    (work / "stream").rmdir()
    rounded.served.clear()  # (what the stream's own graphs read back)
    rounded.missed.clear()
    object.__setattr__(policy, "rounded", rounded)
    if scaled:
        object.__setattr__(policy, "smoothing", smoothing)
