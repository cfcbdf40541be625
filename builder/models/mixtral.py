"""Mixtral: mirrors Hugging Face ``MixtralForCausalLM`` (Mixtral-8x7B, 8x22B).

The Mistral block whose every MLP is ``num_local_experts`` experts of ``intermediate_size``
(``w1`` gate, ``w3`` up, ``w2`` down), the top ``num_experts_per_tok`` per token, their softmax
weights always renormalized over the k.
"""

from __future__ import annotations

from builder.models.base import LLAMA_WEIGHT_NAMES
from builder.models.moe import MoeBuilder, expert_weight_names
from builder.roles import TensorRole as R


class MixtralBuilder(MoeBuilder):
    architectures = ("MixtralForCausalLM",)
    experts_fields = ("num_local_experts",)
    config_keys = frozenset({"router_jitter_noise"})  # (Mixtral's: noise while training only)
    expert_size_field = None
    genai_model_type = "mistral"  # onnxruntime-genai knows no mixtral; the experts are in the graph
    weight_names = {
        **{r: n for r, n in LLAMA_WEIGHT_NAMES.items() if r not in (R.GATE, R.UP, R.DOWN)},
        **expert_weight_names("block_sparse_moe", "w1", "w3", "w2"),
    }
