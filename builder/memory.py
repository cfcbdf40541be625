"""The build's peak memory, estimated from the shapes before anything is allocated.

A build streams its weights one layer at a time, so what it holds at its peak is small and
known from config.json and the options: the interpreter and its libraries, one layer's weights
read as float32 (and written once more, quantized or converted), the embedding table's rows as
lm_head quantizes them, and, in the builds that run the layers (a quantized ``-e qnn`` build's
calibration and accuracy report; gptq, awq and ``*_mixed``), one layer call's activations: the
calibration graphs hand every intermediate value back at once, so a prefill call of P tokens
against a context of C holds its attention scores (heads x P x C, four copies: the product,
scaled, masked, softmax), its MLP's four P x intermediate values, the layer's K and V at C, and
lm_head's P x vocab logits; with GPTQ, one layer's Hessians and a factor. ``check_memory``
refuses a build whose estimate exceeds the memory available, naming the option that makes it
large (an absurd ``qnn_prefill_length=100000`` fails in milliseconds instead of allocating
until the system gives out).
"""

from __future__ import annotations

import math
import os

from builder.config import DecoderConfig
from builder.errors import OptionError
from builder.options import QDQ_PRECISIONS, BuildOptions, Precision
from builder.quant.policy import DATA_AWARE, MEASURED, static_default
from builder.quant.rounding import stream_lengths
from builder.roles import TensorRole as R

MIB = 2 ** 20
BASE = 64 * MIB  # Python, numpy and onnx loaded: a tiny cpu build's measured peak
SESSIONS = 64 * MIB  # onnxruntime loaded and its sessions' arenas (a tiny qnn build's: 128)
F32 = 4


EXPERTS = (R.EXPERT_GATE, R.EXPERT_UP, R.EXPERT_DOWN)


def layer_elements(config: DecoderConfig, cls, static: bool = False) -> int:
    """The largest layer's weights, in elements (among the first 256: layers repeat a short
    pattern, and config.json's layer count is not yet confirmed by the checkpoint here). A
    mixture of experts' experts count whole where the static graphs hold (and calibration
    loads) them all; on cpu/cuda they are written an expert at a time: not counted."""
    return max(sum(math.prod(shape) for role, shape in cls.layer_weight_shapes(config, i)
                   if static or role not in EXPERTS)
               for i in range(min(config.num_hidden_layers, 256)))


def runs_layers(options: BuildOptions, static: bool) -> bool:
    """The build runs the layers on calibration text (its peak holds activations)."""
    if static:
        return options.precision in QDQ_PRECISIONS
    algorithm = options.extra.int4_algo_config
    return options.precision in (Precision.INT4, Precision.INT8) \
        and (algorithm in DATA_AWARE or algorithm in MEASURED)


def rounds_by_gptq(options: BuildOptions, static: bool) -> bool:
    """The build rounds the layers by GPTQ (its peak holds one layer's Hessians)."""
    algorithm = options.extra.int4_algo_config
    if algorithm == "default":
        algorithm = static_default(options.precision) if static else None
    return runs_layers(options, static) and DATA_AWARE.get(algorithm) in ("gptq", "awq_gptq")


def hessians(config: DecoderConfig) -> int:
    """Bytes of GPTQ's Hessians of a layer (one per projection input, float32) and of the
    factor of the largest (``quant.gptq.inverse_factor``: one copy)."""
    c = config
    inputs = (c.hidden_size, c.num_attention_heads * c.head_dim, c.intermediate_size)
    return (sum(k * k for k in inputs) + max(inputs) ** 2) * F32


def activations(config: DecoderConfig, prefill: int, context: int) -> dict[str, int]:
    """Bytes of one layer call's values at its largest (a prefill call), and of lm_head's."""
    c = config
    return {
        "attention scores": 4 * c.num_attention_heads * prefill * context * F32,
        "mlp": 4 * prefill * c.intermediate_size * F32,
        "kv": 4 * c.num_key_value_heads * context * c.head_dim * F32,  # past and present, K, V
        "lm_head logits": 2 * prefill * c.vocab_size * F32,
    }


def estimate(options: BuildOptions, config: DecoderConfig, cls, static: bool) -> dict[str, int]:
    """The build's peak resident bytes, by part (``total`` their sum)."""
    parts = {"libraries": BASE,
             "layer weights": 2 * layer_elements(config, cls, static) * F32,
             "table rows": min(config.vocab_size, 4096) * config.hidden_size * F32}
    if runs_layers(options, static):
        parts["onnxruntime"] = SESSIONS
        x = options.extra
        p, c = (x.qnn_prefill_length, x.qnn_context_length) if static else \
            stream_lengths(config)  # (cpu/cuda data-aware rounding runs -e qnn's graphs)
        parts.update(activations(config, p, c))
    if rounds_by_gptq(options, static):
        parts["GPTQ Hessians"] = hessians(config)
    parts["total"] = sum(parts.values())
    return parts


def available() -> int | None:
    """Memory the build may take now: MemAvailable (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(options: BuildOptions, config: DecoderConfig, cls, static: bool,
                 free: int | None = None) -> dict[str, int]:
    """The estimate, or OptionError when it exceeds the memory available (``free``; default:
    ``available()``), naming its largest part and the option that sets it."""
    parts = estimate(options, config, cls, static)
    free = available() if free is None else free
    if free is None or parts["total"] <= free:
        return parts
    largest = max((k for k in parts if k != "total"), key=parts.get)
    calls = largest in activations(config, 1, 1)  # (a layer call's values)
    if calls and static:
        x = options.extra
        fix = (f"the prefill length (qnn_prefill_length={x.qnn_prefill_length}) and context "
               f"(qnn_context_length={x.qnn_context_length}) set it: make them smaller")
    elif calls:
        p, c = stream_lengths(config)
        fix = f"the calibration runs at {p} tokens in a context of {c}: use rtn or k_quant"
    elif largest == "GPTQ Hessians":
        fix = ("GPTQ's Hessians grow with the square of the projections' inputs: "
               "int4_algo_config=rtn_mixed (or rtn) needs none")
    else:
        fix = "the model's own shapes set it: build on a machine with more memory"
    raise OptionError(
        f"this build would need about {parts['total'] / MIB:,.0f} MiB at its peak "
        f"({largest}: {parts[largest] / MIB:,.0f} MiB), more than the {free / MIB:,.0f} MiB "
        f"available; {fix}")
