import os
import signal
import sys

if getattr(sys.modules.get("builder"), "__file__", None) is None:
    # run from the folder that holds a clone named "builder" (with an editable install):
    # Python took that folder for the package. Forget it, and load the installed package.
    _here = os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", ".", _here)]
    for _name in [m for m in sys.modules if m == "builder" or m.startswith("builder.")]:
        del sys.modules[_name]

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
