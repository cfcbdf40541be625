"""Calibrated static quantization (w8a16, w4a16, w8a8) of the QNN pipeline: the ranges.

The float pipeline runs, one layer at a time (``builder.quant.stream``), over calibration
sequences fed as onnxruntime-genai feeds them: each prompt in chunks of P, continued by the text
that follows it one token at a time, so that the decode graph sees the true, growing KV cache
(prompts of one chunk or less are also joined into sequences of two chunks, so that prefill
calls see a past). Greedy trajectories would need the whole model at every step; a cache left
empty gives ranges the model never sees in use (the tests measure both). Every float value the
graphs compute gets its range (min/max, or the 99.999% percentile), by the name the builder
gives it; ``builder.pipeline`` then writes the QDQ graphs with them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder.errors import OptionError, SourceError
from builder.options import ExtraOptions
from builder.quant.ranges import Ranges, TensorStats
from builder.quant.stream import DECODE, PREFILL, Extremes, LayerStream, Sequence, sequence

logger = logging.getLogger(__name__)

PROMPTS = Path(__file__).with_name("calibration_prompts.txt")
GRAPHS = (PREFILL, DECODE, f"lm_head_{PREFILL}", f"lm_head_{DECODE}")


def prompts(extra: ExtraOptions, tokenizer_dir: Path, context: int) -> list[list[int]]:
    """Token ids of the calibration prompts, each short enough to leave room for the steps:
    the text file's prompts through the tokenizer, or a ``.json`` file's token ids as they
    are (``token_prompts``)."""
    path = Path(extra.qnn_calibration) if extra.qnn_calibration else PROMPTS
    if not path.is_file():
        raise OptionError(f"qnn_calibration={path}: no such file")
    budget = max(1, context - extra.qnn_calibration_steps - 1)
    if path.suffix.lower() == ".json":
        encoded = token_prompts(path, vocabulary(tokenizer_dir))
        return select(encoded, extra.qnn_calibration_samples, budget,
                      extra.qnn_calibration_tokens)
    return tokenize(path, extra.qnn_calibration_samples, tokenizer_dir, budget,
                    extra.qnn_calibration_tokens)


def vocabulary(tokenizer_dir: Path) -> int:
    """How many token ids the checkpoint's tokenizer gives (its added tokens included)."""
    return load_tokenizer(tokenizer_dir).get_vocab_size(True)


def load_tokenizer(tokenizer_dir: Path):
    """The checkpoint's tokenizer.json, loaded by the tokenizers package (refused, named,
    where it cannot be)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise OptionError("calibration tokenizes its prompts with the tokenizers package: "
                          "pip install tokenizers") from None
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise OptionError(f"{tokenizer_dir}: calibration needs tokenizer.json")
    try:
        return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    except Exception as e:  # the tokenizers package raises its own exception type
        raise SourceError(f"{tokenizer_dir / 'tokenizer.json'}: not a tokenizer the tokenizers "
                          f"package can load ({e}); fix the file or remove it") from None


def tokenize(path: Path, count: int, tokenizer_dir: Path, budget: int,
             tokens: int | None = None) -> list[list[int]]:
    """Token ids of the first ``count`` prompts of ``path`` (one per line, ``\\n`` for a line
    break), each cut to ``budget`` tokens; with ``tokens``, only the first ones that hold at
    most that many in all (``select``). The shipped prompts: the first 24 (the default
    count) are 2,392 tokens of the tests' byte-level tokenizer and 535 of GPT-2's BPE, all 93
    are 2,286 of GPT-2's: a real model's projections read thousands of inputs, and GPTQ's
    Hessian of fewer tokens than inputs has directions it never saw (see ``gptq.damping``);
    all 93 cost a real model's qnn build about 2.5x the calibration time (measured: README)."""
    texts = [line.strip().replace("\\n", "\n") for line in prompt_text(path).splitlines()]
    texts = [t for t in texts if t][:count]
    if not texts:
        raise OptionError(f"{path}: no prompts (one per line)")
    tokenizer = load_tokenizer(tokenizer_dir)
    try:
        encoded = [tokenizer.encode(t).ids for t in texts]
    except Exception as e:  # e.g. a WordLevel model whose unknown token it does not hold
        raise SourceError(f"{tokenizer_dir / 'tokenizer.json'}: cannot encode the prompts of "
                          f"{path} ({e}); fix the tokenizer") from None
    return select([ids for ids in encoded if ids], count, budget, tokens)


def select(encoded: list[list[int]], count: int, budget: int, tokens: int | None = None
           ) -> list[list[int]]:
    """The first ``count`` prompts, each cut to ``budget`` tokens; with ``tokens``, only the
    first ones that hold at most that many in all (the first one always; counted before the
    cut, so that the prompts chosen do not depend on the context)."""
    encoded = encoded[:count]
    if tokens is not None:
        total = 0
        for i, ids in enumerate(encoded):
            total += len(ids)
            if total > tokens and i > 0:
                encoded = encoded[:i]
                break
    return [ids[:budget] for ids in encoded]


def token_prompts(path: Path, vocab: int) -> list[list[int]]:
    """A ``.json`` calibration file's prompts as token ids, taken as they are: a list of
    prompts, each a list of ids or an object whose ``input_ids`` is one (a tokenized
    dataset's rows). For data no text file holds as the model reads it: a dataset already
    tokenized, or, for a model trained on other sequences than text, those sequences (the
    tests' checkpoints trained on random tokens: ``benchmarks/qnn_accuracy.py
    --calibration random``). Every id must be one of the tokenizer's ``vocab``."""
    import json

    form = "a list of prompts, each a list of token ids ([[1, 2, 3], [4, 5]])"
    try:
        data = json.loads(prompt_text(path))
    except json.JSONDecodeError as e:
        raise OptionError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                          f"a .json calibration file holds {form}") from None
    if not isinstance(data, list) or not data:
        raise OptionError(f"{path}: expected {form}, got "
                          f"{'an empty list' if data == [] else type(data).__name__}")
    encoded = []
    for i, prompt in enumerate(data):
        ids = prompt.get("input_ids") if isinstance(prompt, dict) else prompt
        if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise OptionError(f"{path}: prompt {i} is not a list of token ids (integers), nor "
                              f"an object whose input_ids is one; expected {form}")
        if not ids:
            raise OptionError(f"{path}: prompt {i} is empty")
        outside = [t for t in ids if not 0 <= t < vocab]
        if outside:
            raise OptionError(f"{path}: prompt {i} holds token id {outside[0]}, not one of the "
                              f"tokenizer's {vocab} ids (0..{vocab - 1})")
        encoded.append(ids)
    return encoded


def prompt_text(path: Path) -> str:
    """A prompt file's text: UTF-8 (a byte-order mark allowed), or UTF-16 with its byte-order
    mark (what Windows Notepad and PowerShell write); anything else is refused, naming the
    first byte that is not text."""
    data = path.read_bytes()
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise OptionError(f"{path}: not {'UTF-16' if encoding == 'utf-16' else 'UTF-8'} text "
                          f"(byte 0x{data[e.start]:02x} at offset {e.start}); save the prompts "
                          "as UTF-8, one per line") from None
    if "\x00" in text:
        raise OptionError(f"{path}: holds a NUL character (offset {text.index(chr(0))}), so "
                          "it is not a text file; save the prompts as UTF-8, one per line")
    return text


def prefill_sequences(ids: list[list[int]], window: int, budget: int) -> list[list[int]]:
    """The prefill graph's calibration sequences (see ``joined``)."""
    return [tokens for tokens, _ in joined(ids, window, budget)]


def joined(ids: list[list[int]], window: int, budget: int) -> list[tuple[list[int], int]]:
    """Consecutive prompts joined until each sequence spans two chunks of P (at most ``budget``
    tokens), cycling through the prompts when they are too few for one; with each, the index of
    the last prompt it took. Every call after a sequence's first chunk then sees the KV rows of
    the earlier ones, as a prompt longer than P does at run time. Calibrated on one-chunk
    prompts only (short prompts, or a large P), the tensors that keep the past rows saw nothing
    but zeros: their range [0, 0] clipped a longer prompt's past away on every EP, and the HTP
    requantized the cache update wrongly (HTP against CPU EP on the same graph: logit cosine
    -0.3 at P = 128)."""
    want = min(2 * window, budget)
    sequences, current = [], []
    for i, prompt in enumerate(ids):
        current += prompt
        if len(current) >= want:
            sequences.append((current[:budget], i))
            current = []
    for i in range(len(ids) * want):  # the rest, completed from the start (enough repeats)
        if not current and sequences:
            break
        current += ids[i % len(ids)]
        if len(current) >= want:
            sequences.append((current[:budget], i % len(ids)))
            current = []
    return sequences


def continuation(ids: list[list[int]], index: int, count: int) -> list[int]:
    """``count`` tokens of the text that follows prompt ``index`` (the next prompts, from the
    start again when they run out)."""
    following = [t for prompt in ids[index + 1:] + ids[:index + 1] for t in prompt]
    return (following * (1 + count // max(1, len(following))))[:count]


def coverage(extremes: Extremes, count: int) -> list[int]:
    """At most ``count`` tokens whose embeddings hold a dimension's largest or smallest value
    over the vocabulary where it lies beyond what the calibration text's own tokens hold, the
    farthest first (by how far beyond, in the text's span of that dimension): prefilled too,
    so that a prompt's token the text never held is not clipped. The text holds a few hundred
    of a real tokenizer's tens of thousands of tokens (the tests' byte-level one: 75 of 256 in
    the default prompts), and a value the others reach clipped a decode step (a trained tiny
    Granite 4.0-H at w8a16, 8 prompts of random tokens on the CPU EP: min logit cosine 0.9887
    against 0.9998 with them; README)."""
    span = np.maximum(extremes.own_hi - extremes.own_lo, 1e-12)
    far: dict[int, float] = {}
    for beyond, ids in ((extremes.hi - extremes.own_hi, extremes.hi_ids),
                        (extremes.own_lo - extremes.lo, extremes.lo_ids)):
        for d in np.flatnonzero(beyond > 0):
            token = int(ids[d])
            far[token] = max(far.get(token, 0.0), float(beyond[d] / span[d]))
    return sorted(far, key=lambda t: (-far[t], t))[:count]


@dataclass
class Calibration:
    ranges: dict[str, dict[str, tuple[float, float]]]  # per graph: {tensor: (min, max)}
    held_out: list[Sequence]  # the evaluation sequences, ending as float final hidden states
    embeddings: list[list]    # their inputs_embeds per call (the quantized run starts there)


def calibrate(stream: LayerStream, extra: ExtraOptions, tokenizer_dir: Path, pad: int,
              held_out: list[Sequence], empty_cache: bool = False, observe=None,
              unrecorded: TensorStats | None = None, rounding=None) -> Calibration:
    """The ranges of every float tensor of the transformer and lm_head graphs; ``held_out``
    (the accuracy report's sequences) goes through the same float layers unrecorded
    (``observe``, ``unrecorded`` and ``rounding``: see ``LayerStream.run``)."""
    window, context = stream.prefill, stream.context
    steps = extra.qnn_calibration_steps
    ids = prompts(extra, tokenizer_dir, context)
    # each prompt, prefilled as at run time (its last chunk padded) and continued by the text
    # that follows it: decode at the short contexts of single prompts (decoding only after
    # joined sequences, at 2P rows and more, left short-context decode clipped: w8a16 decode
    # cosine 0.994 against 0.9994)
    sequences = [sequence(p, continuation(ids, i, steps - 1), window, pad, True, True)
                 for i, p in enumerate(ids)]
    # prompts of one chunk or less never prefill with a past: those are also joined into
    # two-chunk sequences (a prompt longer than P already calls with its earlier chunks cached)
    budget = max(1, context - steps - 1)
    short = [p for p in ids if len(p) <= window]
    spans = joined(short, window, budget) if short else []
    sequences += [sequence(tokens, [], window, pad, True, False) for tokens, _ in spans]
    # the vocabulary's tokens beyond the text's embedding range, as prompts of their own
    # continued by the text's start
    covering = coverage(stream.extremes({t for p in ids for t in p}, vocabulary(tokenizer_dir)),
                        extra.qnn_calibration_coverage) if extra.qnn_calibration_coverage else []
    extra_prompts = [covering[k:k + budget] for k in range(0, len(covering), budget)]
    sequences += [sequence(p, continuation(ids, len(ids) - 1, steps - 1), window, pad, True,
                           True) for p in extra_prompts]
    calls = sum(-(-len(t) // window) for t in ids + extra_prompts) + sum(
        -(-len(t) // window) for t, _ in spans)
    layers = stream.b.config.num_hidden_layers
    logger.info("calibration (%s): %d layers, one at a time; prefill graph on the %d prompts, "
                "%d sequence(s) of the %d vocabulary tokens beyond their embedding range "
                "(qnn_calibration_coverage=%d) and %d sequence(s) joined from the %d prompts of "
                "one chunk or less (%d tokens, %d calls of %d); decode graph on the %d prompts "
                "and %d sequence(s) of tokens, each continued by %d tokens of the text after it "
                "(%d tokens)%s",
                extra.qnn_calibration_method, layers, len(ids), len(extra_prompts),
                len(covering), extra.qnn_calibration_coverage or 0, len(spans), len(short),
                sum(map(len, ids)) + len(covering) + sum(len(t) for t, _ in spans), calls,
                window, len(ids), len(extra_prompts), steps - 1,
                (len(ids) + len(extra_prompts)) * (steps - 1),
                ", on an empty cache" if empty_cache else "")
    ranges = Ranges(extra.qnn_calibration_method)
    everything = sequences + held_out
    try:
        stream.embed(everything)
        embeddings = [list(s.hidden) for s in held_out]
        stream.run(everything, ranges, desc="calibrating", empty_cache=empty_cache,
                   observe=observe, unrecorded=unrecorded, rounding=rounding)
        stream.lm_head(sequences, ranges)
    finally:
        ranges.close()
    result = {graph: ranges.result(graph) for graph in GRAPHS}
    logger.info("lm_head: int8 per-channel weights, uint16 activations (%s)",
                ", ".join(f"{graph} {name} in [{lo:.4g}, {hi:.4g}]"
                          for graph in GRAPHS[2:] for name, (lo, hi) in
                          sorted(result[graph].items()) if name in ("hidden_states", "logits")))
    return Calibration(result, held_out, embeddings)


def unite_phases(ranges: dict[str, dict[str, tuple]]) -> None:
    """A value both the prefill and the decode graph compute (the same layer's same tensor, at
    other positions) takes, in both, the union of the ranges calibration saw in either: the
    decode graph sees 15 tokens per prompt, the prefill graph every token, and a held-out
    token beyond the decode graph's own range was clipped (a trained tiny Qwen3 at w8a16:
    layer 1's attention output by 7% of its range; decode min logit cosine 0.9986 -> 0.9999)."""
    for a, b in ((GRAPHS[0], GRAPHS[1]), (GRAPHS[2], GRAPHS[3])):
        for name in ranges[a].keys() & ranges[b].keys():
            ra, rb = ranges[a][name], ranges[b][name]
            united = (min(ra[0], rb[0]), max(ra[1], rb[1]))
            ranges[a][name] = (*united, *ra[2:])
            ranges[b][name] = (*united, *rb[2:])


TOKEN_STEP = re.compile(r"/token_\d+/")  # a recurrence's step for one token (ops.recurrence)


def unite_tokens(ranges: dict[str, dict[str, tuple]]) -> None:
    """The values of a recurrence unrolled over the prefill's tokens (``/token_<t>/``: the
    state after token t, its decay, its update...) take, in each graph, the union of the
    ranges over every t: one kind of value at other positions, where one position alone sees
    few samples (measured on a tiny Qwen3.5 at w8a16: 246 of 1404 tensors clipped on the
    held-out prompts, the state by up to 116% of its range). Before ``unite_phases``, so the
    decode graph's one step takes the prefill's union too."""
    for graph in ranges.values():
        groups: dict[str, list[str]] = {}
        for name in graph:
            if TOKEN_STEP.search(name):
                groups.setdefault(TOKEN_STEP.sub("/token_*/", name), []).append(name)
        for names in groups.values():
            united = (min(graph[n][0] for n in names), max(graph[n][1] for n in names))
            for n in names:
                graph[n] = (*united, *graph[n][2:])
