"""Calibrated static quantization (w8a16) of the QNN pipeline's transformer graphs.

Activation ranges come from running the float pipeline itself, with onnxruntime on the CPU, the
way onnxruntime-genai will run it: the prefill graph on real prompts (in chunks, as the runtime
feeds them) and the decode graph on real decode trajectories, a float prefill followed by greedy
steps that see the true, growing KV cache. (Calibrating decode on one token with an empty cache
gives ranges the model never sees in use.) onnxruntime.quantization's QNN configuration then
writes the QDQ graphs: uint16 activations, symmetric int8 per-channel weights (int4 for w4a16).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import patch

import numpy as np
from tqdm.auto import tqdm

from builder.datafile import repack
from builder.errors import OptionError, SourceError
from builder.graph import quantize_io
from builder.options import ExtraOptions
from builder.pipeline import DATA_FILE
from builder.runner import run_pipeline, session

logger = logging.getLogger(__name__)

PROMPTS = Path(__file__).with_name("calibration_prompts.txt")
GRAPHS = ("context.onnx", "iterator.onnx")
LM_HEADS = ("lm_head_context.onnx", "lm_head_iterator.onnx")


def prompts(extra: ExtraOptions, tokenizer_dir: Path, context: int) -> list[list[int]]:
    """Token ids of the calibration prompts, each short enough to leave room for the steps."""
    path = Path(extra.qnn_calibration) if extra.qnn_calibration else PROMPTS
    if not path.is_file():
        raise OptionError(f"qnn_calibration={path}: no such file")
    budget = max(1, context - extra.qnn_calibration_steps - 1)
    return tokenize(path, extra.qnn_calibration_samples, tokenizer_dir, budget)


def tokenize(path: Path, count: int, tokenizer_dir: Path, budget: int) -> list[list[int]]:
    """Token ids of the first ``count`` prompts of ``path`` (one per line, ``\\n`` for a line
    break), each cut to ``budget`` tokens."""
    texts = [line.strip().replace("\\n", "\n") for line in path.read_text("utf-8").splitlines()]
    texts = [t for t in texts if t][:count]
    if not texts:
        raise OptionError(f"{path}: no prompts (one per line)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise OptionError("calibration tokenizes its prompts with the tokenizers package: "
                          "pip install tokenizers") from None
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise OptionError(f"{tokenizer_dir}: calibration needs tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    except Exception as e:  # the tokenizers package raises its own exception type
        raise SourceError(f"{tokenizer_dir / 'tokenizer.json'}: not a tokenizer the tokenizers "
                          f"package can load ({e}); fix the file or remove it") from None
    return [ids[:budget] for ids in (tokenizer.encode(t).ids for t in texts) if ids]


def prefill_sequences(ids: list[list[int]], window: int, budget: int) -> list[list[int]]:
    """The prefill graph's calibration sequences: consecutive prompts joined until each spans
    two chunks of P (at most ``budget`` tokens), cycling through the prompts when they are too
    few for one. Every call after a sequence's first chunk then sees the KV rows of the earlier
    ones, as a prompt longer than P does at run time. Calibrated on one-chunk prompts only
    (short prompts, or a large P), the tensors that keep the past rows saw nothing but zeros:
    their range [0, 0] clipped a longer prompt's past away on every EP, and the HTP
    requantized the cache update wrongly (HTP against CPU EP on the same graph: logit cosine
    -0.3 at P = 128)."""
    want = min(2 * window, budget)
    sequences, current = [], []
    for prompt in ids:
        current += prompt
        if len(current) >= want:
            sequences.append(current[:budget])
            current = []
    for prompt in ids * want:  # the rest, completed from the start (enough repeats for one)
        if not current and sequences:
            break
        current += prompt
        if len(current) >= want:
            sequences.append(current[:budget])
            current = []
    return sequences


def stream(folder: Path, token_ids: list[list[int]], steps: int, graph: str,
           ranges: dict[str, tuple[float, float]] | None = None) -> Iterator[dict]:
    """The inputs ``graph`` receives over the calibration run (prefills on the prompts, then
    greedy decode trajectories), one at a time: a thread runs the float pipeline and hands each
    call's inputs over as the quantizer asks for them, so memory holds one set (KV buffers
    included) instead of all of them. ``ranges`` collects lm_head's input and output ranges."""
    handoff: queue.Queue = queue.Queue(maxsize=1)
    done, failure = object(), []

    def widen(name, value):
        lo, hi = ranges.get(name, (0.0, 0.0))
        ranges[name] = (min(lo, float(value.min())), max(hi, float(value.max())))

    def work():
        sessions: dict[str, object] = {}

        def runner(filename, feeds):
            if filename == graph:
                handoff.put(feeds)
            if filename not in sessions:
                sessions[filename] = session(folder, filename)
            sess = sessions[filename]
            out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
            if ranges is not None and filename in LM_HEADS:
                widen("hidden_states", feeds["hidden_states"])
                widen("logits", out["logits"])
            return out

        try:
            for ids in tqdm(token_ids, desc=f"calibrating {graph}", unit="prompt", disable=None):
                run_pipeline(folder, ids, steps, runner=runner)
        except BaseException as e:  # re-raised in the consumer
            failure.append(e)
        finally:
            handoff.put(done)

    threading.Thread(target=work, daemon=True, name="calibration").start()
    while (item := handoff.get()) is not done:
        yield item
    if failure:
        raise failure[0]


def empty_cache(feeds: Iterator[dict]) -> Iterator[dict]:
    """The decode inputs a naive calibration uses: each token alone, at row 0 of an all-zero KV
    cache. Kept only to show, in the tests, what trajectory calibration avoids."""
    for f in feeds:
        yield {k: v * 0 if k.startswith("past_") else v for k, v in f.items()}


def _histograms_in_float32():
    """onnxruntime's histogram calibrators (percentile, entropy) bin each tensor in its own
    dtype, and 2048 bins over an fp16 tensor's range (the KV cache) are finer than fp16 can
    express ("Too many bins for data range"). This collector bins in float32 and hands the
    ranges back in the tensor's dtype, which the quantizer's scales must have."""
    from onnxruntime.quantization import calibrate

    class Float32Histograms(calibrate.HistogramCollector):
        def collect(self, name_to_arr):
            self.dtypes = getattr(self, "dtypes", {})
            wide = {}
            for name, arrays in name_to_arr.items():
                arrays = arrays if isinstance(arrays, list) else [arrays]
                self.dtypes[name] = arrays[0].dtype
                wide[name] = [np.asarray(a, np.float32) for a in arrays]
            return super().collect(wide)

        def compute_collection_result(self):
            return {name: (np.asarray(lo, self.dtypes[name]), np.asarray(hi, self.dtypes[name]),
                           *rest)
                    for name, (lo, hi, *rest) in super().compute_collection_result().items()}

    return patch.object(calibrate, "HistogramCollector", Float32Histograms)


def blockwise_initializer(original):
    """onnxruntime's ``quantize_onnx_initializer``, with its block-wise case vectorized: the
    library quantizes one (block, column) at a time in Python, about 4 minutes per graph of a
    0.6B model. Same arithmetic (``quantize_nparray``, broadcast over the expanded scales and
    zero points) and the same 4-bit packing, in numpy; the tests check bytes against it."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX, quantize_nparray

    def quantize(weight, quant_type, zero_point, scale, axis=None, quant_weight_name=None,
                 block_size=0):
        if axis is None or not block_size:
            return original(weight, quant_type, zero_point, scale, axis, quant_weight_name,
                            block_size)
        w = numpy_helper.to_array(weight)
        k = w.shape[axis]

        def expand(a):
            return np.repeat(a, block_size, axis=axis).take(range(k), axis=axis)

        codes = quantize_nparray(quant_type, w, expand(scale), expand(zero_point))
        if quant_type in (TensorProto.INT4, TensorProto.UINT4):  # two per byte, first low
            nibbles = np.append(codes.astype(np.uint8).ravel() & 0x0F, np.uint8(0))
            packed = nibbles[0:codes.size:2] | (nibbles[1:codes.size + 1:2] << 4)
            return helper.make_tensor(quant_weight_name or weight.name + TENSOR_NAME_QUANT_SUFFIX,
                                      quant_type, weight.dims, packed.tobytes(), raw=True)
        # codes / 1 + 0 = codes: the library's per-tensor path only converts them
        exact = numpy_helper.from_array(codes.astype(np.float32), weight.name)
        return original(exact, quant_type, np.zeros((), zero_point.dtype),
                        np.ones((), scale.dtype), None, quant_weight_name, 0)

    return quantize


def _quantizer_patches() -> contextlib.ExitStack:
    from onnxruntime.quantization import qdq_quantizer

    stack = contextlib.ExitStack()
    stack.enter_context(_histograms_in_float32())
    stack.enter_context(patch.object(qdq_quantizer, "quantize_onnx_initializer",
                                     blockwise_initializer(
                                         qdq_quantizer.quantize_onnx_initializer)))
    return stack


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over a stream of feeds. With
    ``set_range`` (the quantizer's "strided" MinMax mode) it hands out one slice at a time,
    after which the quantizer folds the slice into its ranges and drops the activations."""

    def __init__(self, feeds: Iterator[dict], count: int) -> None:
        self._it, self._count, self._left = feeds, count, count

    def __len__(self) -> int:
        return self._count

    def set_range(self, start_index: int, end_index: int) -> None:
        self._left = end_index - start_index

    def get_next(self):
        if self._left <= 0:
            return None
        self._left -= 1
        return next(self._it, None)


class _QuantizerAdvice(logging.Filter):
    """onnxruntime's quantizer advises, on the root logger and once per graph, to run its
    model pre-processing first; our graphs are written already in the form it asks for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider")


def quantize_pipeline(folder: Path, extra: ExtraOptions, source: Path,
                      decode_calibration: str = "trajectory", weight_bits: int = 8,
                      activation_bits: int = 16) -> None:
    """Replace the float transformer graphs in ``folder`` by calibrated QDQ graphs: w8a16, or
    w4a16: int4 weights block-wise along the input dimension on MatMul (``int4_block_size``),
    per-channel on 1x1 Conv (``qnn_linear=conv``; per-channel int4 on MatMul is wrong on the
    HTP). (``decode_calibration="empty_cache"`` is for comparison only.)"""
    from onnxruntime.quantization import CalibrationMethod, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    ids = prompts(extra, source, extra.qnn_context_length)
    steps = extra.qnn_calibration_steps
    lm_ranges: dict[str, tuple[float, float]] = {}
    window = extra.qnn_prefill_length
    prefill = prefill_sequences(ids, window, max(1, extra.qnn_context_length - steps - 1))
    count = {"context.onnx": sum(-(-len(i) // window) for i in prefill),
             "iterator.onnx": len(ids) * (steps - 1)}
    logger.info("calibration (%s): prefill graph on %d sequence(s) joined from %d prompts (%d "
                "tokens, %d calls of %d); decode graph on %d greedy trajectories of %d steps (%d "
                "tokens)",
                extra.qnn_calibration_method, len(prefill), len(ids),
                sum(map(len, prefill)), count["context.onnx"], window, len(ids), steps,
                count["iterator.onnx"])
    # the prefill graph needs the prompts only; the decode pass runs everything (lm_head too)
    feeds = {"context.onnx": lambda: stream(folder, prefill, 0, "context.onnx"),
             "iterator.onnx": lambda: stream(folder, ids, steps, "iterator.onnx", lm_ranges)}
    if decode_calibration == "empty_cache":
        feeds["iterator.onnx"] = lambda: empty_cache(stream(folder, ids, steps,
                                                            "iterator.onnx", lm_ranges))
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[extra.qnn_calibration_method]
    for name in GRAPHS:
        config = get_qnn_qdq_config(str(folder / name), _Reader(feeds[name](), count[name]),
                                    calibrate_method=method,
                                    activation_type=QuantType.QUInt16
                                    if activation_bits == 16 else QuantType.QUInt8,
                                    weight_type=QuantType.QInt8 if weight_bits == 8
                                    else QuantType.QInt4, per_channel=True,
                                    # the HTP reads block-wise weights as symmetric: a
                                    # zero point there is silently dropped
                                    weight_symmetric=True)
        config.use_external_data_format = True
        if weight_bits == 4 and extra.qnn_linear == "matmul":
            # the HTP runs int4 weights on MatMul correctly only block-wise (along K)
            config.extra_options["BlockSize"] = extra.int4_block_size
        # fold each call in (ranges or histograms), keep no activations; despite its name the
        # option strides every calibrator
        config.extra_options["CalibStridedMinMax"] = 1
        staged = folder / name.replace(".onnx", ".qdq.onnx")
        printed = io.StringIO()  # the histogram calibrators print their settings
        quiet = _QuantizerAdvice()
        logging.getLogger().addFilter(quiet)
        try:
            with _quantizer_patches(), contextlib.redirect_stdout(printed):
                quantize(str(folder / name), str(staged), config)
        finally:
            logging.getLogger().removeFilter(quiet)
        logger.debug("%s", printed.getvalue().strip())
        os.replace(staged, folder / name)  # its weights stay in <name>.qdq.onnx.data
        logger.info("quantized %s: w%da%d", name, weight_bits, activation_bits)
    for name in LM_HEADS:  # int8 weights already; add the calibrated uint16 activations
        quantize_io(folder / name, lm_ranges)
    repack(folder, DATA_FILE)  # one data file again, without the float weights
    logger.info("lm_head: int8 per-channel weights, uint16 activations (%s)",
                ", ".join(f"{name} in [{lo:.4g}, {hi:.4g}]"
                          for name, (lo, hi) in sorted(lm_ranges.items())))
