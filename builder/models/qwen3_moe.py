"""Qwen3-MoE: mirrors Hugging Face ``Qwen3MoeForCausalLM`` (Qwen3-30B-A3B, Qwen3-235B-A22B).

Qwen3's attention (per-head q/k norm); the MLP of a layer is sparse unless the layer is in
``mlp_only_layers`` or ``(layer + 1) % decoder_sparse_step != 0``: ``num_experts`` experts of
``moe_intermediate_size``, the top ``num_experts_per_tok`` per token, their softmax weights
renormalized when ``norm_topk_prob``. Dense layers are Qwen3's MLP of ``intermediate_size``.
"""

from __future__ import annotations

from builder.errors import ConfigError
from builder.models.base import LLAMA_WEIGHT_NAMES
from builder.models.moe import MoeBuilder, expert_weight_names


class Qwen3MoeBuilder(MoeBuilder):
    architectures = ("Qwen3MoeForCausalLM",)
    config_keys = frozenset({"decoder_sparse_step", "mlp_only_layers", "norm_topk_prob",
                             "max_window_layers"})
    qk_norm = True
    genai_model_type = "qwen3"  # onnxruntime-genai knows no qwen3_moe; the experts are in the graph
    weight_names = {**LLAMA_WEIGHT_NAMES,
                    **expert_weight_names("mlp", "gate_proj", "up_proj", "down_proj")}

    def check_supported(self) -> None:
        x = self.config.extra
        self.config.integer("decoder_sparse_step", 1)
        dense = x.get("mlp_only_layers", [])
        if not isinstance(dense, list) or not all(isinstance(i, int) for i in dense):
            raise ConfigError(f"config.json: mlp_only_layers must be a list of layer indices, "
                              f"got {dense!r}")
        if not isinstance(x.get("norm_topk_prob", False), bool):
            raise ConfigError(f"config.json: norm_topk_prob must be true or false, got "
                              f"{x['norm_topk_prob']!r}")
        super().check_supported()

    def normalize_top_k(self) -> bool:
        return self.config.extra.get("norm_topk_prob", False)

    def sparse(self, layer: int) -> bool:
        x = self.config.extra
        return (layer not in x.get("mlp_only_layers", [])
                and (layer + 1) % x.get("decoder_sparse_step", 1) == 0)
