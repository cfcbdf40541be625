"""Per-stage wall time and peak memory for the build manifest."""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset (or since start), in MB."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StageMeter:
    """``with meter("read"): ...`` records seconds and peak RSS of each stage."""

    def __init__(self) -> None:
        self.stages: list[dict] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        per_stage = _reset_peak()
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            peak = peak_rss_mb()
            self.stages.append({"stage": name, "seconds": round(seconds, 3),
                                "peak_rss_mb": round(peak, 1),
                                "peak_is_per_stage": per_stage})
            logger.info("stage %s: %.2f s, peak RSS %.0f MB", name, seconds, peak)
