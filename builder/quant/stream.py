"""The static pipeline's transformer run one layer at a time over many token sequences.

Calibration and the accuracy report need the model's activations on dozens of sequences, and a
whole-model onnxruntime session holds every weight in fp32 (10 GB for a 0.6B model once the
quantizer's copy is added). Here each layer is its own pair of graphs (prefill, S = P; decode,
S = 1; ``build_transformer`` over ``range(i, i + 1)``), written by the same builder code as the
shipped graphs into a work folder, run over every call of every sequence, and deleted: memory
holds one layer's weights, the sequences' hidden states between layers and one sequence's KV
buffer of that layer.

A sequence is what onnxruntime-genai feeds one generation: its prompt in chunks of P (the last
padded at its end), then one token per call; every call reads the KV rows the earlier ones wrote.
"""

from __future__ import annotations

import itertools
import logging
import shutil
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnx import helper
from tqdm.auto import tqdm

from builder.errors import SourceError
from builder.graph import (PROJECTION_VALUES, WITH_PROJECTIONS, Calibrated, GraphBuilder,
                           WeightStore)
from builder.models.static import (
    CHUNK_MASK, KV_TYPE, build_embeddings, build_lm_head, build_logits, build_transformer,
    kv_names, layer_stream, state_names,
)
from builder.quant.ranges import Ranges, TensorStats
from builder.runner import session

logger = logging.getLogger(__name__)

PREFILL, DECODE = "context", "iterator"  # the shipped graphs' names, per kind of call
BATCH = 8                 # calls run through a layer's graph at once
BATCH_TOKENS = 256        # and at most this many tokens: every value of a prefill batch is
                          # exposed, about 600 MB at batch 8 x 64 tokens of a 4B layer
LOGITS_BYTES = 64 << 20   # lm_head: logits of at most this size at once
VOCAB_ROWS = 32768        # lm_head: vocabulary rows per graph (see _lm_head_graphs)


@dataclass
class Call:
    ids: list[int]    # the call's tokens: P (the last chunk padded) or 1
    row: int          # past_seq_len: the KV row of the call's last token
    kind: str         # PREFILL or DECODE
    record: bool      # its activations count towards the calibrated ranges


@dataclass
class Sequence:
    calls: list[Call]
    padding: int = 0  # pad tokens at the end of the last prefill chunk
    hidden: list[np.ndarray] = field(default_factory=list)  # per call, between layers
    targets: list[int] = field(default_factory=list)  # held-out: each position's next token


@dataclass
class Extremes:
    """Per dimension of the embeddings over the vocabulary: the largest value and its token,
    the smallest and its token; over some tokens alone (``own``): the largest and smallest."""
    hi: np.ndarray
    hi_ids: np.ndarray
    lo: np.ndarray
    lo_ids: np.ndarray
    own_hi: np.ndarray
    own_lo: np.ndarray


def sequence(prompt: list[int], forced: list[int], window: int, pad: int,
             record_prefill: bool, record_decode: bool) -> Sequence:
    """``prompt`` prefilled in chunks of ``window``, then each ``forced`` token in its own decode
    call (real text fed one token at a time: the decode graph sees the true, growing cache)."""
    padded = -(-len(prompt) // window) * window
    ids = list(prompt) + [pad] * (padded - len(prompt))
    calls = [Call(ids[k:k + window], k + window - 1, PREFILL, record_prefill)
             for k in range(0, padded, window)]
    calls += [Call([t], len(prompt) + j, DECODE, record_decode) for j, t in enumerate(forced)]
    return Sequence(calls, padded - len(prompt))


def real_tokens(call: Call, s: Sequence) -> int:
    """How many of a call's rows are tokens (the last prefill chunk is padded at its end)."""
    if call.kind != PREFILL:
        return len(call.ids)
    prompt = sum(c.kind == PREFILL for c in s.calls) * len(call.ids) - s.padding
    first = call.row - len(call.ids) + 1
    return max(0, min(len(call.ids), prompt - first))


def steps(sequences: list[Sequence], by_record: bool) -> list[tuple[str, bool, list]]:
    """The order the calls run in, batched: (kind, recorded, [(sequence index, call index)]).
    Step t runs every sequence's call t - (longest - its length): the sequences end together,
    so their decode calls coincide (prompts of different lengths have different numbers of
    prefill chunks). A step's calls are grouped by kind (and, with ``by_record``, by whether
    they are recorded), each group in as few batches of at most BATCH calls and BATCH_TOKENS
    tokens as it takes, of even sizes. A sequence's calls run in order: each reads the KV rows
    the earlier ones wrote."""
    longest = max((len(s.calls) for s in sequences), default=0)
    plan = []
    for t in range(longest):
        groups: dict[tuple[str, bool], list[tuple[int, int]]] = {}
        for i, s in enumerate(sequences):
            j = t - (longest - len(s.calls))
            if j >= 0:
                call = s.calls[j]
                groups.setdefault((call.kind, call.record and by_record), []).append((i, j))
        for (kind, record), calls in groups.items():
            i, j = calls[0]
            most = max(1, min(BATCH, BATCH_TOKENS // len(sequences[i].calls[j].ids)))
            parts = -(-len(calls) // most)
            plan += [(kind, record, [calls[k] for k in part])
                     for part in np.array_split(np.arange(len(calls)), parts)]
    return plan


def buffer_rows(sequences: list[Sequence], context: int, method: str | None) -> int:
    """KV buffer rows for calibration's graphs: those the sequences reach and one empty row
    (see ``LayerStream.run``); all C for percentile, which counts every row's value."""
    if method == "percentile":
        return context
    return min(context, max(c.row for s in sequences for c in s.calls) + 2)


class LayerStream:
    """Runs sequences through the pipeline's graphs one layer at a time.

    ``builder``: a DecoderBuilder whose ``gb`` is replaced per graph (float weights for
    calibration, the QDQ policy for the report); ``qdq``: the calibrated activations, to run the
    calibrated QDQ graphs instead of the float ones (``qdq_layers``: in those layers only)."""

    def __init__(self, builder, work: Path, prefill: int, context: int, float_dtype,
                 qdq: Calibrated | None = None, qdq_layers: set[int] | None = None) -> None:
        self.b, self.work, self.qdq_layers = builder, work, qdq_layers
        self.prefill, self.context, self.float_dtype, self.qdq = prefill, context, float_dtype, qdq
        c = builder.config
        self.kv_heads, self.head_dim = c.num_key_value_heads, c.head_dim
        self.kv_dtype = helper.tensor_dtype_to_np_dtype(KV_TYPE)
        work.mkdir(parents=True, exist_ok=True)

    def _write(self, filename: str, kind: str | None, build: Callable, expose: bool | str,
               store: WeightStore, **part) -> None:
        qdq = None if self.qdq is None or kind is None else self.qdq.graph(kind)
        gb = GraphBuilder(filename.removesuffix(".onnx"), float_dtype=self.float_dtype,
                          store=store, qdq=qdq, dequantized_weights=qdq is None)
        self.b.gb = gb
        build(self.b)
        gb.save(self.work / filename, expose=expose, log=logging.DEBUG, **part)

    def _graph(self, filename: str, kind: str | None, build: Callable, expose: bool,
               store: WeightStore) -> object:
        self._write(filename, kind, build, expose, store)
        return session(self.work, filename)

    def _embeddings(self) -> object:
        """A session of the pipeline's own embeddings graph (``_clean`` when done)."""
        store = WeightStore(self.work / "embeddings.data")
        try:
            return self._graph("embeddings.onnx", None, build_embeddings, False, store)
        finally:
            store.close()

    def extremes(self, tokens: Collection[int], vocab: int) -> Extremes:
        """Per dimension of inputs_embeds (as the embeddings graph computes them, a multiplier
        included), over the first ``vocab`` rows of the table (those a tokenizer can give: a
        table padded beyond them has rows no prompt reaches), a slice of rows at a time: the
        largest and the smallest value and the tokens that hold them; over ``tokens`` alone:
        the largest and the smallest value."""
        sess, vocab = self._embeddings(), min(vocab, self.b.config.vocab_size)
        hidden = self.b.config.hidden_size
        hi = np.full(hidden, -np.inf)
        lo, own_hi, own_lo = -hi, hi.copy(), -hi
        hi_ids, lo_ids = np.zeros(hidden, np.int64), np.zeros(hidden, np.int64)
        mine = np.zeros(vocab, bool)
        mine[[t for t in tokens if 0 <= t < vocab]] = True
        step = max(1, LOGITS_BYTES // (4 * hidden))
        for start in range(0, vocab, step):
            ids = np.arange(start, min(vocab, start + step), dtype=np.int64)
            rows = sess.run(None, {"input_ids": ids[None]})[0][0]
            for best, where, pick, better in ((hi, hi_ids, np.argmax, np.greater),
                                              (lo, lo_ids, np.argmin, np.less)):
                at = pick(rows, axis=0)
                value = rows[at, np.arange(hidden)]
                won = better(value, best)
                best[won], where[won] = value[won], ids[at[won]]
            own = rows[mine[ids]]
            if len(own):
                np.maximum(own_hi, own.max(0), out=own_hi)
                np.minimum(own_lo, own.min(0), out=own_lo)
        del sess
        self._clean()
        return Extremes(hi, hi_ids, lo, lo_ids, own_hi, own_lo)

    def embed(self, sequences: list[Sequence]) -> None:
        """Every call's inputs_embeds, from the pipeline's own embeddings graph."""
        sess = self._embeddings()
        vocab = self.b.config.vocab_size
        for s in sequences:
            outside = [i for c in s.calls for i in c.ids if not 0 <= i < vocab]
            if outside:  # (a tokenizer with more tokens than the model's table)
                raise SourceError(f"tokenizer.json: encodes the prompts to token id "
                                  f"{outside[0]}, outside the model's vocabulary of {vocab} "
                                  "(config.json vocab_size); the tokenizer does not belong "
                                  "to this checkpoint")
            s.hidden = [sess.run(None, {"input_ids": np.asarray([c.ids], np.int64)})[0]
                        for c in s.calls]
        del sess
        self._clean()

    def run(self, sequences: list[Sequence], ranges: Ranges | None = None,
            desc: str = "layers", empty_cache: bool = False,
            observe: Callable[[int, list[Sequence]], None] | None = None,
            unrecorded: TensorStats | None = None, rounding=None) -> None:
        """Every layer over every call; each sequence's ``hidden`` ends as the final normed
        hidden states. ``ranges``: widened by the recorded calls' graph inputs and every float
        value the graphs compute. ``empty_cache`` (for comparison only): recorded decode calls
        calibrate on an all-zero KV cache instead of the sequence's own. ``observe(layer,
        sequences)``: called after each layer, the sequences' ``hidden`` then that layer's
        outputs. ``unrecorded`` (with ``ranges``): the statistics of every value the calls that
        are not recorded see. ``rounding`` (data-aware weight rounding, ``quant.rounding``):
        each layer first runs as it stands over every call, exposed, and hands the recorded
        calls' values to ``rounding.add(layer, calls, sequences, values)``; then
        ``rounding.round(layer)`` rounds the layer's weights (while ``rounding.more(layer)``,
        some of them: the recorded prefill calls run with those, and ``add`` and ``round``
        again), and the recorded calls run again, with them, to record their ranges and hand
        their outputs on (the next layer's inputs are the rounded model's); the calls that are
        not recorded (held-out) run only the first time: they stay the float model's. A
        ``rounding`` whose ``reruns`` is False only measures: one pass, ``add`` then
        ``round``, the layer unchanged (``quant.mixed``), with its probes between them (the
        layer over a few sequences with some of its weights rounded: ``_probes``).

        The layer's graphs take any batch: calls of different sequences run together (``steps``),
        up to BATCH at a time, so the layer's weights are read once per batch, not per call.
        Their KV buffers hold only the rows the sequences reach, and one empty row: every value
        the full buffer's graph computes but more of the same zeros and masked columns, so the
        minmax ranges (and the outputs, to within a masked key's e^-30 weight) are the same.
        Percentile keeps all C rows (it counts the zeros)."""
        layers = self.b.config.num_hidden_layers
        # every prefill call before every decode call: a sequence's calls stay in order, and
        # one session (one copy of the layer's weights) is loaded at a time
        plan = sorted(steps(sequences, ranges is not None or rounding is not None),
                      key=lambda step: step[0] != PREFILL)
        rows = buffer_rows(sequences, self.context, None if ranges is None else ranges.method)

        def record(kind, feeds, out, rerun, batch):
            if empty_cache and kind == DECODE and kv_names(layer)[0] in feeds:
                past_k, past_v = kv_names(layer)[:2]
                feeds = {**feeds, past_k: feeds[past_k] * 0, past_v: feeds[past_v] * 0}
                out = rerun(feeds)
            ranges.add(kind, {**feeds, **out})

        def unseen(kind, feeds, out):
            unrecorded.add(kind, {**feeds, **out})

        def inputs(kind, feeds, out, rerun, batch):
            rounding.add(layer, [sequences[i].calls[j] for i, j in batch],
                         [sequences[i] for i, _ in batch], {**feeds, **out})

        ranged = None if ranges is None else record
        seen = None if ranges is None or unrecorded is None else unseen
        for layer in tqdm(range(layers), desc=desc, unit="layer", disable=None):
            if rounding is None:
                self._layer_pass(sequences, layer, plan, rows, ranges is not None, ranged, seen)
            elif not rounding.reruns:  # (a measurement: the layer stays as it is)
                probing = getattr(rounding, "probed", None)  # (the probed sequences'
                probed = probing(sequences) if probing else []  # inputs: before the pass)
                self._layer_pass(sequences, layer, plan, rows,
                                 WITH_PROJECTIONS if ranges is not None else PROJECTION_VALUES,
                                 lambda *a: (ranged and ranged(*a), inputs(*a)), seen)
                if probed:
                    self._probes(probed, layer, rows, rounding)
                rounding.round(layer)
            else:
                # as it stands: the recorded calls' inputs for the rounding (the unrecorded
                # calls go on as they are: the held-out prompts stay the float model's)
                self._layer_pass(sequences, layer, plan, rows,
                                 "all" if seen else PROJECTION_VALUES, inputs, seen,
                                 update_recorded=False)
                rounding.round(layer)
                recorded = [step for step in plan if step[1]]
                given = None
                while getattr(rounding, "more", None) and (wanted := rounding.more(layer)):
                    # (rounded an input at a time: the recorded prefill calls with the
                    # projections rounded so far, for the next input's values: the layer's
                    # graph cut to what computes them from the last pass's, which the
                    # projections rounded since then read)
                    given = self._layer_pass(
                        sequences, layer, [s for s in recorded if s[0] == PREFILL], rows,
                        False, inputs, update_recorded=False, only=wanted, given=given,
                        hand_on=not rounding.last(layer))  # (the last pass's values go
                    # into the rounding's Hessian alone, not held beside it as well)
                    rounding.round(layer)
                # rounded: the recorded calls again, their ranges, their outputs handed on
                self._layer_pass(sequences, layer, recorded, rows, ranges is not None, ranged)
            if observe is not None:
                observe(layer, sequences)

    def _probes(self, probed: list[Sequence], layer: int, rows: int, rounding) -> None:
        """A measurement's probes (``quant.mixed.OutputNoise``): the layer again over the
        ``probed`` sequences' prefill calls once per variant ``rounding.probes(layer)`` gives
        ({initializer name: the values fed for it}: the layer as it stands but for a weight
        rounded), from one graph and one session, its outputs handed to ``rounding.compare``
        with the variant's index; the sequences keep their hidden states."""
        plan = [step for step in steps(probed, True) if step[0] == PREFILL]
        self._layer_pass(probed, layer, plan, rows, False,
                         lambda kind, feeds, out, rerun, batch, variant: rounding.compare(
                             layer, variant, [probed[i].calls[j] for i, j in batch],
                             [probed[i] for i, _ in batch], out),
                         update_recorded=False, variants=rounding.probes(layer))

    def _layer_pass(self, sequences: list[Sequence], layer: int, plan: list, rows: int,
                    expose: bool | str, record=None, unrecorded=None,
                    update_recorded: bool = True, only: Collection[str] = (),
                    given: dict[str, list[np.ndarray]] | None = None, hand_on: bool = True,
                    variants: list[dict[str, np.ndarray]] | None = None
                    ) -> dict[str, list[np.ndarray]] | None:
        """One layer's graphs (every value an output with ``expose``) over every call of the
        plan: ``record(kind, feeds, outputs, rerun, batch)`` on the recorded batches,
        ``unrecorded(kind, feeds, outputs)`` on the others; each call's hidden states become the
        layer's outputs (but the recorded calls' without ``update_recorded``). ``only`` (with
        no call's hidden states to update): those values (and the states the part of the
        layer that computes them carries) are the graphs' outputs, the rest of the layer is not
        run, and they are returned, per batch of the plan (but with ``hand_on`` False: no
        pass follows): an earlier such pass's, ``given`` (the same plan), are fed instead of
        computed. ``variants`` (no call's hidden states to update): the plan runs once per
        variant, {initializer: values fed for it} (every variant's initializers are graph
        inputs too, the stored values where a variant feeds none), on one session, each from
        empty KV buffers and states; ``record`` gets the variant's index too."""
        layers, c = self.b.config.num_hidden_layers, self.b.config
        quantized = self.qdq_layers is None or layer in self.qdq_layers
        kv_dtype = np.uint8 if self.qdq is not None and quantized and self.qdq.kv_bits == 8 \
            else self.kv_dtype  # (the QDQ graphs' uint8 buffers: zero bytes are masked rows)
        # what each sequence carries from call to call in this layer: its KV rows, or the
        # states of a layer of another kind (``layer_states``)
        def empty() -> dict:
            kept = {pair: np.zeros((len(sequences), self.kv_heads, rows, self.head_dim),
                                   kv_dtype)
                    for pair in zip(kv_names(layer)[:2], kv_names(layer)[2:])} \
                if self.b.layer_kind(c, layer) == "attention" else {}
            kept.update((state_names(layer, st.name), np.zeros((len(sequences), *st.shape),
                                                               self.kv_dtype))
                        for st in self.b.layer_states(c, layer))
            return kept

        kept = empty()
        part = {"only": only, "given": given or {}, "states": dict(kept.keys())} if only \
            else {"overridable": sorted(set().union(*variants))} if variants else {}
        store = WeightStore(self.work / "layer.data")
        try:
            kinds = {step[0] for step in plan}  # (the graphs the plan's calls run)
            for kind, s in ((PREFILL, self.prefill), (DECODE, 1)):
                if kind not in kinds:
                    continue
                self._write(f"{kind}.onnx", kind if quantized else None,
                            lambda b, s=s: build_transformer(
                                b, s, self.context, range(layer, layer + 1), "batch", rows),
                            expose, store, **part)
        finally:
            store.close()
        sess = loaded = None
        first = "inputs_embeds" if layer == 0 else layer_stream(layer)
        last = "hidden_states" if layer == layers - 1 else layer_stream(layer + 1)
        masked = bool(self.b.layer_states(c, layer))  # prefill graphs read CHUNK_MASK
        computed = {v: [] for v in only} if hand_on else {}
        runs = list(enumerate(variants)) if variants else [(None, {})]
        for (variant, fed), (step, (kind, recorded, batch)) in itertools.product(
                runs, enumerate(plan)):  # batch: [(sequence index, call index)]
            if variant and step == 0:  # (each variant from the sequences' start; the first
                kept = empty()  # takes the buffers made above)
            members = [i for i, _ in batch]
            feeds = {first: np.concatenate([sequences[i].hidden[j] for i, j in batch]),
                     "past_seq_len": np.array([[sequences[i].calls[j].row]
                                               for i, j in batch], np.int32),
                     "total_seq_len": np.array([self.context], np.int32),
                     **{past: buffer[members] for (past, _), buffer in kept.items()},
                     **{v: values[step] for v, values in (given or {}).items()}, **fed}
            if masked and kind == PREFILL:
                feeds[CHUNK_MASK] = np.array([
                    np.arange(self.prefill) < real_tokens(sequences[i].calls[j], sequences[i])
                    for i, j in batch], self.float_dtype)
            if kind != loaded:
                sess = None  # the other kind's session freed before this one loads
                sess, loaded = session(self.work, f"{kind}.onnx"), kind
            names = [o.name for o in sess.get_outputs()]
            out = dict(zip(names, sess.run(None, feeds)))
            if recorded and record is not None:
                record(kind, feeds, out,
                       lambda fed, sess=sess: dict(zip(names, sess.run(None, fed))), batch,
                       *([] if variant is None else [variant]))
            elif not recorded and unrecorded is not None:
                unrecorded(kind, feeds, out)
            if update_recorded or not recorded:
                for r, (i, j) in enumerate(batch):
                    sequences[i].hidden[j] = out[last][r:r + 1].copy()
            for (_, present), buffer in kept.items():
                if present in out:  # (``only``: the part run may carry none)
                    buffer[members] = out[present]
            for v, values in computed.items():
                values.append(out[v])
            out = feeds = None  # memory holds one batch's values at a time
        sess = None  # freed before the next layer's load
        del kept
        self._clean()
        return computed if only else None

    def _lm_head_graphs(self, expose: bool):
        """(vocabulary rows, graph kind, S, session) of lm_head's graphs over each slice of
        VOCAB_ROWS rows of the vocabulary, one session at a time: onnxruntime dequantizes a
        graph's int8 table to fp32 at every call, which for the whole vocabulary would be the
        build's largest allocation (hidden x vocab x 4 bytes: 2.5 GB at hidden 4096). Int8 scales
        are per vocabulary row and the logits' Q/DQ is per tensor, so a slice computes exactly
        its columns of the whole graph's logits (calibrated: float activations; the report's
        stream: the QDQ graphs)."""
        vocab = self.b.config.vocab_size
        for start in range(0, vocab, VOCAB_ROWS):
            rows = range(start, min(vocab, start + VOCAB_ROWS))
            store = WeightStore(self.work / "lm_head.data")
            try:
                for kind, length in ((PREFILL, self.prefill), (DECODE, 1)):
                    sess = self._graph(f"lm_head_{kind}.onnx", f"lm_head_{kind}",
                                       lambda b: build_lm_head(b, length, "batch", rows), expose,
                                       store)  # (the slice's table written once)
                    yield rows, kind, length, sess
                    del sess
            finally:
                store.close()
            self._clean()

    def lm_head(self, sequences: list[Sequence], ranges: Ranges) -> None:
        """lm_head's graphs (as calibration writes them: int8 weights, float activations) on
        every recorded call's final hidden states: the ranges of their input and logits, calls
        batched up to LOGITS_BYTES of logits."""
        for rows, kind, length, sess in self._lm_head_graphs(True):
            names = [o.name for o in sess.get_outputs()]
            hidden = [h for s in sequences for call, h in zip(s.calls, s.hidden)
                      if call.record and call.kind == kind]
            size = max(1, min(BATCH, LOGITS_BYTES // (length * len(rows) * 4)))
            for k in range(0, len(hidden), size):
                feeds = {"hidden_states": np.concatenate(hidden[k:k + size])}
                out = dict(zip(names, sess.run(None, feeds)))
                # (the input is the same for every slice: its range counted once)
                ranges.add(f"lm_head_{kind}", {**feeds, **out} if rows.start == 0 else out)
            del sess  # before the next graph's session loads its table

    def logit_slices(self, picked: list[tuple[str, np.ndarray, int]]):
        """lm_head's logits at each (graph kind, final hidden states [1, S, hidden], row),
        through this stream's lm_head graphs, a slice of the vocabulary at a time: (vocabulary
        rows, fp32 logits [len(picked), len(rows)]) per slice of VOCAB_ROWS (memory: one
        slice's logits of every position, not the whole vocabulary's)."""
        calls: dict[int, list[int]] = {}  # each call's hidden states run once for its rows
        for i, (_, hidden, _) in enumerate(picked):
            calls.setdefault(id(hidden), []).append(i)
        current = out = None
        for rows, kind, _, sess in self._lm_head_graphs(False):
            if rows != current:  # (each slice has a prefill and a decode graph)
                if current is not None:
                    yield current, out
                current, out = rows, np.empty((len(picked), len(rows)), np.float32)
            for members in calls.values():
                k, hidden, _ = picked[members[0]]
                if k == kind:
                    logits = sess.run(["logits"], {"hidden_states": hidden})[0]
                    for i in members:
                        out[i] = logits[0, picked[i][2]]
            del sess  # before the next graph's session loads its table
        if current is not None:
            yield current, out

    def final_logits(self, projected: np.ndarray) -> np.ndarray:
        """The builder's ``logits`` step (Gemma 2's soft-cap, Granite's scaling) on [N, V]
        logits projected outside a graph (the report's fp32 reference; V: the vocabulary or a
        slice of it, as the lm_head graphs apply it), through a graph of that step alone: the
        same definition as the shipped lm_head graphs'."""
        store = WeightStore(self.work / "logits.data")
        try:
            sess = self._graph("logits.onnx", None, build_logits, False, store)
        finally:
            store.close()
        out = sess.run(["logits"], {"projected": projected[None].astype(np.float32)})[0][0]
        del sess
        for name in ("logits.onnx", "logits.data"):  # (only its own files: another stream of
            (self.work / name).unlink(missing_ok=True)  # this folder may be mid-graph)
        return out

    def _clean(self) -> None:
        for path in self.work.iterdir():
            path.unlink() if path.is_file() else shutil.rmtree(path)
