"""The built-in architectures, registered through the ``register_architectures`` hook like any
third-party plugin (entry point ``models`` in pyproject.toml)."""

from __future__ import annotations

from builder.hookspecs import hookimpl
from builder.models.base import DecoderBuilder
from builder.models.gemma import Gemma2Builder, Gemma3Builder
from builder.models.granite import GraniteBuilder
from builder.models.llama import LlamaBuilder
from builder.models.mixtral import MixtralBuilder
from builder.models.olmo2 import Olmo2Builder
from builder.models.phi3 import Phi3Builder
from builder.models.qwen2 import Qwen2Builder
from builder.models.qwen3 import Qwen3Builder
from builder.models.qwen3_moe import Qwen3MoeBuilder
from builder.models.smollm3 import SmolLM3Builder

__all__ = ["DecoderBuilder", "Gemma2Builder", "Gemma3Builder", "GraniteBuilder", "LlamaBuilder",
           "MixtralBuilder", "Olmo2Builder", "Phi3Builder", "Qwen2Builder", "Qwen3Builder",
           "Qwen3MoeBuilder", "SmolLM3Builder"]


@hookimpl
def register_architectures(register):
    register(LlamaBuilder)
    register(Qwen3Builder)
    register(Phi3Builder)
    register(Qwen3MoeBuilder)
    register(MixtralBuilder)
    register(Qwen2Builder)
    register(Gemma2Builder)
    register(Gemma3Builder)
    register(SmolLM3Builder)
    register(GraniteBuilder)
    register(Olmo2Builder)
