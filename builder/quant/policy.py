"""Which quantizer, at how many bits, for each weight: decided here and nowhere else.

``int4`` quantizes every linear layer to 4 bits with the chosen algorithm; ``int8`` to 8 bits.
The lm_head policies follow llama.cpp and onnxruntime-genai: ``*_last`` keeps lm_head at 8 bits,
``k_quant_mixed`` also puts the most quantization-sensitive layers' qkv (or v) and down
projections at 8 bits: the first and last eighth of the layers and every third layer between.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
from dataclasses import dataclass, field

from builder.errors import OptionError, did_you_mean
from builder.options import MEASURED_MIXED, ExtraOptions, Precision
from builder.quant.base import Quantizer
from builder.quant.qdq import QdqQuantizer, QdqWeight
from builder.registry import Registry
from builder.roles import TensorRole as R

logger = logging.getLogger(__name__)

ALGORITHMS = {  # int4_algo_config → (quantizer, lm_head at 8 bits, mixed layers at 8 bits);
    # "default" is one of them, by DEFAULT
    "rtn": ("rtn", False, False),
    "rtn_last": ("rtn", True, False),
    "k_quant": ("k_quant", False, False),
    "k_quant_last": ("k_quant", True, False),
    "k_quant_mixed": ("k_quant", True, True),
    "gptq": ("rtn", False, False),
    "gptq_last": ("rtn", True, False),
    "rtn_mixed": ("rtn", True, False),   # and the projections promoted by measurement
    "gptq_mixed": ("rtn", True, False),  # (quant.mixed)
    "awq": ("rtn", False, False),
    "awq_last": ("rtn", True, False),
    "awq_gptq": ("rtn", False, False),
    "awq_gptq_last": ("rtn", True, False),
}
# The defaults, by measured accuracy per byte (README, "Choosing the defaults"): -p int4 is
# k_quant with lm_head at 8 bits (k_quant_last); -p int8 rtn; -e qnn -p w4a16 gptq_mixed,
# w8a16 gptq, w8a8 rtn (``static_default``)
DEFAULT = {4: "k_quant_last", 8: "rtn", "w4a16": "gptq_mixed", "w8a16": "gptq", "w8a8": "rtn"}


def static_default(precision) -> str:
    """The default int4_algo_config of a calibrated -e qnn build at ``precision``."""
    from builder.options import FOUR_BIT, Precision

    if precision in FOUR_BIT:
        return DEFAULT["w4a16"]
    return DEFAULT["w8a8" if precision == Precision.W8A8 else "w8a16"]
DATA_AWARE = {"gptq": "gptq", "gptq_last": "gptq", "gptq_mixed": "gptq",  # rounded in the layer
              "awq": "awq", "awq_last": "awq", "awq_gptq": "awq_gptq",
              "awq_gptq_last": "awq_gptq"}
MEASURED = MEASURED_MIXED  # stream (quant.rounding); promoted by quant.mixed (options says which)
STATIC_ALGORITHMS = ("default", "rtn", "gptq", "awq", "awq_gptq", "rtn_mixed",  # -e qnn:
                     "gptq_mixed")
# lm_head is int8 per channel there; *_mixed at w4a16 only
LINEAR_ROLES = {R.Q, R.K, R.V, R.QKV, R.O, R.GATE, R.UP, R.GATE_UP, R.DOWN, R.LM_HEAD,
                R.EXPERT_GATE, R.EXPERT_UP, R.EXPERT_DOWN}  # the router stays float
MIXED_ROLES = {R.QKV, R.V, R.DOWN}  # (not the experts: 8-bit QMoE is inexact, see ops.moe)


def mixed_layers(num_layers: int) -> frozenset[int]:
    """The layers whose attention v and MLP down matter most: llama.cpp's use_more_bits() as
    onnxruntime-genai's builder computes it (float n/8 bounds, Python round), so that our
    k_quant_mixed promotes the same layers as theirs."""
    eighth = num_layers / 8
    return frozenset(i for i in range(num_layers)
                     if i < eighth or i >= 7 * eighth or (i - round(eighth)) % 3 == 2)


@dataclass(frozen=True)
class QuantPolicy:
    """Bits and quantizer per tensor; ``bits=None`` keeps every weight in float."""

    bits: int | None = None
    algorithm: str = "rtn"
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    lm_head_bits: int | None = None
    mixed: frozenset[int] = frozenset()
    exclude: frozenset[str] = frozenset()
    quantize_embedding: bool = False
    quantize_matmul: bool = True
    qdq_conv: bool | None = None  # static QDQ graphs: None (not QDQ), else whether 1x1 Conv
    lpbq: bool = False  # static QDQ graphs: int4 blocks on MatMul as LPBQ (qnn_int4_format)
    layers: frozenset[int] | None = None  # only these layers' weights (None: every layer's)
    floats: frozenset[tuple[int, R]] = frozenset()  # {(layer, role)} kept in float all the same
    # (the projections of a layer that GPTQ has not rounded yet: quant.rounding)
    # {(layer, role)}: at 8 bits, chosen by measurement (quant.mixed; packed roles by their own)
    promoted: frozenset[tuple[int, R]] = frozenset()
    data_aware: str | None = None  # gptq, awq: the layers' projections rounded (scaled) with
    # calibration data
    budget: float | None = None  # *_mixed: quant_budget, for the measurement to promote within
    rounded: object | None = field(default=None, compare=False, repr=False)  # RoundedWeights
    smoothing: object | None = field(default=None, compare=False, repr=False)  # awq.Smoothing
    # {(layer, role): SQNR dB of the stored weight against the float one}, when measured
    weight_errors: dict | None = field(default=None, compare=False, repr=False)
    quantizers: Registry | None = field(default=None, compare=False, repr=False)
    seen: set[str] = field(default_factory=set, compare=False, repr=False)

    @classmethod
    def from_options(cls, precision: Precision, extra: ExtraOptions, num_layers: int,
                     quantizers: Registry, default_accuracy_level: int) -> QuantPolicy:
        if precision not in (Precision.INT4, Precision.INT8):
            return cls()
        bits = 4 if precision == Precision.INT4 else 8
        chosen = DEFAULT[bits] if extra.int4_algo_config == "default" else extra.int4_algo_config
        algorithm, last8, mixed8 = ALGORITHMS[chosen]
        if extra.int4_algo_config in MEASURED and bits != 4:
            raise OptionError(f"int4_algo_config={extra.int4_algo_config} promotes 4-bit "
                              "projections to 8 bits: it applies to -p int4 only")
        if algorithm not in quantizers:
            narrowed = os.environ.get("BUILDER_LOAD_PLUGINS")
            raise OptionError(f"quantizer {algorithm!r} is not registered; known: "
                              f"{', '.join(quantizers.names()) or 'none'}" + (
                                  f" (BUILDER_LOAD_PLUGINS={narrowed} leaves out the plugin "
                                  "that registers it: the built-in ones are 'quant')"
                                  if narrowed is not None else ""))
        unknown = set(extra.int4_op_types_to_quantize) - {"MatMul", "Gather"}
        if unknown:
            raise OptionError(f"int4_op_types_to_quantize: {', '.join(sorted(unknown))} cannot be "
                              "quantized; choose from MatMul, Gather")
        level = extra.int4_accuracy_level
        policy = cls(
            bits=bits, algorithm=algorithm, block_size=extra.int4_block_size,
            symmetric=extra.int4_is_symmetric and algorithm != "k_quant",
            accuracy_level=default_accuracy_level if level is None else level,
            lm_head_bits=8 if last8 else bits,
            mixed=mixed_layers(num_layers) if mixed8 and bits == 4 else frozenset(),
            exclude=frozenset(extra.int4_nodes_to_exclude),
            quantize_embedding="Gather" in extra.int4_op_types_to_quantize,
            quantize_matmul="MatMul" in extra.int4_op_types_to_quantize,
            data_aware=DATA_AWARE.get(extra.int4_algo_config), quantizers=quantizers,
            budget=extra.quant_budget if extra.int4_algo_config in MEASURED else None)
        logger.info("quantization: %s%s int%d, block %d, %s, accuracy_level %d; lm_head %d "
                    "bits%s%s", f"{policy.data_aware} (layers' projections; others rtn)"
                    if policy.data_aware else algorithm, f" (the default: {chosen})"
                    if extra.int4_algo_config == "default" else "", bits, policy.block_size,
                    "symmetric" if policy.symmetric else "asymmetric (zero points)",
                    policy.accuracy_level, policy.lm_head_bits,
                    f"; 8-bit qkv/v and down in layers {sorted(policy.mixed)}" if policy.mixed
                    else "; 8-bit projections chosen by measurement" if policy.budget is not None
                    else "", f"; excluded: {', '.join(sorted(policy.exclude))}"
                    if policy.exclude else "")
        return policy

    @classmethod
    def static_qdq(cls, bits: int, block_size: int, conv: bool, lpbq: bool = False
                   ) -> QuantPolicy:
        """Static (QNN) QDQ graphs: every layer projection at ``bits``, symmetric, int4
        block-wise on MatMul (``lpbq``: as LPBQ) and per channel on 1x1 Conv; embeddings and
        lm_head are the static lowering's (int8 per channel)."""
        return cls(bits=bits, algorithm="qdq", block_size=block_size, lm_head_bits=None,
                   qdq_conv=conv, lpbq=lpbq and not conv)

    def only_layers(self, layers: set[int], floats: set[tuple[int, R]] = frozenset()
                    ) -> QuantPolicy:
        """This policy for the weights of ``layers`` only (the sensitivity analysis, data-aware
        rounding), but ``floats`` ({(layer, role)}) left in float."""
        return dataclasses.replace(self, layers=frozenset(layers), floats=frozenset(floats),
                                   seen=set())

    def bits_for(self, role: R, layer: int | None, node_name: str,
                 own: R | str | None = None) -> int | None:
        """Bits for this weight, or None to keep it in float (``own``: the architecture's own
        role that ``role`` stands for, as ``promoted`` names it)."""
        self.seen.add(node_name)
        if self.bits is None or node_name in self.exclude:
            return None
        if self.layers is not None and layer not in self.layers:
            return None
        if (layer, own or role) in self.floats:
            return None
        if (layer, own or role) in self.promoted and self.quantize_matmul:
            return 8
        if self.qdq_conv is not None:
            return self.bits if role in LINEAR_ROLES - {R.LM_HEAD} else None
        if role == R.EMBED:
            return self.bits if self.quantize_embedding else None
        if role not in LINEAR_ROLES or not self.quantize_matmul:
            return None
        if role == R.LM_HEAD:
            return self.lm_head_bits
        if layer in self.mixed and role in MIXED_ROLES:
            return 8
        return self.bits

    def fold_norm(self, role: R, layer: int | None, weight):
        """A pre-projection norm's weight, divided by the scales activation-aware scaling chose
        for the projections it feeds (``quant.awq``); as it is otherwise."""
        return weight if self.smoothing is None else self.smoothing.norm(role, layer, weight)

    def fold_projection(self, role: R, layer: int | None, weight, builder):
        """A projection's weight with its input columns times those scales (up's rows divided
        by down's); as it is otherwise."""
        if self.smoothing is None:
            return weight
        return self.smoothing.projection(role, layer, weight, builder)

    def check_exclusions(self) -> None:
        """int4_nodes_to_exclude must name nodes of this graph (a typo would exclude nothing)."""
        unknown = sorted(self.exclude - self.seen)
        if unknown:
            raise OptionError(f"int4_nodes_to_exclude: no quantizable node named "
                              f"{', '.join(unknown)}{did_you_mean(unknown[0], self.seen)}; with "
                              "packed projections q/k/v are one qkv_proj (see unpack_matmul)")

    def quantize(self, role: R, layer: int | None, weight, bits: int):
        """``weight`` at ``bits``: as data-aware rounding left it where it did, else by the
        quantizer."""
        quantized = None if self.rounded is None else self.rounded.get(role, layer, bits)
        if quantized is None:
            quantized = self.quantizer(bits).quantize(weight)
        if self.weight_errors is not None and (layer, role) not in self.weight_errors:
            self.weight_errors[layer, role] = weight_sqnr(weight, quantized)
        return quantized

    def quantizer(self, bits: int) -> Quantizer:
        if self.qdq_conv is not None:
            return QdqQuantizer(bits, self.block_size, self.qdq_conv, self.lpbq)
        cls = self.quantizers.get(self.algorithm)
        return cls(bits, self.block_size, self.symmetric)


def dequantized(quantized, shape: tuple[int, ...]) -> np.ndarray:
    """A stored weight's values as the float [N, K] ``shape`` it quantized."""
    got = quantized.dequantize()
    if isinstance(quantized, QdqWeight):  # QDQ on MatMul: [K, N]; on Conv: [N, K, 1, 1]
        got = got.reshape(shape) if quantized.conv else got.T
    return got


def weight_sqnr(weight, quantized) -> float | None:
    """SQNR in dB of a stored (quantized) weight against the float [N, K] one."""
    w = np.asarray(weight, np.float32)
    got = dequantized(quantized, w.shape)
    noise = float(np.square(got - w, dtype=np.float64).sum())
    signal = float(np.square(w, dtype=np.float64).sum())
    return None if noise <= 0 or signal <= 0 else round(10 * np.log10(signal / noise), 2)
