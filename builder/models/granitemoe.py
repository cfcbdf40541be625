"""Granite MoE (Granite 3.x MoE): mirrors Hugging Face ``GraniteMoeForCausalLM``.

Granite's four multipliers (``builder.models.granite``) on the mixture-of-experts template
(``builder.models.moe``): ``num_local_experts`` SwiGLU experts of ``intermediate_size`` in
every layer, the top ``num_experts_per_tok`` router logits softmaxed (the renormalized top k).
The checkpoint stores each layer's experts stacked: ``input_linear`` [experts, 2 x
intermediate, hidden] (gate's rows, then up's) and ``output_linear`` [experts, hidden,
intermediate], read an expert at a time. cpu and cuda; onnxruntime-genai runs the graph as a
Granite one.
"""

from __future__ import annotations

import numpy as np

from builder.config import DecoderConfig
from builder.models.base import LLAMA_WEIGHT_NAMES
from builder.models.granite import GraniteBuilder
from builder.models.moe import MoeBuilder
from builder.roles import TensorRole as R

BLOCK = "model.layers.{i}.block_sparse_moe."
GATE_UP, DOWN = "experts_gate_up", "experts_down"  # the stacked experts' own roles
STACKS = {R.EXPERT_GATE: GATE_UP, R.EXPERT_UP: GATE_UP, R.EXPERT_DOWN: DOWN}


class GraniteMoeBuilder(MoeBuilder, GraniteBuilder):
    architectures = ("GraniteMoeForCausalLM",)
    genai_model_type = "granite"
    config_defaults = {"rms_norm_eps": 1e-6}
    experts_fields = ("num_local_experts",)
    expert_size_field = None  # the experts are intermediate_size wide
    weight_names = {**{r: n for r, n in LLAMA_WEIGHT_NAMES.items()
                       if r not in (R.GATE, R.UP, R.DOWN, R.GATE_BIAS, R.UP_BIAS, R.DOWN_BIAS)},
                    R.ROUTER: BLOCK + "router.layer.weight",
                    GATE_UP: BLOCK + "input_linear.weight", DOWN: BLOCK + "output_linear.weight"}

    @classmethod
    def role_shape(cls, c: DecoderConfig, role):
        experts, h, i = cls.num_experts(c), c.hidden_size, c.intermediate_size
        if role == GATE_UP:
            return (experts, 2 * i, h)
        return (experts, h, i) if role == DOWN else super().role_shape(c, role)

    def weight_name(self, role, layer=None, expert=None) -> str:
        """An expert's projection is named by the stack that holds it."""
        return super().weight_name(STACKS.get(role, role), layer, expert)

    def expert_weight(self, layer: int, expert: int, fused: bool) -> np.ndarray:
        return self.stacked_expert_weight(layer, expert, fused, GATE_UP, DOWN)
