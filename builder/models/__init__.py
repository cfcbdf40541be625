"""The built-in architectures, registered through the ``register_architectures`` hook like any
third-party plugin (entry point ``models`` in pyproject.toml)."""

from __future__ import annotations

from builder.hookspecs import hookimpl
from builder.models.base import DecoderBuilder
from builder.models.llama import LlamaBuilder
from builder.models.mixtral import MixtralBuilder
from builder.models.phi3 import Phi3Builder
from builder.models.qwen3 import Qwen3Builder
from builder.models.qwen3_moe import Qwen3MoeBuilder

__all__ = ["DecoderBuilder", "LlamaBuilder", "MixtralBuilder", "Phi3Builder", "Qwen3Builder",
           "Qwen3MoeBuilder"]


@hookimpl
def register_architectures(register):
    register(LlamaBuilder)
    register(Qwen3Builder)
    register(Phi3Builder)
    register(Qwen3MoeBuilder)
    register(MixtralBuilder)
