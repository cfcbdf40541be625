"""Qwen3.5-MoE (text): mirrors Hugging Face ``Qwen3_5MoeForCausalLM`` (and the text model of
``Qwen3_5MoeForConditionalGeneration``).

Qwen3.5's layers (``builder.models.qwen3_5``: Gated DeltaNet and gated attention) whose every
MLP is sparse: ``num_experts`` SwiGLU experts of ``moe_intermediate_size``, the top
``num_experts_per_tok`` softmax weights renormalized, plus a shared expert
(``shared_expert_intermediate_size``) that every token runs, scaled by sigmoid of its own gate
(``shared_expert_gate``, one output). The released checkpoints store each layer's experts
stacked (``experts.gate_up_proj`` [experts, 2 x moe_intermediate, hidden]: gate's rows, then
up's; ``experts.down_proj``), read an expert at a time; transformers saves them one tensor per
expert projection (``experts.{e}.gate_proj`` ...), which is read too. cpu and cuda.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from builder.config import DecoderConfig
from builder.models.base import DecoderBuilder
from builder.models.moe import MoeBuilder, expert_weight_names
from builder.models.qwen3_5 import (
    Qwen3_5Builder,
    Qwen3_5Config,
    Qwen3_5VisionLanguageBuilder,
    language_model,
)
from builder.roles import TensorRole as R

MLP = "model.layers.{i}.mlp."
SHARED_GATE = "shared_expert_gate"
GATE_UP, DOWN = "experts_gate_up", "experts_down"  # the stacked layout's own roles


class Qwen3_5MoeConfig(Qwen3_5Config):
    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> DecoderConfig:
        """intermediate_size, which the config does not have, is the shared expert's."""
        text = d.get("text_config") if isinstance(d.get("text_config"), dict) else d
        if text.get("intermediate_size") is None and \
                text.get("shared_expert_intermediate_size") is not None:
            filled = {**text, "intermediate_size": text["shared_expert_intermediate_size"]}
            d = {**d, "text_config": filled} if text is not d else filled
        return super().from_hf(d, source)


class Qwen3_5MoeBuilder(MoeBuilder, Qwen3_5Builder):
    architectures = ("Qwen3_5MoeForCausalLM",)
    config_class = Qwen3_5MoeConfig
    config_keys = frozenset({"shared_expert_intermediate_size"})
    genai_model_type = "qwen3_5_moe_text"
    weight_names = {**{r: n for r, n in Qwen3_5Builder.weight_names.items()
                       if r not in (R.GATE, R.UP, R.DOWN)},
                    R.GATE: MLP + "shared_expert.gate_proj.weight",
                    R.UP: MLP + "shared_expert.up_proj.weight",
                    R.DOWN: MLP + "shared_expert.down_proj.weight",
                    SHARED_GATE: MLP + "shared_expert_gate.weight",
                    **expert_weight_names("mlp", "gate_proj", "up_proj", "down_proj"),
                    GATE_UP: MLP + "experts.gate_up_proj", DOWN: MLP + "experts.down_proj"}
    float_roles = frozenset({*Qwen3_5Builder.float_roles, SHARED_GATE})

    @classmethod
    def role_shape(cls, c: DecoderConfig, role):
        experts, h, i = cls.num_experts(c), c.hidden_size, cls.expert_size(c)
        own = {SHARED_GATE: (1, h), GATE_UP: (experts, 2 * i, h), DOWN: (experts, h, i)}
        return own[role] if role in own else super().role_shape(c, role)

    def stacked(self, layer: int) -> bool:
        """Whether the checkpoint stores ``layer``'s experts stacked (the released layout)."""
        return self.weight_name(GATE_UP, layer) in self.weights

    def expert_weight(self, layer: int, expert: int, fused: bool) -> np.ndarray:
        if not self.stacked(layer):
            return super().expert_weight(layer, expert, fused)
        return self.stacked_expert_weight(layer, expert, fused, GATE_UP, DOWN)

    def expert_dtype(self, layer: int, fused: bool) -> str:
        if not self.stacked(layer):
            return super().expert_dtype(layer, fused)
        return self.weights.dtype(self.weight_name(GATE_UP if fused else DOWN, layer))

    def mlp(self, layer: int, x: str) -> str:
        """The routed experts, plus the shared expert times sigmoid of its gate."""
        gb = self.gb
        routed = super().mlp(layer, x)
        with gb.scope("shared_expert"):
            shared = DecoderBuilder.mlp(self, layer, x)
            gate = self.project("gate", x, SHARED_GATE, layer, self.weight(SHARED_GATE, layer),
                                self.weight_name(SHARED_GATE, layer))
            scaled = gb.node("Mul", [shared, gb.node("Sigmoid", [gate])])
        return gb.node("Add", [routed, scaled], "mlp/shared_expert/Add")


class Qwen3_5MoeVisionLanguageBuilder(Qwen3_5MoeBuilder):
    """The text model of ``Qwen3_5MoeForConditionalGeneration`` (see
    ``Qwen3_5VisionLanguageBuilder``)."""

    architectures = ("Qwen3_5MoeForConditionalGeneration",)
    weight_names = language_model(Qwen3_5MoeBuilder.weight_names)
    ignored_weights = Qwen3_5VisionLanguageBuilder.ignored_weights
