"""``python -m builder``: flags follow onnxruntime-genai's model builder."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

from builder import interrupt
from builder.errors import OUT_OF_MEMORY, BuilderError, did_you_mean
from builder.options import (
    BuildOptions,
    ExecutionProvider,
    ExtraOptions,
    Precision,
    options_help,
)

logger = logging.getLogger("builder")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other user error
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):
        known, rest = self.parse_known_args(args, namespace)
        if rest:
            flags = [s for action in self._actions for s in action.option_strings]
            word = next((r for r in rest if r.startswith("-")), rest[0])
            self.error(f"unrecognized argument {word!r}"
                       f"{did_you_mean(word.partition('=')[0], flags)}")
        return known


def _options_help() -> str:
    """The built-in extra options and those of the plugins that load (a plugin that fails to
    load is reported when a build runs, not here)."""
    from builder.plugins import default_plugins

    try:
        options = default_plugins().options
    except BuilderError:
        return options_help()
    return options_help(plugin_options=[(options.owner(n), options.get(n))
                                        for n in options.names()])


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m builder",
        description="Build an ONNX Runtime model folder from a Hugging Face decoder checkpoint "
                    "(safetensors + config.json).",
        epilog=_options_help(),  # raw: argparse formats no % in a raw epilog
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model_name", help="hub id (org/name) or local folder")
    p.add_argument("-i", "--input", type=Path, help="local checkpoint folder (overrides -m)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("-p", "--precision", choices=[str(x) for x in Precision],
                   help="weight precision (default: fp32 on cpu, fp16 on cuda and qnn)")
    p.add_argument("-e", "--execution_provider", default="cpu",
                   choices=[str(x) for x in ExecutionProvider],
                   help="target execution provider (default cpu)")
    p.add_argument("-c", "--cache_dir", type=Path, help="Hugging Face cache folder for downloads")
    p.add_argument("--extra_options", nargs="*", action="extend", default=[],
                   metavar="KEY=VALUE", help="extra options, listed below (given more than "
                   "once: all of them count)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging (-v: debug)")
    return p


def out_of_memory(e: BaseException) -> bool:
    """An error that says memory ran out, whoever raised it: onnxruntime's allocators and the
    safetensors reader report it in their own exception types, the OS as ENOMEM."""
    while e is not None:
        if isinstance(e, MemoryError) or isinstance(e, OSError) and e.errno == errno.ENOMEM \
                or any(s in str(e) for s in OUT_OF_MEMORY):
            return True
        e = e.__cause__ or e.__context__
    return False


def _interrupted_line() -> int:
    sys.stderr.write("error: interrupted; nothing was written\n")
    return 130


def _interrupted(e: BaseException | None) -> bool:
    """A signal that arrived inside a C extension's import comes back as another exception
    (ImportError: initialization failed) caused by our KeyboardInterrupt."""
    while e is not None:
        if isinstance(e, KeyboardInterrupt):
            return True
        e = e.__cause__ or e.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # (while the parser loaded the plugins for --help, say)
        return _interrupted_line()


def _main(argv: list[str] | None) -> int:
    interrupt.reset()
    interrupt.take_signals(("SIGTERM", "SIGHUP"))  # clean up on kill, too
    args = parser().parse_args(argv)
    if interrupt.requested():  # a Ctrl-C that a library swallowed (a bare except) still stops it
        return _interrupted_line()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        options = BuildOptions(
            model_name=args.model_name, input=args.input, output=args.output,
            precision=Precision(args.precision) if args.precision else None,
            execution_provider=ExecutionProvider(args.execution_provider),
            cache_dir=args.cache_dir, extra=ExtraOptions.parse(args.extra_options))
        from builder.build_model import build
        build(options)
    except BuilderError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except MemoryError:
        sys.stderr.write("error: out of memory; nothing was written (see the log for the "
                         "stage that ran out)\n")
        return 2
    except Exception as e:
        if out_of_memory(e):  # (onnxruntime's allocation failures, ENOMEM from the OS)
            sys.stderr.write("error: out of memory; nothing was written (see the log for the "
                             "stage that ran out)\n")
            return 2
        if not _interrupted(e):
            raise
        return _interrupted_line()
    except KeyboardInterrupt:
        return _interrupted_line()
    return 0
