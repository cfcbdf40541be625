"""The built-in architectures, registered through the ``register_architectures`` hook like any
third-party plugin (entry point ``models`` in pyproject.toml)."""

from __future__ import annotations

from builder.hookspecs import hookimpl
from builder.models.arcee import ArceeBuilder
from builder.models.base import DecoderBuilder
from builder.models.cohere import Cohere2Builder, CohereBuilder
from builder.models.ernie4_5 import Ernie4_5Builder
from builder.models.exaone4 import Exaone4Builder
from builder.models.gemma import Gemma2Builder, Gemma3Builder
from builder.models.glm import Glm4Builder, GlmBuilder
from builder.models.gpt_neox import GPTNeoXBuilder
from builder.models.gpt_oss import GptOssBuilder
from builder.models.granite import GraniteBuilder
from builder.models.granitemoe import GraniteMoeBuilder
from builder.models.granitemoehybrid import GraniteMoeHybridBuilder
from builder.models.helium import HeliumBuilder
from builder.models.hunyuan import HunYuanDenseV1Builder
from builder.models.lfm2 import Lfm2Builder
from builder.models.llama import LlamaBuilder
from builder.models.mixtral import MixtralBuilder
from builder.models.nemotron import NemotronBuilder
from builder.models.olmo2 import Olmo2Builder
from builder.models.olmo3 import Olmo3Builder
from builder.models.olmoe import OlmoeBuilder
from builder.models.phi import PhiBuilder
from builder.models.phi3 import Phi3Builder
from builder.models.qwen2 import Qwen2Builder
from builder.models.qwen3 import Qwen3Builder
from builder.models.qwen3_5 import Qwen3_5Builder, Qwen3_5VisionLanguageBuilder
from builder.models.qwen3_5_moe import Qwen3_5MoeBuilder, Qwen3_5MoeVisionLanguageBuilder
from builder.models.qwen3_moe import Qwen3MoeBuilder
from builder.models.smollm3 import SmolLM3Builder
from builder.models.stablelm import StableLmBuilder
from builder.models.starcoder2 import Starcoder2Builder

__all__ = ["ArceeBuilder", "Cohere2Builder", "CohereBuilder", "DecoderBuilder", "Ernie4_5Builder",
           "Exaone4Builder", "GPTNeoXBuilder", "Gemma2Builder", "Gemma3Builder", "Glm4Builder",
           "GlmBuilder", "GptOssBuilder", "GraniteBuilder", "GraniteMoeBuilder",
           "GraniteMoeHybridBuilder", "HeliumBuilder", "HunYuanDenseV1Builder", "Lfm2Builder",
           "LlamaBuilder", "MixtralBuilder", "NemotronBuilder", "Olmo2Builder", "Olmo3Builder",
           "OlmoeBuilder", "Phi3Builder", "PhiBuilder", "Qwen2Builder", "Qwen3Builder",
           "Qwen3MoeBuilder", "Qwen3_5Builder", "Qwen3_5MoeBuilder",
           "Qwen3_5MoeVisionLanguageBuilder", "Qwen3_5VisionLanguageBuilder", "SmolLM3Builder",
           "StableLmBuilder", "Starcoder2Builder"]


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
    for family in (PhiBuilder, Starcoder2Builder, GPTNeoXBuilder, StableLmBuilder, CohereBuilder,
                   Cohere2Builder, GlmBuilder, Glm4Builder, Olmo3Builder, Exaone4Builder,
                   Ernie4_5Builder, NemotronBuilder, HunYuanDenseV1Builder, OlmoeBuilder,
                   ArceeBuilder, HeliumBuilder, GraniteMoeBuilder, Lfm2Builder, Qwen3_5Builder,
                   Qwen3_5VisionLanguageBuilder, GptOssBuilder, Qwen3_5MoeBuilder,
                   Qwen3_5MoeVisionLanguageBuilder, GraniteMoeHybridBuilder):
        register(family)
