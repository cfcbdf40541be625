"""builder: Hugging Face decoder checkpoints (safetensors + config.json) to ONNX Runtime models.

Public API: ``build``, ``BuildOptions``, ``ExtraOptions``, ``DecoderBuilder``, the plugin
marker ``hookimpl`` and ``PluginOption`` (a plugin's own extra option). Importing this package
loads neither torch nor transformers.
"""

from builder.build import build
from builder.errors import BuilderError
from builder.hookspecs import hookimpl
from builder.models.base import DecoderBuilder
from builder.options import (
    BuildOptions, ExecutionProvider, ExtraOptions, PluginOption, Precision,
)
from builder.roles import TensorRole

__all__ = ["build", "BuildOptions", "BuilderError", "DecoderBuilder", "ExecutionProvider",
           "ExtraOptions", "PluginOption", "Precision", "TensorRole", "hookimpl"]
