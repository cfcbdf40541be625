"""SmolLM3: mirrors Hugging Face ``SmolLM3ForCausalLM``.

The Llama block, but some layers' attention has no rotary at all (NoPE): ``no_rope_layers``
has a 1 for each layer that rotates and a 0 for each that does not (by default every
``no_rope_layer_interval``-th layer, 4, is NoPE, as transformers fills it).
"""

from __future__ import annotations

from builder.config import RopeConfig
from builder.errors import ConfigError
from builder.models.llama import LlamaBuilder


class SmolLM3Builder(LlamaBuilder):
    architectures = ("SmolLM3ForCausalLM",)

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
