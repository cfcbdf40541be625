"""What calibration keeps of the values the layer stream computes: the range of every float
tensor (``Ranges``: min/max, or histograms cut at a percentile) and, for the sensitivity
analysis, min, max and energy (``TensorStats``), per graph kind and tensor name."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

PERCENTILE = 99.999
BINS = 2048


class Ranges:
    """The range of every float tensor, per graph kind: running min/max, or (percentile)
    histograms that are re-binned as the range grows and cut at 99.999% on each side."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.minmax: dict[str, dict[str, list[float]]] = {}
        self.histograms: dict[str, dict[str, _Histogram]] = {}
        # numpy's reductions release the GIL: the arrays are reduced on every core at once
        self.pool = ThreadPoolExecutor(os.cpu_count() or 1)

    def add(self, kind: str, values: dict[str, np.ndarray]) -> None:
        arrays = [(n, a) for n, a in values.items() if a.dtype.kind == "f" and a.size]
        seen = self.minmax.setdefault(kind, {})
        for (name, a), (lo, hi) in zip(arrays, self.pool.map(lambda item: minmax(item[1]),
                                                             arrays)):
            if name in seen:
                seen[name][0], seen[name][1] = min(seen[name][0], lo), max(seen[name][1], hi)
            else:
                seen[name] = [lo, hi]
            if self.method == "percentile":
                self.histograms.setdefault(kind, {}).setdefault(name, _Histogram()).add(a, lo, hi)

    def close(self) -> None:
        """Stop the reducing threads (the ranges stay readable)."""
        self.pool.shutdown()

    def result(self, kind: str) -> dict[str, tuple[float, float]]:
        if self.method == "percentile":
            return {n: h.cut(PERCENTILE) for n, h in self.histograms.get(kind, {}).items()}
        return {n: (lo, hi) for n, (lo, hi) in self.minmax.get(kind, {}).items()}


def minmax(a: np.ndarray) -> tuple[float, float]:
    """(min, max) of a float array; fp16 through an order-preserving int16 view (numpy reduces
    fp16 an element at a time: the KV buffers made this most of calibration's time)."""
    if a.dtype != np.float16:
        return float(a.min()), float(a.max())
    x = a.view(np.int16)
    key = x ^ ((x >> 15) & np.int16(0x7FFF))  # negative halves: order reversed back

    def value(k):
        k = np.int16(k)
        return float(np.array(k ^ ((k >> 15) & np.int16(0x7FFF)), np.int16).view(np.float16))

    return value(key.min()), value(key.max())


class TensorStats:
    """Per graph kind and tensor: min, max, and the sum of squares and count of the values seen
    (the held-out calls' float values: what the sensitivity analysis compares with the ranges
    calibration chose). Reduced on every core at once, as ``Ranges``."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, list[float]]] = {}
        self.pool = ThreadPoolExecutor(os.cpu_count() or 1)

    def add(self, kind: str, values: dict[str, np.ndarray]) -> None:
        arrays = [(n, a) for n, a in values.items() if a.dtype.kind == "f" and a.size]
        seen = self.stats.setdefault(kind, {})
        for (name, a), (lo, hi, squares) in zip(arrays, self.pool.map(
                lambda item: (*minmax(item[1]), squares_of(item[1])), arrays)):
            s = seen.setdefault(name, [lo, hi, 0.0, 0.0])
            s[0], s[1] = min(s[0], lo), max(s[1], hi)
            s[2], s[3] = s[2] + squares, s[3] + a.size

    def close(self) -> None:
        self.pool.shutdown()


def squares_of(a: np.ndarray) -> float:
    """The sum of squares of a float array (fp16 in float32 slices)."""
    flat = a.reshape(-1)
    if flat.dtype == np.float32:
        return float(np.vdot(flat, flat))
    return sum(float(np.vdot(x, x)) for x in (flat[i:i + (1 << 20)].astype(np.float32)
                                            for i in range(0, flat.size, 1 << 20)))


class _Histogram:
    def __init__(self) -> None:
        self.counts: np.ndarray | None = None
        self.lo = self.hi = 0.0

    def add(self, a: np.ndarray, lo: float, hi: float) -> None:
        if self.counts is None:
            self.lo, self.hi = lo, hi if hi > lo else lo + 1e-12
            self.counts = np.zeros(BINS, np.int64)
        elif lo < self.lo or hi > self.hi:  # widen: old bins re-binned by their centres
            edges = np.linspace(self.lo, self.hi, BINS + 1)
            centres = (edges[:-1] + edges[1:]) / 2
            self.lo, self.hi = min(lo, self.lo), max(hi, self.hi)
            self.counts = np.histogram(centres, BINS, (self.lo, self.hi),
                                       weights=self.counts)[0].astype(np.int64)
        self.counts += np.histogram(a.astype(np.float32, copy=False), BINS,
                                    (self.lo, self.hi))[0]

    def cut(self, percentile: float) -> tuple[float, float]:
        cdf = np.cumsum(self.counts) / max(1, self.counts.sum())
        edges = np.linspace(self.lo, self.hi, BINS + 1)
        tail = (100.0 - percentile) / 200.0
        left = int(np.searchsorted(cdf, tail))
        right = int(np.searchsorted(cdf, 1.0 - tail))
        return float(edges[left]), float(edges[min(right + 1, BINS)])
