"""Per-stage wall time and peak memory for the build manifest.

Peak memory per stage: when the kernel's process-wide high-water mark (VmHWM) rose during the
stage, the stage set it and it is exact; otherwise the stage's peak is the largest resident size
sampled every few milliseconds by a daemon thread (which can miss spikes inside code that holds
the GIL, but such a spike would have raised the high-water mark).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import threading
import time
from collections.abc import Iterator

from builder import interrupt

logger = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
INTERVAL_S = 0.005


def hwm_mb() -> float | None:
    """The process's peak resident memory so far, in MB (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident memory in MB (Linux /proc; elsewhere the lifetime peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 1e6
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.peak = rss_mb()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(INTERVAL_S):
            self.peak = max(self.peak, rss_mb())

    def stop(self) -> float:
        self._done.set()
        self.join()
        return max(self.peak, rss_mb())


class StageMeter:
    """``with meter("graph"): ...`` records seconds and peak resident memory of each stage."""

    def __init__(self) -> None:
        self.stages: list[dict] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        sampler = _PeakSampler()
        sampler.start()
        hwm_before = hwm_mb()
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            peak = sampler.stop()
            hwm_after = hwm_mb()
            if hwm_before is not None and hwm_after is not None and hwm_after > hwm_before:
                peak = max(peak, hwm_after)
            self.stages.append({"stage": name, "seconds": round(seconds, 3),
                                "peak_rss_mb": round(peak, 1)})
            logger.info("stage %s: %.2f s, peak RSS %.0f MB", name, seconds, peak)
        interrupt.check()  # (a signal whose exception a library swallowed in the stage)
