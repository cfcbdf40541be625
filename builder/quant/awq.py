"""Activation-aware scaling (AWQ), streamed: ``int4_algo_config=awq`` / ``awq_last``.

A few input channels of a projection carry most of its input's magnitude; their weights share a
block scale with the rest, and rounding them costs the output far more than rounding the others.
AWQ scales those channels' weights up before rounding (``W diag(s)``, their relative rounding
error shrinks) and the inputs down by the same factor (``x / s``), folded into what computes the
input, so the float model is unchanged:

- q, k, v read input_layernorm's output: its weight is divided by ``s``;
- gate, up read post_attention_layernorm's: the same;
- down reads ``act(gate) * up``: up's rows are divided by ``s`` (the product is linear in up).

(o_proj is left as it is: its input comes through the attention, and with grouped KV heads a
fold into v's rows needs one scale per KV-head channel.)

The calibration prompts run through the model one layer at a time (``quant.stream``, as GPTQ):
a layer first runs as it stands, and per input channel of each group the mean ``|x|`` and mean
``x^2`` over the prompt tokens are summed. Then for each group the scales
``s = mean|x|^a / mean|w|^(1 - a)`` (``mean|w|``: each weight's magnitude relative to its block's
largest, averaged over the output rows), for ``a`` in 0, 0.05, ..., 0.95, and no scaling at all,
are each tried: the group's weights ``W s`` are rounded as the build will store them (MatMulNBits
blocks, or the QDQ weights of -e qnn) and the output error the prompts would see,
``sum_k E[x_k^2] sum_n (Q(W s)_nk / s_k - W_nk)^2`` (rounding errors independent across input
channels, as ``quant.mixed`` measures them), relative to each projection's output energy
``sum_k E[x_k^2] sum_n W_nk^2`` and summed over the group's projections, is kept lowest, where
it saves at least MIN_GAIN_DB against no scaling. The next layer's statistics come
from the float model's outputs (the fold leaves them as they are; one pass per layer); on -e qnn
the layer runs again with its scales folded and its weights rounded, for calibration's ranges
to see them (and the next layer's inputs are the rounded model's). Memory: one layer's weights and a few vectors per layer; time: 21
roundings of at most ROWS rows of each projection (no matmul with the prompts' activations).

A group is scaled only where the layer's graph is the one described above (the norm's output
read by exactly that group's projections; down's input a product with up's output); the others
are rounded as they are, and the log and build_manifest.json (``awq``) say which were scaled,
with the error each scale saved.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx

from builder.errors import ConfigError
from builder.quant.rounding import layer_weights, projection_values, token_rows, valid
from builder.roles import TensorRole as R

logger = logging.getLogger(__name__)

GROUPS = {"attn": (R.Q, R.K, R.V), "mlp": (R.GATE, R.UP), "down": (R.DOWN,)}
NORMS = {R.ATTN_NORM: "attn", R.MLP_NORM: "mlp"}  # the norm whose weight a group's scales fold into
COLUMNS = {R.Q: "attn", R.K: "attn", R.V: "attn", R.QKV: "attn", R.GATE: "mlp", R.UP: "mlp",
           R.GATE_UP: "mlp", R.DOWN: "down"}  # the scales a projection's input columns take
ALPHAS = np.arange(20) / 20
ROWS = 256  # output rows per weight the search rounds (see ``search``)
MIN_GAIN_DB = 1.0  # a group is scaled only where its estimated output error falls this much:
# the estimate sees each projection's output, not what follows (q and k meet in the softmax),
# and on the tests' trained checkpoints savings under 0.7 dB raised the held-out KL as often as
# they lowered it, while outlier channels save 4 dB and more
LIMIT = 100.0  # scales stay within [1/LIMIT, LIMIT] of their geometric middle: the folded norm
# weight and activations stay in fp16's range


class Smoothing:
    """The scales chosen per (layer, group), folded into the weights as the builder reads them
    (``QuantPolicy.fold_norm`` / ``fold_projection``)."""

    def __init__(self) -> None:
        self.scales: dict[tuple[int, str], np.ndarray] = {}
        self.folded: set[tuple[int, str]] = set()  # norms divided (checked by the projections)
        self.record: dict[int, dict[str, dict]] = {}  # per layer, what the search found

    def norm(self, role, layer: int | None, w: np.ndarray) -> np.ndarray:
        s = self.scales.get((layer, NORMS.get(role)))
        if s is None:
            return w
        self.folded.add((layer, NORMS[role]))
        return np.asarray(w, np.float32) / s

    def projection(self, role, layer: int | None, w: np.ndarray, builder) -> np.ndarray:
        """``w`` [N, K] with its input columns times its group's scales, and up's rows (packed:
        the second half of gate_up's, as ``packed_mlp_weights`` stacks them) divided by down's."""
        group = COLUMNS.get(role)
        if group not in (None, "down") and (layer, group) in self.scales \
                and (layer, group) not in self.folded:
            raise ConfigError(
                f"AWQ (int4_algo_config=awq*): {type(builder).__name__} did not fold layer "
                f"{layer}'s {group} scales into its norm (it writes that norm its own "
                "way, not with DecoderBuilder.pre_norm): use rtn or gptq for this model")
        return self.scaled(role, layer, w)

    def input_scales(self, role, layer: int) -> np.ndarray | None:
        """The scales ``role``'s input is divided by (None: not scaled)."""
        return self.scales.get((layer, COLUMNS.get(role)))

    def scaled(self, role, layer: int | None, w: np.ndarray) -> np.ndarray:
        """``projection``'s product, without the check that the norm was folded (GPTQ rounds
        the scaled weights before the layer's graphs are written)."""
        s = self.scales.get((layer, COLUMNS.get(role)))
        down = self.scales.get((layer, "down")) if role in (R.UP, R.GATE_UP) else None
        if s is None and down is None:
            return w
        w = np.array(w, np.float32)
        if s is not None:
            w *= s
        if down is not None:
            w[w.shape[0] - down.size:] /= down[:, None]
        return w


def search(parts: list[tuple[np.ndarray, object]], x_abs: np.ndarray, x_sq: np.ndarray,
           block: int) -> tuple[np.ndarray | None, float, float, float | None]:
    """The group's best scales: (s, or None where none saves MIN_GAIN_DB, the best candidate's
    error, no scaling's error, the best candidate's a).
    ``parts``: each weight [N, K] (float32) with the quantizer that stores it. The error is
    summed over at most ROWS evenly spread output rows of each weight (every row is rounded
    on its own: a sample of them ranks the candidates as all of them do, at a fraction of the
    time)."""
    parts = [(w[::-(-len(w) // ROWS)], quantizer) for w, quantizer in parts]
    w_mean = np.concatenate([relative_magnitude(w, block) for w, _ in parts]).mean(0)

    def error(s):
        total = 0.0
        for w, quantizer in parts:
            ws = w if s is None else w * s
            got = quantizer.fake(ws)
            if s is not None:
                got = got / s
            e = np.square(got - w, dtype=np.float32).sum(0)
            total += float(np.dot(e.astype(np.float64), x_sq)) / energy[id(w)]
        return total

    energy = {id(w): max(float(np.dot(np.square(w, dtype=np.float32).sum(0).astype(np.float64),
                                      x_sq)), 1e-30) for w, _ in parts}

    x = np.maximum(x_abs, 1e-8).astype(np.float64)
    wm = np.maximum(w_mean, 1e-8).astype(np.float64)
    candidates = [(None, None)]
    for alpha in ALPHAS:
        s = x ** alpha / wm ** (1 - alpha)
        s = s / np.sqrt(s.max() * s.min())
        s = np.clip(s, 1 / LIMIT, LIMIT).astype(np.float32)
        if np.all(np.isfinite(s)):
            candidates.append((s, float(alpha)))
    # (numpy's work releases the GIL: the candidates are rounded on every core at once)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        errors = list(pool.map(lambda c: error(c[0]), candidates))
    best = int(np.argmin(errors))  # (the first of equals: no scaling where nothing helps)
    scales, alpha = candidates[best]
    if errors[best] <= 0 or 10 * np.log10(errors[0] / errors[best]) < MIN_GAIN_DB:
        scales = None  # (not worth a change the estimate cannot vouch for)
    return scales, errors[best], errors[0], alpha


def relative_magnitude(w: np.ndarray, block: int) -> np.ndarray:
    """|w| relative to the largest of its block (along K), [N, K]."""
    n, k = w.shape
    block = block if block and k % block == 0 else k
    a = np.abs(w).reshape(n, k // block, block)
    top = a.max(-1, keepdims=True)
    return (a / np.where(top > 0, top, 1)).reshape(n, k)


def groups_of(builder, graph: onnx.GraphProto, layer: int,
              values: dict[R, tuple[str, str]]) -> dict[str, str]:
    """{group: its input value} for the groups whose scales fold exactly in this layer's graph."""
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found = {}
    for group, norm in (("attn", R.ATTN_NORM), ("mlp", R.MLP_NORM)):
        roles = [r for r in GROUPS[group] if r in values]  # (no gate: up alone)
        inputs = {values[r][0] for r in roles}
        if len(inputs) != 1 or norm not in builder.weight_names:
            continue
        x = inputs.pop()
        producer = producers.get(x)
        readers = {id(n) for n in consumers.get(x, [])}
        projections = {id(n) for n in graph.node if n.output and n.output[0] in
                       {values[r][1] for r in roles}}
        if producer is not None and builder.weight_name(norm, layer) in producer.input \
                and readers == projections:
            found[group] = x
    x, up_out = values[R.DOWN][0], values[R.UP][1]
    product = producers.get(x)
    if product is not None and product.op_type == "Mul" and up_out in product.input \
            and len(consumers.get(up_out, [])) == 1:
        found["down"] = x
    return found


class AwqRounding:
    """``LayerStream.run``'s ``rounding``: input statistics from a layer's recorded calls, then
    each group's scales searched and kept in ``smoothing``. With ``reruns`` (calibration, whose
    ranges must see the scales) the layer runs again with them folded and its weights rounded;
    without, the next layer's inputs are the float layer's (the fold does not change them)."""

    def __init__(self, builder, work: Path, smoothing: Smoothing, policy,
                 reruns: bool) -> None:
        self.b, self.work, self.smoothing, self.policy = builder, work, smoothing, policy
        self.reruns = reruns
        self.groups: dict[str, str] | None = None
        self.sums: dict[str, list[np.ndarray]] = {}
        self.tokens = 0

    def add(self, layer: int, calls: list, sequences: list, values: dict) -> None:
        if self.groups is None:
            graph = onnx.load(str(self.work / "context.onnx"), load_external_data=False).graph
            self.groups = groups_of(self.b, graph, layer,
                                    projection_values(self.b, self.work, layer, "awq"))
        for group, value in self.groups.items():
            x = token_rows(values[value], calls, sequences)
            a, q = np.abs(x).sum(0, dtype=np.float64), np.square(x).sum(0, dtype=np.float64)
            if group in self.sums:
                self.sums[group][0] += a
                self.sums[group][1] += q
            else:
                self.sums[group] = [a, q]
        self.tokens += sum(valid(c, s) for c, s in zip(calls, sequences))

    def round(self, layer: int) -> None:
        weights = layer_weights(self.b, layer)
        block = self.policy.block_size
        record = self.smoothing.record.setdefault(layer, {})
        for group in ("attn", "mlp", "down"):  # (down's scales divide up's rows: after mlp's)
            if group not in self.groups or self.tokens == 0:
                record[group] = {"scaled": False}
                continue
            a, q = (v / self.tokens for v in self.sums[group])
            parts = []
            for role in (r for r in GROUPS[group] if r in weights):
                bits = self.policy.bits_for(role, layer, "") or self.policy.bits
                parts.append((np.asarray(weights[role], np.float32),
                              self.policy.quantizer(bits)))
            s, err, plain, alpha = search(parts, a, q, block)
            gain = 10 * np.log10(plain / err) if err > 0 and plain > 0 else 0.0
            record[group] = {"scaled": s is not None, "alpha": alpha,
                             "error_saved_db": round(float(gain), 2) if s is not None else 0.0,
                             "best_db": round(float(gain), 2)}
            if s is not None:
                self.smoothing.scales[layer, group] = s
        self.groups, self.sums, self.tokens = None, {}, 0
        if self.reruns:
            self.b.policy = self.policy.only_layers(set(range(layer + 1)))


class AwqGptq:
    """``LayerStream.run``'s rounding for ``int4_algo_config=awq_gptq``: from one pass of a
    layer, AWQ's scales (``AwqRounding``) and GPTQ's Hessians (``rounding.GptqRounding``);
    then the scales are chosen and GPTQ rounds the scaled weights ``W diag(s)`` against the
    scaled inputs' Hessians (``H / s s^T``: the folded norm hands the projections ``x / s``).
    The layer then runs again with both, as GPTQ's does."""

    reruns = True

    def __init__(self, awq: AwqRounding, gptq) -> None:
        self.awq, self.gptq = awq, gptq

    def add(self, layer: int, calls: list, sequences: list, values: dict) -> None:
        self.awq.add(layer, calls, sequences, values)
        self.gptq.add(layer, calls, sequences, values)

    def round(self, layer: int) -> None:
        self.awq.round(layer)
        self.gptq.round(layer, self.awq.smoothing)


def summary(smoothing: Smoothing) -> dict:
    """build_manifest.json's ``awq``: per group, how many layers were scaled and the mean error
    saved, and each layer's figures."""
    by_group = {}
    for group in GROUPS:
        rows = [r[group] for r in smoothing.record.values() if group in r]
        scaled = [r for r in rows if r["scaled"]]
        by_group[group] = {"layers_scaled": len(scaled), "layers": len(rows),
                           "mean_error_saved_db": round(float(np.mean(
                               [r["error_saved_db"] for r in scaled])), 2) if scaled else 0.0}
    line = "; ".join(f"{g} in {v['layers_scaled']} of {v['layers']} layers" + (
        f" (output error -{v['mean_error_saved_db']} dB)" if v["layers_scaled"] else "")
        for g, v in by_group.items())
    logger.info("AWQ: scaled %s (a group is scaled where that saves %g dB or more)", line,
                MIN_GAIN_DB)
    return {"groups": by_group, "layers": {str(k): v for k, v in smoothing.record.items()}}


def qdq_smoothing(builder, work: Path, policy) -> AwqRounding:
    """``LayerStream.run``'s rounding for a calibrated static (QNN) build: the scales searched
    onto the QDQ weights ``policy`` writes, in the calibration stream, so that each layer's
    ranges are calibrated with its scales folded. Sets ``policy.smoothing``."""
    smoothing = Smoothing()
    object.__setattr__(policy, "smoothing", smoothing)
    logger.info("AWQ: each layer's q/k/v, gate/up and down inputs scaled per channel, searched "
                "against the int%d weights before its ranges are calibrated", policy.bits)
    return AwqRounding(builder, work, smoothing, policy, reruns=True)


def smooth_layers(cls, config, options, weights, policy, plugins, source: Path,
                  work: Path, held_out: list = ()) -> dict:
    """AWQ for every layer of a cpu/cuda build, streamed (``rounding.static_stream``; and
    ``held_out`` through the float layers beside the prompts, not recorded): sets
    ``policy.smoothing``, which the graph writer folds; returns the manifest's figures."""
    import dataclasses

    from builder.quant.rounding import static_stream

    builder, stream, sequences, ids = static_stream(cls, config, options, weights, plugins,
                                                    source, work / "stream")
    smoothing = Smoothing()
    layer_policy = dataclasses.replace(policy, smoothing=smoothing, exclude=frozenset(),
                                       mixed=frozenset())
    logger.info("AWQ: %d layers, one at a time, on %d calibration prompts (%d tokens): each "
                "layer's q/k/v, gate/up and down inputs scaled per channel against the "
                "weights as rounded", config.num_hidden_layers, len(ids), sum(map(len, ids)))
    everything = sequences + list(held_out)
    stream.embed(everything)
    stream.run(everything, desc="AWQ",
               rounding=AwqRounding(builder, stream.work, smoothing, layer_policy, reruns=False))
    (work / "stream").rmdir()
    object.__setattr__(policy, "smoothing", smoothing)
    return summary(smoothing)
