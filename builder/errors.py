"""The error hierarchy. A BuilderError is the user's to fix: the CLI prints its message and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class BuilderError(Exception):
    """Something the user can fix: a bad option, a bad checkpoint, an unsupported combination."""


class OptionError(BuilderError):
    """A command-line flag or extra option is unknown, malformed or not supported yet."""


class ConfigError(BuilderError):
    """config.json is missing, malformed or describes something we cannot build."""


class SourceError(BuilderError):
    """The model folder or hub repository cannot be used (missing files, pickle-only weights)."""


class WeightError(BuilderError):
    """A checkpoint tensor is missing, unused, malformed or of the wrong shape or dtype."""


class UnsupportedArchitectureError(BuilderError):
    """No registered builder handles the checkpoint's architecture."""


class PluginError(BuilderError):
    """A plugin failed to load or registered a clashing name."""


class OutputError(BuilderError):
    """The output folder cannot be written safely."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest candidate, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class AccuracyError(BuilderError):
    """A quantized build whose own accuracy report shows it broken."""


# What onnxruntime's allocators, the safetensors reader and the OS say when memory runs out, in
# their own exception types or a child process's stderr
OUT_OF_MEMORY = ("Failed to allocate memory", "bad_alloc", "Cannot allocate memory")
