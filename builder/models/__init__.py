"""The built-in architectures, registered through the ``register_architectures`` hook like any
third-party plugin (entry point ``models`` in pyproject.toml)."""

from __future__ import annotations

from builder.hookspecs import hookimpl
from builder.models.base import DecoderBuilder
from builder.models.llama import LlamaBuilder
from builder.models.phi3 import Phi3Builder
from builder.models.qwen3 import Qwen3Builder

__all__ = ["DecoderBuilder", "LlamaBuilder", "Phi3Builder", "Qwen3Builder"]


@hookimpl
def register_architectures(register):
    register(LlamaBuilder)
    register(Qwen3Builder)
    register(Phi3Builder)
