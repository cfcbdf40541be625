"""QDQ quantization as the builder writes it for static (QNN) graphs.

Weights: symmetric int8 per output channel, or int4 block-wise along the input dimension on
MatMul (the HTP reads per-channel int4 on MatMul wrongly) and per channel on 1x1 Conv. The
arithmetic is onnxruntime.quantization's for symmetric signed weights (``compute_scale_zp`` with
qmin/qmax -127/127 for int8 and -8/7 for int4, round half to even, clip); the tests compare
bytes with it.

Activations: unsigned 16-bit (or 8-bit for w8a8), asymmetric per tensor, over the calibrated
range widened to include 0. Float initializers that are not a projection's weight (norm
scales, rotary tables, constants) are stored the same way, over their own range.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from onnx import TensorProto

SIGNED = {8: (-127, 127, TensorProto.INT8), 4: (-8, 7, TensorProto.INT4)}
UNSIGNED = {16: (65535, TensorProto.UINT16, np.uint16), 8: (255, TensorProto.UINT8, np.uint8)}


class QdqWeight:
    """A projection's weight as DequantizeLinear reads it: codes in the node's layout (MatMul
    [K, N]; Conv [N, K, 1, 1]), scales along ``axis`` (block-wise: [K / block, N]).

    From a Hugging Face [out, in] weight: for MatMul per channel on axis 1, or block-wise along
    axis 0 with ``block_size``; for a 1x1 Conv (``conv``) per channel on axis 0. The codes are
    computed when first read: a graph that references the codes another graph of the folder
    already stored (prefill and decode share their weights) never quantizes the weight again."""

    def __init__(self, weight: np.ndarray, bits: int, block_size: int | None = None,
                 conv: bool = False) -> None:
        self._weight, self.bits, self.conv = weight, bits, conv
        self.block_size = None if conv else block_size
        self.axis = 0 if conv or self.block_size else 1

    @classmethod
    def of(cls, codes: np.ndarray, scales: np.ndarray, bits: int, block_size: int | None,
           conv: bool = False) -> QdqWeight:
        """Codes and scales chosen elsewhere (data-aware rounding), in this class's layout."""
        w = cls(None, bits, block_size, conv)
        w.__dict__["_quantized"] = (codes, scales)
        return w

    @property
    def elem_type(self) -> int:
        return SIGNED[self.bits][2]

    @property
    def codes(self) -> np.ndarray:  # int8 (int4 codes are held one per int8 until stored)
        return self._quantized[0]

    @property
    def scales(self) -> np.ndarray:  # float32
        return self._quantized[1]

    @cached_property
    def _quantized(self) -> tuple[np.ndarray, np.ndarray]:
        w, bits, block_size = np.asarray(self._weight, np.float32), self.bits, self.block_size
        self._weight = None  # released once quantized
        if self.conv:
            scale = _scales(np.abs(w).max(axis=1), bits)
            return _codes(w, scale[:, None], bits).reshape(*w.shape, 1, 1), scale
        w = np.ascontiguousarray(w.T)  # [K, N]
        if not block_size:
            scale = _scales(np.abs(w).max(axis=0), bits)
            return _codes(w, scale[None, :], bits), scale
        k, n = w.shape
        blocks = -(-k // block_size)
        padded = np.zeros((blocks * block_size, n), np.float32)
        padded[:k] = w
        absmax = np.abs(padded.reshape(blocks, block_size, n)).max(axis=1)  # [blocks, N]
        scale = _scales(absmax, bits)
        return _codes(w, np.repeat(scale, block_size, axis=0)[:k], bits), scale

    def dequantize(self) -> np.ndarray:
        s = self.scales
        if self.block_size:
            s = np.repeat(s, self.block_size, axis=0)[: self.codes.shape[0]]
        elif self.axis == 1:
            s = s[None, :]
        else:
            s = s.reshape(-1, *[1] * (self.codes.ndim - 1))
        return self.codes.astype(np.float32) * s


def _scales(absmax: np.ndarray, bits: int) -> np.ndarray:
    qmin, qmax, _ = SIGNED[bits]
    scale = (2 * absmax / np.float32(qmax - qmin)).astype(np.float32)
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def _codes(w: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    qmin, qmax, _ = SIGNED[bits]
    return np.clip(np.rint(w / scale), qmin, qmax).astype(np.int8)


def quantize_weight(weight: np.ndarray, bits: int, block_size: int | None,
                    conv: bool = False) -> QdqWeight:
    """A Hugging Face [out, in] weight → QdqWeight (``block_size`` applies to MatMul only)."""
    return QdqWeight(weight, bits, block_size, conv)


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Signed 4-bit codes (held as int8) → ONNX INT4 bytes: row-major, two per byte, the first
    in the low nibble."""
    flat = codes.astype(np.uint8).ravel() & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def activation_params(lo: float, hi: float, bits: int, dtype=np.float32
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) of an unsigned asymmetric per-tensor quantization of [lo, hi]
    (widened to include 0, so that 0 is exact); scale 1 for an all-zero range, as
    onnxruntime's quantizer writes it."""
    qmax, _, zdtype = UNSIGNED[bits]
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / qmax if hi > lo else 1.0
    scale = np.asarray(scale, dtype)
    zero = np.asarray(np.clip(np.rint(-lo / float(scale)), 0, qmax), zdtype)
    return scale, zero


@dataclass(frozen=True)
class QdqQuantizer:
    """The static QDQ graphs' weight quantizer, as the quantization policy hands it out."""
    bits: int
    block_size: int
    conv: bool

    def quantize(self, weight: np.ndarray) -> QdqWeight:
        block = self.block_size if self.bits == 4 and not self.conv else None
        return quantize_weight(weight, self.bits, block, self.conv)

    def fake(self, weight: np.ndarray) -> np.ndarray:
        """The values the stored weight stands for, float32 [N, K] (see ``Quantizer.fake``)."""
        from builder.quant.policy import dequantized

        return dequantized(self.quantize(weight), weight.shape)
