"""OLMo 3: mirrors Hugging Face ``Olmo3ForCausalLM``.

OLMo 2's block (norms after attention and the MLP, q and k normed over the whole projection)
with three sliding-window layers of every four (``layer_types``; without them, every 4th layer
global, as transformers fills them) and rotary parameters per layer type.
"""

from __future__ import annotations

from builder.models.gemma import Gemma2Config
from builder.models.olmo2 import Olmo2Builder


class Olmo3Config(Gemma2Config):
    pattern = 4  # without layer_types: every 4th layer global


class Olmo3Builder(Olmo2Builder):
    architectures = ("Olmo3ForCausalLM",)
    config_class = Olmo3Config
    config_defaults = {**Olmo2Builder.config_defaults, "sliding_window": 4096}
