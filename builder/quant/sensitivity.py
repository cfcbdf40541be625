"""Where a calibrated build's error comes from: the sensitivity analysis.

Three views, each from values the build computes anyway, written to build_manifest.json
(``sensitivity``) and summarized in one log line:

- **layers**: the residual stream after each layer, quantized pipeline against float, at the
  accuracy report's positions (each held-out prompt's last token and its decode calls): its SQNR
  in dB, and how much each layer lowered it. A layer that costs many dB is where to look.
- **weights**: every projection's stored weight against the float one (SQNR in dB: what
  rounding alone did to it, before any data goes through it), worst first.
- **tensors**: every activation's Q/DQ pair on the held-out prompts' float values: its SQNR (the
  rounding noise of its step, step^2 / 12, against the values' mean square) and how far those
  values went beyond the range calibration gave it (``clipped_by``: the overshoot as a share of
  the range; clipping is what headroom is for). The worst are listed.
- **kinds** (``qnn_sensitivity=true``): the logit KL and cosine against float when only one kind
  of tensor is quantized: the transformer's weights, its activations, or lm_head (its int8
  table and activations); and per layer when only that layer is (weights and activations).
  Each is one more pass of the held-out prompts through the layers: about a report's time each,
  so 3 + the number of layers reports in all; off by default.
"""

from __future__ import annotations

import logging
import math
import re

import numpy as np

from builder.graph import Calibrated
from builder.quant.qdq import UNSIGNED
from builder.quant.report import compared_hidden
from builder.quant.ranges import TensorStats
from builder.quant.stream import Sequence

logger = logging.getLogger(__name__)

WORST = 20  # tensors listed, by SQNR and by clipping


def sqnr_db(signal: float, noise: float) -> float | None:
    """10 log10(signal / noise) in dB; None where there is no noise (exact) or no signal."""
    if noise <= 0 or signal <= 0:
        return None
    return round(10 * math.log10(signal / noise), 2)


def layer_rows(sequences: list[Sequence], window: int) -> np.ndarray:
    """[positions, hidden] float32: the compared positions' rows of the sequences' current
    hidden states (see ``report.compared_hidden``)."""
    return np.stack([h[0, row].astype(np.float32) for s in sequences
                     for _, h, row in compared_hidden(s, window)])


class StreamProbe:
    """``LayerStream.run``'s ``observe``: keeps each layer's output rows at the compared
    positions (positions x hidden x layers floats: 32 x 4096 x 36 x 4 bytes = 19 MB at 8B)."""

    def __init__(self, sequences: list[Sequence], window: int) -> None:
        self.sequences, self.window = sequences, window
        self.rows: list[np.ndarray] = []

    def __call__(self, layer: int, sequences: list[Sequence]) -> None:
        self.rows.append(layer_rows(self.sequences, self.window))


def layer_figures(float_rows: list[np.ndarray], quantized_rows: list[np.ndarray]) -> list[dict]:
    """Per layer: the stream's SQNR after it (quantized against float) and the dB it cost."""
    out, before = [], None
    for layer, (f, q) in enumerate(zip(float_rows, quantized_rows)):
        f64, q64 = f.astype(np.float64), q.astype(np.float64)
        db = sqnr_db(float((f64 * f64).sum()), float(((q64 - f64) ** 2).sum()))
        cost = None if db is None or before is None else round(before - db, 2)
        out.append({"layer": layer, "stream_sqnr_db": db, "cost_db": cost})
        before = db
    return out


def op_type(value: str) -> str:
    """The op that computed a value, from builder's naming (``.../Sigmoid/output_0``)."""
    node = value.rsplit("/output_", 1)[0]
    return re.sub(r"_\d+$", "", node.rsplit("/", 1)[-1])


def tensor_figures(stats: TensorStats, activations: Calibrated) -> list[dict]:
    """Per graph kind and calibrated tensor: the Q/DQ pair's SQNR on the held-out values and
    their overshoot beyond the range the graphs quantize with (headroom included)."""
    qmax = UNSIGNED[activations.bits][0]
    rows = []
    for kind, seen in stats.stats.items():
        if kind not in activations.ranges:
            continue
        qdq = activations.graph(kind)
        for name, (lo, hi, squares, count) in seen.items():
            if name not in qdq.ranges:
                continue  # moved values (Gather, Reshape...): their input's pair
            r_lo, r_hi = qdq.range(name, op_type(name))
            r_lo, r_hi = min(r_lo, 0.0), max(r_hi, 0.0)
            span = r_hi - r_lo
            step = span / qmax if span > 0 else 1.0
            over = max(0.0, hi - r_hi, r_lo - lo) / span if span > 0 else float(hi > lo)
            rows.append({"graph": kind, "tensor": name,
                         "range": [round(r_lo, 6), round(r_hi, 6)],
                         "held_out": [round(lo, 6), round(hi, 6)],
                         "qdq_sqnr_db": sqnr_db(squares / max(count, 1.0), step * step / 12),
                         "clipped_by": round(over, 4)})
    return rows


def kinds_of_error(builder, policy, activations: Calibrated, stream_args: tuple,
                   held_out: list[Sequence], embeddings: list[list],
                   float_head, evaluate) -> dict:
    """The logit error when only one kind of tensor is quantized (``qnn_sensitivity``): the
    transformer's weights, its activations, lm_head; then each layer alone. The transformer
    variants' logits are lm_head in fp32 (``float_head``), lm_head's the build's graphs on the
    float final hidden states. ``evaluate(head, sequences)`` compares with float."""
    from builder.quant.policy import QuantPolicy
    from builder.quant.stream import LayerStream

    def run(weights: QuantPolicy, qdq: Calibrated | None, layers: set[int] | None, desc: str):
        sequences = copies(held_out, embeddings)
        builder.policy = weights
        LayerStream(builder, *stream_args, qdq=qdq, qdq_layers=layers).run(sequences, desc=desc)
        return evaluate(float_head, sequences)

    out = {"transformer weights": run(policy, None, None, "sensitivity: weights"),
           "transformer activations": run(QuantPolicy(), activations, None,
                                          "sensitivity: activations")}
    builder.policy = policy
    head = LayerStream(builder, *stream_args, qdq=activations).logit_slices
    out["lm_head"] = evaluate(head, held_out)
    out["layers"] = [run(policy.only_layers({i}), activations, {i}, f"sensitivity: layer {i}")
                     | {"layer": i} for i in range(builder.config.num_hidden_layers)]
    builder.policy = policy
    return out


def overall(report: dict) -> dict:
    """An accuracy report's prefill and decode figures as one set, over every position."""
    phases = [report["prefill"], report["decode"]]
    n = sum(p["positions"] for p in phases)

    def mean(key):
        return round(sum(p[key] * p["positions"] for p in phases) / n, 8)

    def ppl(key):  # exp of the mean negative log-likelihood over both phases
        return math.exp(sum(math.log(p[key]) * p["positions"] for p in phases) / n)

    return {"positions": n, "mean_cosine": mean("mean_cosine"),
            "min_cosine": round(min(p["min_cosine"] for p in phases), 8),
            "top1_agreement": mean("top1_agreement"), "mean_kl": mean("mean_kl"),
            "max_kl": max(p["max_kl"] for p in phases),
            "perplexity_change": round(ppl("perplexity") / ppl("float_perplexity") - 1, 6)}


def copies(held_out: list[Sequence], embeddings: list[list]) -> list[Sequence]:
    """The held-out sequences again, at their inputs_embeds."""
    return [Sequence(s.calls, s.padding, list(e), s.targets)
            for s, e in zip(held_out, embeddings)]


def weight_figures(errors: dict) -> list[dict]:
    """Per projection: the SQNR of its stored weight against the float one, worst first."""
    rows = [{"layer": layer, "weight": getattr(role, "value", str(role)), "sqnr_db": db}
            for (layer, role), db in errors.items() if db is not None]
    return sorted(rows, key=lambda r: r["sqnr_db"])


def summarize(layers: list[dict], tensors: list[dict], kinds: dict | None,
              weights: list[dict] | None = None) -> dict:
    """The manifest's ``sensitivity`` and its log line."""
    by_sqnr = sorted((t for t in tensors if t["qdq_sqnr_db"] is not None),
                     key=lambda t: t["qdq_sqnr_db"])[:WORST]
    clipped = sorted((t for t in tensors if t["clipped_by"] > 0),
                     key=lambda t: -t["clipped_by"])
    report = {"layers": layers, "lowest_sqnr_tensors": by_sqnr,
              "clipped_tensors": clipped[:WORST], "clipped_count": len(clipped),
              "tensor_count": len(tensors), "weights": weights or []}
    if kinds is not None:
        report["kinds"] = kinds
    costly = sorted((r for r in layers if r["cost_db"] is not None),
                    key=lambda r: -r["cost_db"])[:3]
    last = layers[-1]["stream_sqnr_db"] if layers else None
    parts = [f"stream SQNR after the last layer {last} dB"
             + (f" (layer 0: {layers[0]['stream_sqnr_db']} dB; costliest after it: "
                + ", ".join(f"layer {r['layer']} {r['cost_db']} dB" for r in costly) + ")"
                if layers else "")]
    if weights:
        parts.append("weights: lowest SQNR " + ", ".join(
            f"layer {w['layer']} {w['weight']} {w['sqnr_db']} dB" for w in weights[:3]))
    if by_sqnr:
        parts.append("lowest Q/DQ SQNR: " + ", ".join(
            f"{t['tensor']} ({t['graph']}) {t['qdq_sqnr_db']} dB" for t in by_sqnr[:3]))
    parts.append(f"{len(clipped)} of {len(tensors)} activations beyond their range on the "
                 "held-out prompts" + (": " + ", ".join(
                     f"{t['tensor']} ({t['graph']}) by {100 * t['clipped_by']:.1f}%"
                     for t in clipped[:3]) if clipped else ""))
    if kinds is not None:
        parts.append("KL with only " + ", ".join(
            f"{k} quantized {v['mean_kl']:.2e}" for k, v in kinds.items() if k != "layers"))
    logger.info("sensitivity: %s", "; ".join(parts))
    return report
