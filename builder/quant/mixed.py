"""Mixed precision by measurement: which projections go to 8 bits when the rest are at 4.

``int4_algo_config=rtn_mixed`` / ``gptq_mixed`` (``-p int4`` on cpu/cuda, ``-p w4a16`` on
qnn). The calibration prompts run through the float model one layer at a time
(``quant.stream``); every projection's output on every prompt token is computed with its float
weight and with the weight as the build would store it at 4 bits (the target's round to nearest:
MatMulNBits blocks, or QDQ blocks), and the output SQNR, ``||X W^T||^2 / ||X (Wq - W)^T||^2``
over the tokens, says how much of what that projection computes the rounding loses on the inputs
it really sees. That is what the weight's own SQNR misses: an input channel that carries large
activations meets weight entries too small for their block's scale, rounded to zero.

The units are the weights as the graph stores them (with packed projections: q/k/v as one, gate
and up as one). They are promoted lowest output SQNR first, each while its extra bytes (half a
byte per weight from 4 to 8 bits) fit in ``quant_budget`` times the bytes of every layer's
projections at 4 bits; the choice and every unit's figure go to build_manifest.json
(``mixed_precision``). Memory: one layer's weights twice (float, and as rounded) and one batch's
values; time: two matmuls per projection per batch (the layer's own work, twice).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from builder.quant.policy import dequantized
from builder.quant.stream import PREFILL
from builder.quant.rounding import (
    ROLES, layer_weights, projection_values, role_name, roles_of, token_slices, valid,
)
from builder.roles import TensorRole as R

logger = logging.getLogger(__name__)

UNITS = {R.QKV: (R.Q, R.K, R.V), R.GATE_UP: (R.GATE, R.UP)}  # packed weights: their parts


@dataclass
class Unit:
    layer: int
    role: R | str    # as the graph stores it (packed: R.QKV, R.GATE_UP; a layer of another
    # kind: the architecture's own role)
    signal: float    # sum over tokens of the float output's squares
    noise: float     # and of the error's, with the weight rounded at the base bits
    weights: int     # elements

    @property
    def sqnr_db(self) -> float:
        if self.noise <= 0:
            return 999.0
        return round(10 * float(np.log10(max(self.signal, 1e-30) / self.noise)), 2)


class OutputNoise:
    """``LayerStream.run``'s ``rounding`` that only measures (``reruns`` False): per layer, the
    output signal and rounding noise of each projection (ROLES) on the recorded prefill calls'
    tokens.

    The signal is the graph's own projection output. The noise is the expected one of rounding
    errors that are independent across input channels: ``sum_k (sum_t x_tk^2) (sum_n e_nk^2)``,
    the input's energy per channel against the squared error of that channel's weights; what
    ``||X E^T||^2`` adds to it are cross terms of errors of different channels, which cancel
    on average. It costs an elementwise pass over the inputs, where the exact noise would cost
    a second matmul of the layer per token (most of the measurement's time, measured)."""

    reruns = False

    def __init__(self, builder, work, quantizer) -> None:
        self.b, self.work, self.quantizer = builder, work, quantizer
        self.values: dict[R, tuple[str, str]] | None = None
        self.errors: dict[R, np.ndarray] = {}  # role: squared weight error per input channel
        self.sizes: dict[R, int] = {}
        self.sums: dict[R, list[float]] = {}
        self.figures: dict[tuple[int, R], tuple[float, float, int]] = {}
        self.tokens = 0

    def add(self, layer: int, calls: list, sequences: list, values: dict) -> None:
        if calls[0].kind != PREFILL:  # (calibration's decode calls: a token each, many calls)
            return
        if self.values is None:
            self.values = projection_values(self.b, self.work, layer, "*_mixed")
            for role, w in layer_weights(self.b, layer).items():
                w = np.asarray(w, np.float32)
                error = dequantized(self.quantizer.quantize(w), w.shape).astype(np.float32) - w
                self.errors[role] = np.square(error.reshape(w.shape[0], -1)).sum(axis=0)
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
        self.tokens += sum(valid(c, q) for c, q in zip(calls, sequences))

    def round(self, layer: int) -> None:
        for role in roles_of(self.b, layer):
            signal, noise = self.sums.get(role, (0.0, 0.0))
            self.figures[layer, role] = signal, noise, self.sizes[role]
        self.values, self.errors, self.sizes, self.sums = None, {}, {}, {}


def choose(figures: dict, layers: int, packed: bool, bits: int, budget: float, fits=None
           ) -> tuple[list[Unit], list[Unit], int]:
    """(every unit, lowest output SQNR first; those promoted; the budget in bytes).
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
            sums = [figures[layer, p] for p in parts]
            units.append(Unit(layer, role, sum(f[0] for f in sums), sum(f[1] for f in sums),
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
    logger.info("mixed precision: output SQNR of %d projections at %d bits on %d calibration "
                "tokens; at 8 bits: %s (+%s of a %s budget, quant_budget=%g)",
                len(units), bits, tokens, ", ".join(f"{u.layer}.{role_name(u.role)} "
                                                    f"({u.sqnr_db:.1f} dB)" for u in promoted)
                or "none", size(spent), size(allowed), budget)
    report = {
        "measure": f"each projection's output SQNR at {bits} bits (round to nearest) on the "
                   "calibration prompts' tokens; lowest promoted to 8 bits first",
        "quant_budget": budget, "tokens": tokens, "budget_bytes": allowed, "extra_bytes": spent,
        "promoted": [{"layer": u.layer, "weight": role_name(u.role), "sqnr_db": u.sqnr_db}
                     for u in promoted],
        "projections": [{"layer": u.layer, "weight": role_name(u.role), "sqnr_db": u.sqnr_db,
                         "bits": 8 if (u.layer, u.role) in chosen else bits} for u in units],
    }
    # packed units: their parts too (the static graphs and GPTQ round q/k/v and gate/up apart)
    parts = {(u.layer, p) for u in promoted for p in UNITS.get(u.role, ())}
    return frozenset(chosen | parts), report


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
