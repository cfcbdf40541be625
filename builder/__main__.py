import os
import signal
import sys

try:
    from builder.interrupt import take_signals
    take_signals()
    from builder.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python itself was still starting
    sys.stderr.write("error: interrupted; nothing was written\n")
    sys.exit(130)

code = main()
if code == 130:  # interrupted and cleaned up (nothing left to write or remove): end at once.
    # A Ctrl-C inside a C extension's import leaves it half initialized, and the interpreter's
    # own shutdown may then crash; more Ctrl-C while it ends would print its tracebacks.
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
