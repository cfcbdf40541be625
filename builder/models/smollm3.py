"""SmolLM3: mirrors Hugging Face ``SmolLM3ForCausalLM``.

The Llama block, but some layers' attention has no rotary at all (NoPE): ``no_rope_layers``
has a 1 for each layer that rotates and a 0 for each that does not (by default every
``no_rope_layer_interval``-th layer, 4, is NoPE, as transformers fills it). Without
``layer_types``, only the NoPE layers take the sliding window (when ``use_sliding_window``).
"""

from __future__ import annotations

from builder.config import RopeConfig
from builder.errors import ConfigError
from builder.models.llama import LlamaBuilder


class SmolLM3Builder(LlamaBuilder):
    architectures = ("SmolLM3ForCausalLM",)
    # (max_window_layers: in its hub configs, read by nothing in transformers' SmolLM3)
    config_keys = frozenset({"no_rope_layers", "no_rope_layer_interval", "max_window_layers"})
    config_defaults = {"tie_word_embeddings": True, "use_sliding_window": False,
                       "max_position_embeddings": 32768}

    def rope(self, layer: int) -> RopeConfig | None:
        c = self.config
        flags = c.extra.get("no_rope_layers")
        if flags is None:
            interval = int(c.number("no_rope_layer_interval", 4))
            flags = [int((i + 1) % interval != 0) for i in range(c.num_hidden_layers)]
        if (not isinstance(flags, list) or len(flags) < c.num_hidden_layers
                or any(f not in (0, 1) or isinstance(f, bool) for f in flags)):
            raise ConfigError(f"config.json: no_rope_layers must list 0 or 1 for each of the "
                              f"{c.num_hidden_layers} layers, got {flags!r:.80}")
        return super().rope(layer) if flags[layer] else None

    def sliding_window(self, layer: int) -> int | None:
        if self.config.layer_types is None and self.rope(layer) is not None:
            return None  # as transformers fills layer_types: only NoPE layers slide
        return super().sliding_window(layer)
