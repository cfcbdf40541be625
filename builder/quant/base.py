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

THREADS = 2          # numpy releases the GIL in its kernels: rows are quantized on both cores
ROWS_PER_TASK = 256


@dataclass(frozen=True)
class QuantizedWeight:
    data: np.ndarray                 # uint8 [N, blocks, block_size * bits / 8]
    scales: np.ndarray               # float32 [N, blocks]
    zero_points: np.ndarray | None   # uint8 [N, ceil(blocks * bits / 8)], None when symmetric
    bits: int
    block_size: int
    k: int                           # input features (K) before padding to whole blocks

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
        return w.reshape(self.n, -1)[:, : self.k]


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


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf (ties away from zero), exact for float32 inputs."""
    x64 = x.astype(np.float64)
    return (np.sign(x64) * np.floor(np.abs(x64) + 0.5)).astype(np.float32)


class Quantizer(abc.ABC):
    """A weight-only quantizer: numpy in, QuantizedWeight out, no graph knowledge."""

    name: ClassVar[str]

    def __init__(self, bits: int, block_size: int, symmetric: bool) -> None:
        if bits not in (4, 8):
            raise ValueError(f"{self.name}: bits must be 4 or 8, got {bits}")
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric

    def quantize(self, weight: np.ndarray) -> QuantizedWeight:
        """Quantize a [N, K] weight (any float dtype), rows in parallel."""
        n, k = weight.shape
        blocks = -(-k // self.block_size)
        tasks = [(a, min(a + ROWS_PER_TASK, n)) for a in range(0, n, ROWS_PER_TASK)]
        codes = np.empty((n, blocks, self.block_size), np.uint8)
        scales = np.empty((n, blocks), np.float32)
        zps = np.empty((n, blocks), np.uint8)

        def run(span):
            a, b = span
            rows = np.zeros((b - a, blocks * self.block_size), np.float32)
            rows[:, :k] = weight[a:b]
            q, s, z = self.quantize_blocks(rows.reshape(b - a, blocks, self.block_size), k)
            codes[a:b], scales[a:b], zps[a:b] = q, s, z

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(run, tasks))
        if k % self.block_size:  # codes past K are padding: the kernels' layout keeps them 0
            flat = codes.reshape(n, -1)
            flat[:, k:] = 0
            if k % 2 and self.bits == 4:
                flat[:, k] = zps[:, -1]  # the other half of the last real byte
        data = pack(codes.reshape(n, -1), self.bits).reshape(n, blocks, -1)
        zero_points = None if self.symmetric else pack(zps, self.bits)
        return QuantizedWeight(data, scales, zero_points, self.bits, self.block_size, k)

    @abc.abstractmethod
    def quantize_blocks(self, blocks: np.ndarray, k: int):
        """float32 [rows, blocks, block_size] (zero padded past K) →
        (uint8 codes, float32 scales [rows, blocks], uint8 zero points [rows, blocks])."""
