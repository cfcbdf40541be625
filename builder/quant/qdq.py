"""QDQ quantization as the builder writes it for static (QNN) graphs.

Weights: symmetric int8 per output channel, or int4 block-wise along the input dimension on
MatMul (the HTP reads per-channel int4 on MatMul wrongly) and per channel on 1x1 Conv. The
arithmetic is onnxruntime.quantization's for symmetric signed weights (``compute_scale_zp`` with
qmin/qmax -127/127 for int8 and -8/7 for int4, round half to even, clip); the tests compare
bytes with it.

int4 blocks come in two forms. Float blocks: a float scale per block. LPBQ (low-power block
quantization, the form Snapdragon deployments ship): each block's scale is a small integer
multiplier (1..16, stored as uint8, read by the HTP in 4 bits) times a float scale per output
channel, written as DequantizeLinear(multipliers, channel scale) feeding the block
DequantizeLinear's scale, the pattern the QNN EP fuses into its block-wise expansion encoding.
The channel scale is the largest float block scale / 16; each block's multiplier is the one of
ceil(block scale / channel scale) - 2 .. + 1 with the least squared error over the block.

Activations: unsigned 16-bit (or 8-bit for w8a8), asymmetric per tensor, over the calibrated
range widened to include 0. Float initializers that are not a projection's weight (norm
scales, rotary tables, constants) are stored the same way, over their own range.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
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
                 conv: bool = False, lpbq: bool = False) -> None:
        self._weight, self.bits, self.conv = weight, bits, conv
        self.block_size = None if conv else block_size
        self.axis = 0 if conv or self.block_size else 1
        self.lpbq = bool(lpbq and self.block_size and bits == 4)

    @classmethod
    def of(cls, codes: np.ndarray, scales: np.ndarray, bits: int, block_size: int | None,
           conv: bool = False, channel_scales: np.ndarray | None = None) -> QdqWeight:
        """Codes and scales chosen elsewhere (data-aware rounding), in this class's layout;
        ``channel_scales``: LPBQ's, the block scales being whole multiples of them."""
        w = cls(None, bits, block_size, conv, lpbq=channel_scales is not None)
        w.__dict__["_quantized"] = (codes, scales, channel_scales)
        return w

    @property
    def elem_type(self) -> int:
        return SIGNED[self.bits][2]

    @property
    def codes(self) -> np.ndarray:  # int8 (int4 codes are held one per int8 until stored)
        return self._quantized[0]

    @property
    def scales(self) -> np.ndarray:  # float32; LPBQ: each block's multiplier x channel scale
        return self._quantized[1]

    @property
    def channel_scales(self) -> np.ndarray | None:  # LPBQ: float32 [N]
        return self._quantized[2]

    @property
    def multipliers(self) -> np.ndarray:  # LPBQ: uint8 [blocks, N], 1..16
        return np.rint(self.scales / self.channel_scales).astype(np.uint8)

    @cached_property
    def _quantized(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        w, bits, block_size = np.asarray(self._weight, np.float32), self.bits, self.block_size
        self._weight = None  # released once quantized
        if self.conv:
            scale = _scales(np.abs(w).max(axis=1), bits)
            return _codes(w, scale[:, None], bits).reshape(*w.shape, 1, 1), scale, None
        w = np.ascontiguousarray(w.T)  # [K, N]
        if not block_size:
            scale = _scales(np.abs(w).max(axis=0), bits)
            return _codes(w, scale[None, :], bits), scale, None
        k, n = w.shape
        blocks = -(-k // block_size)
        padded = np.zeros((blocks * block_size, n), np.float32)
        padded[:k] = w
        padded = padded.reshape(blocks, block_size, n)
        channel = None
        if self.lpbq:
            channel = lpbq_channel_scales(padded, bits)
            scale = lpbq_block_scales(padded, channel, bits)
        else:
            scale = _scales(np.abs(padded).max(axis=1), bits)  # [blocks, N]
        return _codes(w, np.repeat(scale, block_size, axis=0)[:k], bits), scale, channel

    def dequantize(self) -> np.ndarray:
        s = self.scales
        if self.block_size:
            s = np.repeat(s, self.block_size, axis=0)[: self.codes.shape[0]]
        elif self.axis == 1:
            s = s[None, :]
        else:
            s = s.reshape(-1, *[1] * (self.codes.ndim - 1))
        return self.codes.astype(np.float32) * s


def _raw_scales(absmax: np.ndarray, bits: int) -> np.ndarray:
    qmin, qmax, _ = SIGNED[bits]
    return (2 * absmax / np.float32(qmax - qmin)).astype(np.float32)


def _scales(absmax: np.ndarray, bits: int) -> np.ndarray:
    scale = _raw_scales(absmax, bits)
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def _codes(w: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    qmin, qmax, _ = SIGNED[bits]
    return np.clip(np.rint(w / scale), qmin, qmax).astype(np.int8)


LPBQ_MULTIPLIERS = 16  # the largest block multiplier (the HTP stores them in 4 bits, 1..16)
PARALLEL = 1 << 21  # weights this large search their multipliers on every core


def lpbq_channel_scales(blocks: np.ndarray, bits: int = 4) -> np.ndarray:
    """LPBQ's float scale per output channel of a weight's ``blocks`` [blocks, block_size, N]:
    the largest float block scale / 16, so that the largest block takes multiplier 16."""
    top = _raw_scales(np.abs(blocks).max(axis=1), bits).max(axis=0) / LPBQ_MULTIPLIERS
    return np.where(top > 0, top, np.float32(1)).astype(np.float32)  # (an all-zero channel)


def lpbq_block_scales(blocks: np.ndarray, channel: np.ndarray, bits: int = 4,
                      columns: int = 1024) -> np.ndarray:
    """Each block's scale (float32 [blocks, N]), a whole multiple 1..16 of its ``channel``
    scale: of the multipliers ceil(float block scale / channel) - 2 .. + 1, the one whose
    rounding leaves the least squared error over the block (a smaller one trades clipping the
    block's extremes for finer steps). ``columns`` of N at a time, to bound the temporaries,
    on every core at once for a large weight (numpy's work releases the GIL)."""
    qmin, qmax, _ = SIGNED[bits]
    out = np.empty((blocks.shape[0], blocks.shape[2]), np.float32)

    def chunk(a):
        w, c = blocks[:, :, a:a + columns], channel[a:a + columns]
        start = np.ceil(_raw_scales(np.abs(w).max(axis=1), bits) / c)  # (0: a zero block)
        best = best_error = None
        for step in (0, -1, 1, -2):  # (ties keep the earlier: the no-clipping one first)
            m = np.clip(start + step, 1, LPBQ_MULTIPLIERS).astype(np.float32)
            scale = (m * c).astype(np.float32)[:, None, :]
            error = np.square(w - np.clip(np.rint(w / scale), qmin, qmax) * scale).sum(axis=1)
            if best is None:
                best, best_error = m, error
            else:
                better = error < best_error
                best, best_error = np.where(better, m, best), np.where(better, error, best_error)
        out[:, a:a + columns] = best * c

    starts = range(0, blocks.shape[2], columns)
    if blocks.size < PARALLEL or len(starts) == 1:
        for a in starts:
            chunk(a)
    else:
        with ThreadPoolExecutor(min(len(starts), os.cpu_count() or 1)) as pool:
            list(pool.map(chunk, starts))
    return out


def quantize_weight(weight: np.ndarray, bits: int, block_size: int | None,
                    conv: bool = False, lpbq: bool = False) -> QdqWeight:
    """A Hugging Face [out, in] weight → QdqWeight (``block_size`` applies to MatMul only;
    ``lpbq``: int4 blocks as LPBQ)."""
    return QdqWeight(weight, bits, block_size, conv, lpbq)


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
    # (a range so narrow that its step underflows the float type: its smallest normal step)
    scale = np.asarray(max(scale, float(np.finfo(dtype).tiny)), dtype)
    zero = np.asarray(np.clip(np.rint(-lo / float(scale)), 0, qmax), zdtype)
    return scale, zero


@dataclass(frozen=True)
class QdqQuantizer:
    """The static QDQ graphs' weight quantizer, as the quantization policy hands it out."""
    bits: int
    block_size: int
    conv: bool
    lpbq: bool = False  # int4 blocks on MatMul as LPBQ

    def quantize(self, weight: np.ndarray) -> QdqWeight:
        block = self.block_size if self.bits == 4 and not self.conv else None
        return quantize_weight(weight, self.bits, block, self.conv, self.lpbq)

    def fake(self, weight: np.ndarray) -> np.ndarray:
        """The values the stored weight stands for, float32 [N, K] (see ``Quantizer.fake``)."""
        from builder.quant.policy import dequantized

        return dequantized(self.quantize(weight), weight.shape)
