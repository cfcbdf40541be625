"""Signals: the first Ctrl-C, SIGTERM or SIGHUP stops a command-line build cleanly.

``python -m builder`` takes them before anything heavy loads (``take_signals``). The first one
raises KeyboardInterrupt, which removes what the build staged; those that follow are ignored
while that cleanup runs. One that arrives inside an import or while a log line is written
waits a moment: a C extension interrupted while it initializes can crash the process (onnx's
does), and tqdm interrupted while it makes its lock prints tracebacks from then on. And since
a library may swallow the exception (a bare ``except``), the build checks ``requested()`` at
each stage's end and before it puts the folder in place. A library caller that takes no signals
is not affected.
"""

from __future__ import annotations

import signal
import threading

RETRY_S = 0.05
_signalled: list[int] = []  # the signals since reset: the first one interrupts


def reset() -> None:
    _signalled.clear()


def requested() -> bool:
    """A signal has asked the build to stop."""
    return bool(_signalled)


# code a KeyboardInterrupt must not cut in two: an import (a C extension half initialized can
# crash the process), and the writing of a log line (logging and tqdm create their locks
# lazily; cut there, tqdm is left without one and every later line prints a traceback)
_WAIT_IN = ("logging", "tqdm.")


def _waits(frame) -> bool:
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        if frame.f_code.co_filename.startswith("<frozen importlib") \
                or module.startswith(_WAIT_IN):
            return True
        frame = frame.f_back
    return False


def _interrupt(signum, frame):
    if _signalled:
        return
    if _waits(frame):  # sent again a moment later
        retry = threading.Timer(RETRY_S, signal.raise_signal, (signum,))
        retry.daemon = True
        retry.start()
        return
    _signalled.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def take_signals(signals=("SIGINT", "SIGTERM", "SIGHUP")) -> None:
    """Handle these signals from here on (the main thread only), except one the process was
    started ignoring: ``nohup`` ignores SIGHUP, and a shell's background job SIGINT."""
    for name in signals:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _interrupt)


def check() -> None:
    """Raise KeyboardInterrupt when a signal asked to stop but the exception it raised was
    swallowed on the way."""
    if _signalled:
        raise KeyboardInterrupt(f"signal {_signalled[0]}")
