"""Mixed precision by measurement: which projections go to 8 bits when the rest are at 4.

``int4_algo_config=rtn_mixed`` / ``gptq_mixed`` (``-p int4`` on cpu/cuda, ``-p w4a16`` on
qnn). The calibration prompts run through the float model one layer at a time
(``quant.stream``), and each layer again over the first of them once per projection, that
projection rounded as the build would store it at 4 bits (the target's round to nearest:
MatMulNBits blocks, or QDQ blocks): the SQNR of the layer's output, the residual stream, against
the float layer's says how much of what the model carries that rounding loses, through whatever
the layer computes after the projection (see ``OutputNoise``). That is what the weight's own
SQNR misses, and what the projection's own output SQNR misses too.

The units are the weights as the graph stores them (with packed projections: q/k/v as one, gate
and up as one). They are promoted lowest SQNR first, each while its extra bytes (half a
byte per weight from 4 to 8 bits) fit in ``quant_budget`` times the bytes of every layer's
projections at 4 bits; the choice and every unit's figure go to build_manifest.json
(``mixed_precision``). Memory: one layer's weights twice (float, and as rounded) and one batch's
values; time: the layer's pass, and a probe per projection over PROBE_TOKENS tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx

from builder.quant.policy import dequantized
from builder.quant.stream import PREFILL
from builder.quant.rounding import (
    ROLES, layer_weights, projection_values, role_name, roles_of, token_slices, valid,
)
from builder.roles import TensorRole as R

logger = logging.getLogger(__name__)

UNITS = {R.QKV: (R.Q, R.K, R.V), R.GATE_UP: (R.GATE, R.UP)}  # packed weights: their parts
PROBE_TOKENS = 256  # calibration tokens each probe runs (the first prompts'): on the tests'
# trained hybrids the same choice as with 512, each figure within 0.2 dB (measured)


@dataclass
class Unit:
    layer: int
    role: R | str    # as the graph stores it (packed: R.QKV, R.GATE_UP; a layer of another
    # kind: the architecture's own role)
    signal: float    # sum over the probed tokens of the float layer output's squares
    noise: float     # and of its error's, with the weight rounded at the base bits
    weights: int     # elements

    @property
    def sqnr_db(self) -> float:
        if self.noise <= 0:
            return 999.0
        return round(10 * float(np.log10(max(self.signal, 1e-30) / self.noise)), 2)


class OutputNoise:
    """``LayerStream.run``'s ``rounding`` that only measures (``reruns`` False): per layer, what
    rounding each projection (ROLES) at the base bits does to the layer's output, the residual
    stream the next layer reads, on the recorded prefill calls' tokens.

    A projection's own output error says little about that: the same error in q/k/v passes
    through the softmax, in a linear attention's or a state space layer's input projection
    through a recurrence over every earlier token, in o or down straight into the stream; and
    the stream it lands in may be far larger than the projection's output (measured on the
    tests' trained checkpoints: the 4-bit rounding of a Gated DeltaNet's in_proj_qkv, 25.7 dB
    below its own output, was 19.3 dB below the layer's, the most harmful of the model; a
    first layer's out_proj 21 dB below its own, 72 dB below the layer's, harmless). So after
    the layer's pass, a probe per projection: the layer again over the first prompts
    (PROBE_TOKENS of them) with that projection's weight rounded and dequantized, its output
    against the float layer's: one graph whose projection weights may be fed, one session,
    a run per projection. The projection's own output SQNR goes to the manifest too
    (``output_sqnr_db``), from the expected noise of
    independent rounding errors, ``sum_k (sum_t x_tk^2) (sum_n e_nk^2)``: the input's energy
    per channel against the squared error of that channel's weights, on every calibration
    token (the exact ``||X E^T||^2`` adds cross terms of independent errors, which cancel on
    average).

    Cost: a graph written and loaded per layer, and a pass of it over PROBE_TOKENS tokens per
    projection (seven in a Qwen3 layer).
    """

    reruns = False

    def __init__(self, builder, work, quantizer) -> None:
        self.b, self.work, self.quantizer = builder, work, quantizer
        self.values: dict[R, tuple[str, str]] | None = None
        self.errors: dict[R, np.ndarray] = {}  # role: squared weight error per input channel
        self.rounded: dict[R, tuple[str, np.ndarray]] = {}  # role: (its initializer, the
        # weight rounded, dequantized, laid out as the graph stores it)
        self.sizes: dict[R, int] = {}
        self.sums: dict[R, list[float]] = {}
        self.figures: dict[tuple[int, R], tuple[float, float, int]] = {}  # at the layer output
        self.outputs: dict[tuple[int, R], tuple[float, float]] = {}  # at its own output
        self.tokens = 0
        self.probe_calls: set[int] = set()  # the probed prefill calls (ids)
        self.float_rows: dict[int, np.ndarray] = {}  # and the float layer's output rows
        self.probe_noise: dict[R, float] = {}  # role: the layer output's squared error with
        # that projection rounded
        self.probing: list[R] = []  # the projection each probe rounds
        self.probed_tokens = 0  # the tokens the probes run (whole prompts: PROBE_TOKENS or so)

    def probed(self, sequences: list) -> list:
        """The sequences the probes run: the first recorded prompts, PROBE_TOKENS tokens of
        them, as copies of their prefill calls whose hidden states stay the layer's inputs."""
        from builder.quant.stream import Sequence, real_tokens

        chosen, tokens = [], 0
        for s in sequences:
            prefill = [c for c in s.calls if c.kind == PREFILL]
            if tokens >= PROBE_TOKENS or not prefill or not prefill[0].record:
                continue
            chosen.append(Sequence(prefill, s.padding, s.hidden[:len(prefill)]))
            tokens += sum(real_tokens(c, s) for c in prefill)
        self.probe_calls = {id(c) for q in chosen for c in q.calls}
        self.probed_tokens = tokens
        return chosen

    def _output(self, layer: int) -> str:
        from builder.models.static import layer_stream

        last = layer == self.b.config.num_hidden_layers - 1
        return "hidden_states" if last else layer_stream(layer + 1)

    def add(self, layer: int, calls: list, sequences: list, values: dict) -> None:
        if calls[0].kind != PREFILL:  # (calibration's decode calls: a token each, many calls)
            return
        if self.values is None:
            self.values = projection_values(self.b, self.work, layer, "*_mixed")
            graph = onnx.load(str(self.work / "context.onnx"), load_external_data=False).graph
            stored = {t.name: tuple(t.dims) for t in graph.initializer}
            for role, w in layer_weights(self.b, layer).items():
                w = np.asarray(w, np.float32)
                rounded = dequantized(self.quantizer.quantize(w), w.shape).astype(np.float32)
                self.errors[role] = np.square((rounded - w).reshape(w.shape[0], -1)).sum(axis=0)
                name = self.b.initializer_name(role, layer)  # (MatMul's [K, N]; Conv's
                dims = stored[name]  # [N, K, 1, 1])
                self.rounded[role] = name, np.ascontiguousarray(
                    rounded.T if dims == rounded.T.shape else rounded.reshape(dims))
                self.sizes[role] = w.size
        energy = {}  # per input: each channel's sum of squares over the tokens
        for role, (x, y) in self.values.items():
            if x not in energy:  # (float32 sums of a call's tokens, added up in float64)
                energy[x] = sum((np.einsum("tk,tk->k", r, r).astype(np.float64)
                                 for r in token_slices(values[x], calls, sequences)),
                                np.zeros(values[x].shape[-1 if values[x].ndim == 3 else 1]))
            s = self.sums.setdefault(role, [0.0, 0.0])
            s[0] += sum(float(np.einsum("tk,tk->", r, r))
                        for r in token_slices(values[y], calls, sequences))
            s[1] += float(energy[x] @ self.errors[role])
        for call, rows in zip(calls, token_slices(values[self._output(layer)], calls,
                                                  sequences)):
            if id(call) in self.probe_calls:
                self.float_rows[id(call)] = np.array(rows, np.float32)
        self.tokens += sum(valid(c, q) for c, q in zip(calls, sequences))

    def probes(self, layer: int) -> list[dict[str, np.ndarray]]:
        """The probes (``LayerStream._probes``), a projection each: its weight rounded, the
        others as they are ({initializer: values}, every projection's named)."""
        self.probing = list(self.values)
        return [dict([self.rounded[role]]) for role in self.probing]

    def compare(self, layer: int, variant: int, calls: list, sequences: list,
                out: dict) -> None:
        """A probe's layer outputs against the float layer's."""
        noise = 0.0
        for call, rows in zip(calls, token_slices(out[self._output(layer)], calls, sequences)):
            d = rows - self.float_rows[id(call)]
            noise += float(np.einsum("tk,tk->", d, d))
        role = self.probing[variant]
        self.probe_noise[role] = self.probe_noise.get(role, 0.0) + noise

    def round(self, layer: int) -> None:
        signal = sum(float(np.einsum("tk,tk->", r, r)) for r in self.float_rows.values())
        for role in roles_of(self.b, layer):
            if role not in self.probe_noise:
                raise RuntimeError(f"layer {layer}: no probe ran with {role_name(role)} rounded")
            self.figures[layer, role] = signal, self.probe_noise[role], self.sizes[role]
            self.outputs[layer, role] = tuple(self.sums.get(role, (0.0, 0.0)))
        self.values, self.errors, self.rounded, self.sizes, self.sums = None, {}, {}, {}, {}
        self.float_rows, self.probe_noise, self.probing = {}, {}, []


def choose(figures: dict, layers: int, packed: bool, bits: int, budget: float, fits=None
           ) -> tuple[list[Unit], list[Unit], int]:
    """(every unit, lowest SQNR first; those promoted; the budget in bytes). ``figures``:
    {(layer, role): (the layer output's energy, its error with the role rounded, weights)}; a
    packed unit's error is its parts' summed.
    ``fits(layer, extra bytes)``: whether (and then that) the layer's part takes them too (the
    QNN pipeline's parts each stay under their weight limit)."""
    units = []
    own = {}  # a layer of another kind: its own projections (kind_projections), one unit each
    for layer, role in figures:
        if role not in ROLES:
            own.setdefault(layer, []).append(role)
    for layer in range(layers):
        groups = ([(R.QKV, UNITS[R.QKV]), (R.O, (R.O,)), (R.GATE_UP, UNITS[R.GATE_UP]),
                   (R.DOWN, (R.DOWN,))] if packed else [(r, (r,)) for r in ROLES])
        for role, parts in [(r, (r,)) for r in own.get(layer, ())] + groups:
            parts = tuple(p for p in parts if (layer, p) in figures)  # (no gate: up alone)
            if not parts:
                continue
            if role == R.GATE_UP and parts == (R.UP,):
                role = R.UP
            sums = [figures[layer, p] for p in parts]  # (the same layer output's signal)
            units.append(Unit(layer, role, max(f[0] for f in sums), sum(f[1] for f in sums),
                              sum(f[2] for f in sums)))
    units.sort(key=lambda u: (u.sqnr_db, u.layer))
    allowed = int(budget * sum(u.weights for u in units) * bits / 8)
    promoted, spent = [], 0
    for u in units:
        extra = u.weights * (8 - bits) // 8
        if spent + extra <= allowed and (fits is None or fits(u.layer, extra)):
            promoted.append(u)
            spent += extra
    return units, promoted, allowed


def measure(stream, sequences: list, quantizer, packed: bool, bits: int, budget: float,
            fits=None, held_out: list = ()) -> tuple[frozenset, dict]:
    """The float layers over ``sequences`` (a ``LayerStream``'s, embedded here), then
    ``decide``; ``held_out`` (not recorded) go through the same float layers beside them."""
    noise = OutputNoise(stream.b, stream.work, quantizer)
    everything = sequences + list(held_out)
    stream.embed(everything)
    stream.run(everything, desc="measuring", rounding=noise)
    return decide(noise, packed, bits, budget, fits)


def decide(noise: OutputNoise, packed: bool, bits: int, budget: float, fits=None
           ) -> tuple[frozenset, dict]:
    """Every projection's output SQNR at ``bits`` as ``noise`` measured it, and the units
    promoted within ``budget`` (and ``fits``: see ``choose``): (``QuantPolicy.promoted``, the
    manifest's ``mixed_precision``)."""
    layers = noise.b.config.num_hidden_layers
    tokens = noise.tokens // max(1, layers)
    units, promoted, allowed = choose(noise.figures, layers, packed, bits, budget, fits)
    chosen = {(u.layer, u.role) for u in promoted}
    spent = sum(u.weights * (8 - bits) // 8 for u in promoted)
    logger.info("mixed precision: the layer output's SQNR with each of %d projections at %d "
                "bits (on the first %d of %d calibration tokens); at 8 bits: %s (+%s of a %s "
                "budget, quant_budget=%g)",
                len(units), bits, noise.probed_tokens, tokens,
                ", ".join(f"{u.layer}.{role_name(u.role)} ({u.sqnr_db:.1f} dB)"
                          for u in promoted) or "none", size(spent), size(allowed), budget)
    report = {
        "measure": f"the SQNR of the layer's output (the residual stream) with each "
                   f"projection alone at {bits} bits (round to nearest), on the first "
                   f"{noise.probed_tokens} calibration tokens (whole prompts, until "
                   f"{PROBE_TOKENS} are reached); lowest promoted to 8 bits first; "
                   "output_sqnr_db: the projection's own output's, on every calibration token",
        "quant_budget": budget, "tokens": tokens, "budget_bytes": allowed, "extra_bytes": spent,
        "promoted": [{"layer": u.layer, "weight": role_name(u.role), "sqnr_db": u.sqnr_db}
                     for u in promoted],
        "projections": [{"layer": u.layer, "weight": role_name(u.role), "sqnr_db": u.sqnr_db,
                         "output_sqnr_db": own_db(noise.outputs, u),
                         "bits": 8 if (u.layer, u.role) in chosen else bits} for u in units],
    }
    # packed units: their parts too (the static graphs and GPTQ round q/k/v and gate/up apart)
    parts = {(u.layer, p) for u in promoted for p in UNITS.get(u.role, ())}
    return frozenset(chosen | parts), report


def own_db(outputs: dict, unit: Unit) -> float | None:
    """A unit's own output SQNR (its parts' summed) in dB."""
    parts = [outputs[unit.layer, p] for p in UNITS.get(unit.role, (unit.role,))
             if (unit.layer, p) in outputs]
    signal, noise = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return round(10 * float(np.log10(max(signal, 1e-30) / noise)), 2) if noise > 0 else None


def size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def promote(cls, config, options, weights, policy, plugins, source, work, packed: bool,
            held_out: list = ()) -> dict:
    """A cpu/cuda build's measurement (``rounding.static_stream``'s float layers on the
    calibration prompts, and ``held_out`` in float beside them): sets ``policy.promoted``; the
    manifest's ``mixed_precision``."""
    from builder.quant.rounding import static_stream

    _, stream, sequences, _ = static_stream(cls, config, options, weights, plugins, source,
                                            work / "measure")
    promoted, report = measure(stream, sequences, policy.quantizer(policy.bits), packed,
                               policy.bits, policy.budget, held_out=held_out)
    (work / "measure").rmdir()
    object.__setattr__(policy, "promoted", promoted)
    return report
