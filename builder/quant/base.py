"""Quantized weights and the quantizer interface.

A quantizer turns one float weight, laid out as Hugging Face stores it ([out, in] = [N, K]), into
the block layout onnxruntime's MatMulNBits and GatherBlockQuantized read: for each of the N rows,
K is cut into blocks of ``block_size``, each with its own scale (and zero point when asymmetric),
and the codes are packed little-end first (two 4-bit codes per byte, low nibble first).
"""

from __future__ import annotations

import abc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

THREADS = 2              # numpy releases the GIL in its kernels: tasks run on both cores
TASK_VALUES = 1 << 18    # weights per task (1 MB of float32): big enough for both cores to gain


@dataclass(frozen=True)
class QuantizedWeight:
    data: np.ndarray                 # uint8 [N, blocks, block_size * bits / 8]
    scales: np.ndarray               # float32 [N, blocks]
    zero_points: np.ndarray | None   # uint8 [N, ceil(blocks * bits / 8)], None when symmetric
    bits: int
    block_size: int
    k: int                           # input features (K) before padding to whole blocks
    k_order: np.ndarray | None = None  # stored column j is input column k_order[j] (a
    # pre-quantized checkpoint's groups ordered by activation); None: in order

    @property
    def n(self) -> int:
        return self.data.shape[0]

    def dequantize(self) -> np.ndarray:
        """[N, K] float32, as the kernels reconstruct it: (code - zero point) * scale."""
        codes = unpack(self.data.reshape(self.n, -1), self.bits).reshape(self.n, -1, self.block_size)
        if self.zero_points is None:
            zp = np.full(self.scales.shape, 1 << (self.bits - 1), np.float32)
        else:
            zp = unpack(self.zero_points, self.bits)[:, : self.scales.shape[1]].astype(np.float32)
        w = (codes.astype(np.float32) - zp[..., None]) * self.scales[..., None]
        w = w.reshape(self.n, -1)[:, : self.k]
        if self.k_order is None:
            return w
        columns = np.empty_like(w)
        columns[:, self.k_order] = w
        return columns


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., M] → bytes [..., M * bits / 8], low nibble first for 4 bits."""
    if bits == 8:
        return codes.astype(np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), codes.dtype)], -1)
    return (codes[..., 0::2] & 0xF | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = packed & 0xF
    out[..., 1::2] = packed >> 4
    return out


_JUST_BELOW_HALF = np.nextafter(np.float32(0.5), np.float32(0))


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf (ties away from zero) for float32: trunc(x ± largest float below 0.5). Adding
    0.5 itself would round x = 0.49999997 up to 1 in float32."""
    out = np.copysign(_JUST_BELOW_HALF, x)
    np.add(out, x, out=out)
    return np.trunc(out, out=out)


class Quantizer(abc.ABC):
    """A weight-only quantizer: numpy in, QuantizedWeight out, no graph knowledge.

    Subclasses see blocks transposed, as [block_size, blocks]: every per-block statistic is then
    an elementwise operation over long contiguous rows (a reduction over a short last axis is
    several times slower in numpy), and a task of TASK_VALUES values stays in cache.
    """

    name: ClassVar[str]

    def __init__(self, bits: int, block_size: int, symmetric: bool) -> None:
        if bits not in (4, 8):
            raise ValueError(f"{self.name}: bits must be 4 or 8, got {bits}")
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric

    def quantize(self, weight: np.ndarray) -> QuantizedWeight:
        """Quantize a [N, K] weight (any float dtype), a few rows per task, on THREADS cores."""
        n, k = weight.shape
        size, bits = self.block_size, self.bits
        blocks = -(-k // size)
        data = np.empty((n, blocks, size * bits // 8), np.uint8)
        scales = np.empty((n, blocks), np.float32)
        zps = np.empty((n, blocks), np.uint8)
        step = max(1, TASK_VALUES // (blocks * size))

        def run(a: int) -> None:
            b = min(a + step, n)
            rows = np.zeros((b - a, blocks * size), np.float32)
            rows[:, :k] = weight[a:b]
            q, s, z = self.quantize_blocks(np.ascontiguousarray(rows.reshape(-1, size).T))
            if k % size:  # codes past K are padding, which the kernels' layout keeps at 0
                tail = q.reshape(size, b - a, blocks)[:, :, -1]
                tail[k % size:] = 0
                if k % 2 and bits == 4:  # except the other half of the last real byte
                    tail[k % size] = z.reshape(b - a, blocks)[:, -1]
            data[a:b] = pack_columns(q, bits).reshape(b - a, blocks, -1)
            scales[a:b] = s.reshape(b - a, blocks)
            zps[a:b] = z.reshape(b - a, blocks)

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(run, range(0, n, step)))
        zero_points = None if self.symmetric else pack(zps, bits)
        return QuantizedWeight(data, scales, zero_points, bits, size, k)

    def fake(self, weight: np.ndarray) -> np.ndarray:
        """``quantize(weight).dequantize()`` without packing: float32 [N, K], the values the
        stored weight stands for (a search that rounds many candidates, ``quant.awq``)."""
        n, k = weight.shape
        size = self.block_size
        blocks = -(-k // size)
        rows = np.zeros((n, blocks * size), np.float32)
        rows[:, :k] = weight
        q, s, z = self.quantize_blocks(np.ascontiguousarray(rows.reshape(-1, size).T))
        values = (q.astype(np.float32) - z.astype(np.float32)) * s
        return values.T.reshape(n, blocks * size)[:, :k]

    @abc.abstractmethod
    def quantize_blocks(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float32 [block_size, blocks] (zero padded past K) → (uint8 codes [block_size,
        blocks], float32 scales [blocks], uint8 zero points [blocks])."""


def pack_columns(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [block_size, blocks] → packed bytes [blocks, block_size * bits / 8]."""
    if bits == 8:
        return codes.T
    return (codes[0::2] | (codes[1::2] << 4)).T
