"""builder: Hugging Face decoder checkpoints (safetensors + config.json) to ONNX Runtime models.

Public API: ``build``, ``BuildOptions``, ``ExtraOptions``, ``DecoderBuilder``, ``DecoderConfig``,
``TensorRole``, the plugin marker ``hookimpl`` and ``PluginOption`` (a plugin's own extra
option). Importing this package loads neither torch nor transformers, and nothing heavy until a
name is used: ``python -m builder`` takes its signals (Ctrl-C) before numpy and onnx load.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build": "builder.build_model", "BuilderError": "builder.errors", "hookimpl": "builder.hookspecs",
    "DecoderBuilder": "builder.models.base", "DecoderConfig": "builder.config",
    "BuildOptions": "builder.options",
    "ExecutionProvider": "builder.options", "ExtraOptions": "builder.options",
    "PluginOption": "builder.options", "Precision": "builder.options",
    "TensorRole": "builder.roles",
}

__all__ = ["BuildOptions", "BuilderError", "DecoderBuilder", "DecoderConfig", "ExecutionProvider",
           "ExtraOptions", "PluginOption", "Precision", "TensorRole", "build", "hookimpl"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'builder' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
