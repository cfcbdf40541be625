"""What quantization cost: the calibrated QNN pipeline against the float one it was made from.

Held-out prompts (``evaluation_prompts.txt``, none of them a calibration prompt), each continued
by the text that follows it, one token per decode call, run through the float layers (during
calibration) and through the calibrated QDQ layers (after the build), one layer at a time
(``builder.quant.stream``): both see the same tokens at the same positions. Per position: the
cosine of the two logit vectors, whether their top-1 tokens agree, and the KL divergence of the
quantized model's next-token distribution from the float one's (nats). The float logits are
lm_head in fp32 from the checkpoint's weight (then the architecture's own step after it, such as
a soft-cap); the quantized ones the build's lm_head graphs, so the figures include what
lm_head's int8 weights cost. "prefill" is the logits at each prompt's last PROMPT_POSITIONS
tokens (the prefill graph), "decode" those of the decode calls (the decode graph). Where the next token is known
(every position: each prompt is continued by the text after it), the perplexity of both
models on it, and its relative change. The figures go into build_manifest.json and one log
line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from builder.errors import AccuracyError
from builder.quant.calibration import continuation, tokenize
from builder.quant.stream import PREFILL, VOCAB_ROWS, Sequence, sequence
from builder.weights import Rows

logger = logging.getLogger(__name__)

EVALUATION_PROMPTS = Path(__file__).with_name("evaluation_prompts.txt")
SAMPLES = 4   # held-out prompts (their layer passes are most of the report's time)
STEPS = 8     # per prompt: its prompt's tokens, then 7 decode calls
PROMPT_POSITIONS = 32  # of each prompt's tokens, the last ones compared (the report's cost is
                       # positions x vocabulary: at most 4 x (32 + 7) = 156 positions)
ROWS = 128    # positions at a time in the figures' arithmetic (float64 over a vocab slice)


def evaluation_prompts(tokenizer_dir: Path, context: int) -> list[list[int]]:
    return tokenize(EVALUATION_PROMPTS, SAMPLES, tokenizer_dir, max(1, context - STEPS - 1))


def evaluation_sequences(tokenizer_dir: Path, context: int, window: int,
                         pad: int) -> list[Sequence]:
    """The held-out prompts, each continued by STEPS - 1 tokens of the text after it (decoded
    one at a time); ``targets``: each position's next token."""
    ids = evaluation_prompts(tokenizer_dir, context)
    out = []
    for i, p in enumerate(ids):
        following = continuation(ids, i, STEPS)
        s = sequence(p, following[:STEPS - 1], window, pad, False, False)
        s.targets = p[1:] + following
        out.append(s)
    return out


def report_positions(s: Sequence, window: int, prompt_positions: int = PROMPT_POSITIONS
                     ) -> list[tuple[str, np.ndarray, int]]:
    """(graph kind, the call's final hidden states, row) of every reported position: the
    prompt's last ``prompt_positions`` tokens (rows of the prefill calls), then every decode
    call."""
    prompt = sum(1 for c in s.calls if c.kind == PREFILL) * window - s.padding
    picked = [(PREFILL, s.hidden[t // window], t % window)
              for t in range(max(0, prompt - prompt_positions), prompt)]
    return picked + [(c.kind, h, 0) for c, h in zip(s.calls, s.hidden) if c.kind != PREFILL]


def compared_hidden(s: Sequence, window: int) -> list[tuple[str, np.ndarray, int]]:
    """The prompt's last token, then every decode call (the sensitivity's stream positions)."""
    return report_positions(s, window, 1)


def float_logits(hidden: np.ndarray, weight: np.ndarray | Rows,
                 rows: int = 8192) -> np.ndarray:
    """hidden [1, S, H] times weight [V, H] transposed, in fp32, a slice of the vocabulary at a
    time (no fp32 copy of the whole table; from the checkpoint, a slice read at a time)."""
    h = hidden[0].astype(np.float32)
    out = np.empty((h.shape[0], weight.shape[0]), np.float32)
    for start in range(0, weight.shape[0], rows):
        out[:, start:start + rows] = h @ weight[start:start + rows].astype(np.float32).T
    return out[None]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare(expected: np.ndarray, actual: np.ndarray,
            targets: np.ndarray | None = None) -> dict[str, float]:
    """Cosine, top-1 agreement and KL(expected || actual) of [N, V] logits, over the N rows;
    with ``targets`` (each row's next token), both models' perplexity on them."""
    e, a = expected.astype(np.float64), actual.astype(np.float64)
    cosine = (e * a).sum(-1) / np.maximum(np.linalg.norm(e, axis=-1) * np.linalg.norm(a, axis=-1),
                                          1e-30)
    log_p, log_q = log_softmax(e), log_softmax(a)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    out = {"positions": int(len(e)), "mean_cosine": float(cosine.mean()),
           "min_cosine": float(cosine.min()),
           "top1_agreement": float((e.argmax(-1) == a.argmax(-1)).mean()),
           "mean_kl": float(kl.mean()), "max_kl": float(kl.max())}
    if targets is not None:
        rows = np.arange(len(e))
        float_ppl = float(np.exp(-log_p[rows, targets].mean()))
        ppl = float(np.exp(-log_q[rows, targets].mean()))
        out.update(float_perplexity=float_ppl, perplexity=ppl,
                   perplexity_change=ppl / float_ppl - 1)
    return out


def float_head(lm_head: np.ndarray | Rows,
               finish: Callable[[np.ndarray], np.ndarray] | None = None,
               bias: np.ndarray | None = None):
    """A ``head`` for ``accuracy_report``: lm_head in fp32 from the checkpoint (plus its
    ``bias``), then the architecture's final step, on [(graph kind, hidden [1, S, H], row)], a
    slice of VOCAB_ROWS of the vocabulary at a time, as ``LayerStream.logit_slices``."""
    def head(picked: list):
        hidden = np.stack([h[0, row] for _, h, row in picked])[None]
        for start in range(0, lm_head.shape[0], VOCAB_ROWS):
            rows = range(start, min(lm_head.shape[0], start + VOCAB_ROWS))
            logits = float_logits(hidden, lm_head[rows.start:rows.stop])[0]
            if bias is not None:
                logits += bias[rows.start:rows.stop].astype(np.float32)
            yield rows, logits if finish is None else finish(logits)
    return head


class Agreement:
    """``compare``'s figures for N positions, from their logits a slice of the vocabulary at a
    time (never the whole vocabulary's logits of every position): per position the running
    dot products, arg-maxes, log-sum-exps (online, rescaled as the maximum grows) and
    sum exp(e - m) (e - a), from which KL(p || q) = sum p (e - a) - lse(e) + lse(a)."""

    def __init__(self, targets: np.ndarray | None, n: int) -> None:
        zeros = np.zeros(n)
        self.targets = targets
        self.dot, self.ee, self.aa, self.t = zeros.copy(), zeros.copy(), zeros.copy(), zeros
        self.s_e, self.s_a = np.zeros(n), np.zeros(n)
        self.m_e, self.m_a = np.full(n, -np.inf), np.full(n, -np.inf)
        self.top_e, self.top_a = np.full(n, -np.inf), np.full(n, -np.inf)
        self.arg_e, self.arg_a = np.zeros(n, np.int64), np.zeros(n, np.int64)
        self.tgt_e, self.tgt_a = np.zeros(n), np.zeros(n)

    def update(self, rows: range, expected: np.ndarray, actual: np.ndarray) -> None:
        """Add a vocabulary slice's logits [N, len(rows)] of every position."""
        for start in range(0, len(expected), ROWS):  # (float64 temporaries of ROWS rows)
            self._update(slice(start, start + ROWS), rows, expected[start:start + ROWS],
                         actual[start:start + ROWS])

    def _update(self, at: slice, rows: range, expected: np.ndarray, actual: np.ndarray) -> None:
        e, a = expected.astype(np.float64), actual.astype(np.float64)
        n = np.arange(len(e))
        self.dot[at] += (e * a).sum(-1)
        self.ee[at] += (e * e).sum(-1)
        self.aa[at] += (a * a).sum(-1)
        for x, top, arg in ((e, self.top_e[at], self.arg_e[at]), (a, self.top_a[at],
                                                                 self.arg_a[at])):
            i = x.argmax(-1)  # (top and arg: views of the accumulators)
            better = x[n, i] > top  # (strictly: the first of equal maxima, as argmax)
            top[better], arg[better] = x[n, i][better], rows.start + i[better]
        m = np.maximum(self.m_e[at], e.max(-1))
        rescale = np.exp(self.m_e[at] - m)
        w = np.exp(e - m[:, None])
        self.s_e[at] = self.s_e[at] * rescale + w.sum(-1)
        self.t[at] = self.t[at] * rescale + (w * (e - a)).sum(-1)
        self.m_e[at] = m
        m = np.maximum(self.m_a[at], a.max(-1))
        self.s_a[at] = self.s_a[at] * np.exp(self.m_a[at] - m) + np.exp(a - m[:, None]).sum(-1)
        self.m_a[at] = m
        if self.targets is not None:
            targets = self.targets[at]
            inside = np.flatnonzero((targets >= rows.start) & (targets < rows.stop))
            self.tgt_e[at][inside] = e[inside, targets[inside] - rows.start]
            self.tgt_a[at][inside] = a[inside, targets[inside] - rows.start]

    def result(self, where: np.ndarray | slice = slice(None)) -> dict[str, float]:
        """The figures over the positions ``where``."""
        cosine = (self.dot / np.maximum(np.sqrt(self.ee * self.aa), 1e-30))[where]
        lse_e, lse_a = self.m_e + np.log(self.s_e), self.m_a + np.log(self.s_a)
        kl = (self.t / self.s_e - lse_e + lse_a)[where]
        out = {"positions": int(len(cosine)), "mean_cosine": float(cosine.mean()),
               "min_cosine": float(cosine.min()),
               "top1_agreement": float((self.arg_e == self.arg_a)[where].mean()),
               "mean_kl": float(kl.mean()), "max_kl": float(kl.max())}
        if self.targets is not None:
            float_ppl = float(np.exp((lse_e - self.tgt_e)[where].mean()))
            ppl = float(np.exp((lse_a - self.tgt_a)[where].mean()))
            out.update(float_perplexity=float_ppl, perplexity=ppl,
                       perplexity_change=ppl / float_ppl - 1)
        return out


def accuracy_report(head: Callable[[list], np.ndarray], float_runs: list[Sequence],
                    quantized: list[Sequence], window: int, lm_head: np.ndarray | Rows,
                    label: str, finish: Callable[[np.ndarray], np.ndarray] | None = None,
                    log: bool = True, bias: np.ndarray | None = None) -> dict:
    """``quantized`` (final hidden states of the calibrated layers, lm_head by ``head``: the
    calibrated stream's ``LayerStream.logit_slices``, the build's lm_head graphs a slice of the
    vocabulary at a time) against ``float_runs`` (float layers, lm_head in fp32, then
    ``finish``: the builder's own step after the projection, ``LayerStream.final_logits``;
    ``bias``: lm_head's), prefill and decode."""
    positions = {"prefill": [], "decode": []}
    targets = {"prefill": [], "decode": []}
    for f, q in zip(float_runs, quantized):
        pairs = list(zip(report_positions(f, window), report_positions(q, window)))
        prompt = len(pairs) - (STEPS - 1)
        positions["prefill"] += pairs[:prompt]
        positions["decode"] += pairs[prompt:]
        targets["prefill"] += f.targets[len(f.targets) - len(pairs):][:prompt]
        targets["decode"] += f.targets[len(f.targets) - len(pairs):][prompt:]
    pairs = positions["prefill"] + positions["decode"]
    agreement = Agreement(np.asarray(targets["prefill"] + targets["decode"], np.int64),
                          len(pairs))
    for (rows, expected), (got_rows, actual) in zip(
            float_head(lm_head, finish, bias)([f for f, _ in pairs]),
            head([q for _, q in pairs])):
        if rows != got_rows:
            raise ValueError(f"vocabulary slices differ: {rows} and {got_rows}")
        agreement.update(rows, expected, actual)
    count = len(positions["prefill"])
    phases = {"prefill": agreement.result(slice(0, count)),
              "decode": agreement.result(slice(count, None))}
    report = {"against": "the float model: the float layers of the same graphs, lm_head in fp32 "
                         "from the checkpoint" + (" and the architecture's final logits step"
                                                  if finish is not None else ""),
              "precision": label, "prompts": len(float_runs), "steps": STEPS,
              "source": EVALUATION_PROMPTS.name, **phases}
    if not log:
        return report
    logger.info("accuracy of %s against float on %d held-out prompts: %s", label,
                len(float_runs),
                "; ".join(f"{phase} ({m['positions']} positions) cosine {m['mean_cosine']:.6f} "
                          f"(min {m['min_cosine']:.6f}), top-1 {100 * m['top1_agreement']:.1f}%, "
                          f"KL {m['mean_kl']:.2e}, perplexity {m['float_perplexity']:.3f} -> "
                          f"{m['perplexity']:.3f} ({100 * m['perplexity_change']:+.2f}%)"
                          for phase, m in phases.items()))
    return report


def quantized_head(lm_head: Rows, policy, finish: Callable[[np.ndarray], np.ndarray] | None,
                   bias: np.ndarray | None = None):
    """A ``head`` for ``accuracy_report`` (cpu/cuda builds): lm_head's weight as the build
    stores it (``policy``: its bits, rtn), dequantized, in fp32, then the final step, a slice of
    VOCAB_ROWS of the vocabulary at a time (MatMulNBits blocks run along each row: a slice's
    rows are rounded as in the whole table)."""
    from builder.quant.policy import dequantized
    from builder.roles import TensorRole as R

    bits = policy.bits_for(R.LM_HEAD, None, "/lm_head/MatMul")

    def table(start, stop):
        w = np.asarray(lm_head[start:stop], np.float32)
        if bits is None:
            return w
        return dequantized(policy.quantizer(bits).quantize(w), w.shape)

    def head(picked: list):
        hidden = np.stack([h[0, row] for _, h, row in picked])[None]
        for start in range(0, lm_head.shape[0], VOCAB_ROWS):
            rows = range(start, min(lm_head.shape[0], start + VOCAB_ROWS))
            logits = float_logits(hidden, table(rows.start, rows.stop))[0]
            if bias is not None:
                logits += bias[rows.start:rows.stop].astype(np.float32)
            yield rows, logits if finish is None else finish(logits)
    return head


def held_out_sequences(config, source: Path) -> list[Sequence]:
    """The held-out prompts as a cpu/cuda build's data-aware stage streams them
    (``rounding.static_stream``'s lengths and pad token), for it to run them in float beside
    its calibration prompts (``stream_report``'s float model)."""
    from builder.package import generation, token_ids
    from builder.quant.rounding import stream_lengths

    prefill, context = stream_lengths(config)
    return evaluation_sequences(source, context, prefill, token_ids(config,
                                                                    generation(source))[2])


def stream_report(cls, config, options, weights, policy, plugins, source: Path,
                  work: Path, held_out: list[Sequence] | None = None) -> dict:
    """The accuracy report of a cpu/cuda build whose weights were chosen with calibration data
    (GPTQ, AWQ, mixed precision): the held-out prompts through the static pipeline's layers
    (``rounding.static_stream``: the definition every target lowers) in float, then with the
    layers' weights as the build stores them (MatMulNBits, as rounded or scaled), lm_head as
    stored (``quantized_head``); the lookup is float in both. ``held_out``
    (``held_out_sequences``): already run in float, unrecorded, beside the calibration prompts
    of the build's data-aware stage, whose float layers they are (one pass of the layers
    less)."""
    from builder.package import generation, token_ids
    from builder.quant.rounding import static_stream
    from builder.roles import TensorRole as R

    builder, stream, _, _ = static_stream(cls, config, options, weights, plugins, source, work)
    pad = token_ids(config, generation(source))[2]
    quantized = evaluation_sequences(source, stream.context, stream.prefill, pad)
    if held_out is None:
        held_out = evaluation_sequences(source, stream.context, stream.prefill, pad)
        stream.embed(held_out)
        stream.run(held_out, desc="accuracy report (float)")
    stream.embed(quantized)
    builder.policy = policy.only_layers(set(range(config.num_hidden_layers)))
    stream.run(quantized, desc="accuracy report")
    lm_head = weights.rows(cls.weight_names[R.EMBED if config.tie_word_embeddings
                                            else R.LM_HEAD])
    bias = builder.lm_head_bias()
    report = accuracy_report(quantized_head(lm_head, policy, stream.final_logits, bias),
                             held_out, quantized, stream.prefill, lm_head, f"int{policy.bits}",
                             stream.final_logits, bias=bias)
    report["against"] = ("the float model: the float layers of -e qnn's graphs (the same "
                         "definition), lm_head in fp32 from the checkpoint and the "
                         "architecture's final logits step; quantized: those layers with "
                         "the build's weights, lm_head's as stored, dequantized")
    work.rmdir()
    return report


# Below this mean logit cosine, in prefill or decode, a quantized build is broken, not merely
# less accurate: the trained test checkpoints measure 0.99+ at every precision builder writes,
# untrained random ones (near-flat logits) 0.84 at w4a16 on cpu and qnn alike; a build
# calibrated on an empty KV cache, broken, 0.06-0.19 in decode. Top-1 agreement is no floor:
# the random checkpoints, correct, agree on 25-49% of their near-ties.
FLOOR = {"mean_cosine": 0.5}


def check_accuracy(report: dict) -> None:
    """Refuse a build whose accuracy report (``accuracy_report``) falls below FLOOR."""
    low = [f"{phase} {'mean logit cosine' if key == 'mean_cosine' else 'top-1 agreement'} "
           f"{report[phase][key]:.5g} (floor {floor:g})"
           for phase in ("prefill", "decode") for key, floor in FLOOR.items()
           if report[phase][key] < floor]
    if low:
        raise AccuracyError(f"the quantized model disagrees with the float one on the held-out "
                            f"prompts: {'; '.join(low)}, so the build is broken, not written; "
                            "quant_accuracy_check=false writes it anyway")
