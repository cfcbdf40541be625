"""LFM2: mirrors Hugging Face ``Lfm2ForCausalLM``.

A hybrid: most layers mix tokens with a short causal convolution instead of attention
(``layer_types`` "conv", or every layer not in ``full_attn_idxs``). A conv layer is
``in_proj → [B | C | x] → B·x → depthwise causal conv (conv_L_cache taps, no activation) →
C·y → out_proj``, and carries the last conv_L_cache - 1 values of B·x from call to call
(graph input ``past.{i}.conv`` [batch, hidden, K - 1], output ``present.{i}.conv``: onnxruntime-
genai's names). The attention layers are Llama's with a per-head RMSNorm on q and k
(``q_layernorm``, ``k_layernorm``) and ``out_proj``; the MLP is SwiGLU (``w1``, ``w3``, ``w2``)
whose width config.json gives before ``block_auto_adjust_ff_dim`` shrinks it; the final norm
is ``embedding_norm``. Padding positions are zeroed before a conv layer, as transformers does,
so a left-padded row's convolution starts from zeros.

cpu and cuda: the convolution is onnxruntime's com.microsoft CausalConvWithState; qnn's static
graphs: standard ops (``lowering.conv``). The data-aware int4 algorithms, which round attention
and MLP projections only, refuse the model.
"""

from __future__ import annotations

from typing import Any

from builder.config import DecoderConfig
from builder.errors import ConfigError
from builder.models.base import LLAMA_WEIGHT_NAMES, LayerState
from builder.models.llama import LlamaBuilder
from builder.roles import TensorRole as R

CONV_IN, CONV_OUT, CONV_KERNEL = "conv_in", "conv_out", "conv_kernel"


class Lfm2Config(DecoderConfig):
    other_layer_types = ("conv",)

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> DecoderConfig:
        """layer_types from ``full_attn_idxs`` where a config has no layer_types (every layer
        attention when it has neither, as transformers fills them), and the MLP's width as
        transformers derives it from intermediate_size."""
        # the released configs' names, which win in transformers as here
        if d.get("block_ff_dim") is not None:
            d = {**{k: v for k, v in d.items() if k != "block_ff_dim"},
                 "intermediate_size": d["block_ff_dim"]}
        if d.get("tie_embedding") is not None:
            d = {**{k: v for k, v in d.items() if k != "tie_embedding"},
                 "tie_word_embeddings": d["tie_embedding"]}
        layers = d.get("num_hidden_layers")
        idxs = d.get("full_attn_idxs")
        if idxs is not None and (not isinstance(idxs, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in idxs)):
            raise ConfigError(f"{source}: full_attn_idxs must be a list of layer indices, got "
                              f"{idxs!r}")
        if isinstance(layers, int):
            from_idxs = ["full_attention" if idxs is None or i in idxs else "conv"
                         for i in range(layers)]
            types = d.get("layer_types")
            if types is None:
                d = {**d, "layer_types": from_idxs}
            elif idxs is not None and isinstance(types, list) and types[:layers] != from_idxs:
                raise ConfigError(f"{source}: layer_types and full_attn_idxs disagree on which "
                                  "layers are attention")
        if d.get("intermediate_size") is not None:
            d = {**d, "intermediate_size": _mlp_width(d, source)}
        return super().from_hf(d, source)


def _mlp_width(d: dict[str, Any], source: str) -> int:
    """transformers' Lfm2MLP width: with block_auto_adjust_ff_dim, 2/3 of intermediate_size,
    times block_ffn_dim_multiplier rounded up to block_multiple_of where a multiplier is given."""
    width = d["intermediate_size"]
    auto = d.get("block_auto_adjust_ff_dim", True)
    if not isinstance(auto, bool):
        raise ConfigError(f"{source}: block_auto_adjust_ff_dim must be true or false, got "
                          f"{auto!r}")
    if not auto or not isinstance(width, int):
        return width
    width = int(2 * width / 3)
    multiplier = d.get("block_ffn_dim_multiplier", 1.0)
    if multiplier is not None:
        multiple = d.get("block_multiple_of", 256)
        if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
            raise ConfigError(f"{source}: block_multiple_of must be a positive integer, got "
                              f"{multiple!r}")
        if not isinstance(multiplier, (int, float)) or isinstance(multiplier, bool) \
                or multiplier <= 0:
            raise ConfigError(f"{source}: block_ffn_dim_multiplier must be a positive number, "
                              f"got {multiplier!r}")
        width = int(multiplier * width)
        width = multiple * ((width + multiple - 1) // multiple)
    return width


class Lfm2Builder(LlamaBuilder):
    architectures = ("Lfm2ForCausalLM",)
    config_class = Lfm2Config
    config_aliases = {"norm_eps": "rms_norm_eps"}
    # (and keys the released configs carry that transformers' LFM2 does not read: the
    # dimensions they repeat, their initializations, the norm eps it reads as norm_eps)
    config_keys = frozenset({"conv_bias", "conv_L_cache", "block_multiple_of",
                             "block_ffn_dim_multiplier", "block_auto_adjust_ff_dim",
                             "full_attn_idxs", "block_dim", "block_norm_eps",
                             "block_use_swiglu", "block_mlp_init_scale", "block_out_init_scale",
                             "block_use_xavier_init", "conv_dim", "conv_dim_out",
                             "conv_use_xavier_init", "num_heads", "use_pos_enc", "model_name"})
    # Lfm2Config's values for the keys a config.json may leave out
    config_defaults = {"tie_word_embeddings": True, "rope_theta": 1000000.0,
                       "rms_norm_eps": 1e-5, "max_position_embeddings": 128000,
                       "num_key_value_heads": 8}
    qk_norm = True
    weight_names = {
        **{r: n for r, n in LLAMA_WEIGHT_NAMES.items()
           if r not in (R.ATTN_NORM, R.MLP_NORM, R.O, R.Q_NORM, R.K_NORM, R.GATE, R.UP, R.DOWN,
                        R.FINAL_NORM, R.GATE_BIAS, R.UP_BIAS, R.DOWN_BIAS, R.O_BIAS)},
        R.ATTN_NORM: "model.layers.{i}.operator_norm.weight",
        R.MLP_NORM: "model.layers.{i}.ffn_norm.weight",
        R.O: "model.layers.{i}.self_attn.out_proj.weight",
        R.Q_NORM: "model.layers.{i}.self_attn.q_layernorm.weight",
        R.K_NORM: "model.layers.{i}.self_attn.k_layernorm.weight",
        R.GATE: "model.layers.{i}.feed_forward.w1.weight",
        R.UP: "model.layers.{i}.feed_forward.w3.weight",
        R.DOWN: "model.layers.{i}.feed_forward.w2.weight",
        R.FINAL_NORM: "model.embedding_norm.weight",
        CONV_IN: "model.layers.{i}.conv.in_proj.weight",
        CONV_OUT: "model.layers.{i}.conv.out_proj.weight",
        CONV_KERNEL: "model.layers.{i}.conv.conv.weight",
        CONV_IN + "_bias": "model.layers.{i}.conv.in_proj.bias",
        CONV_OUT + "_bias": "model.layers.{i}.conv.out_proj.bias",
        CONV_KERNEL + "_bias": "model.layers.{i}.conv.conv.bias",
    }
    linear_roles = frozenset({CONV_IN, CONV_OUT})
    static_layer_kinds = ("conv",)  # lowering.conv: standard ops on qnn
    kind_projections = {"conv": (CONV_IN, CONV_OUT)}  # (what gptq rounds in a conv layer)
    # a conv layer's window holds B x of the last tokens, nearly a function of their
    # embeddings as the MLP's values are of one: a token the calibration text lacked clipped
    # it (trained tiny LFM2, w8a16 on the HTP: min step cosine 0.99882, 0.99954 widened);
    # and the window's buffer (past.N.conv, present.N.conv) alike, so that a value the
    # present keeps is not clipped as the next call's past
    headroom_scopes = ("/mlp/", "/conv/", ".conv")

    @staticmethod
    def taps(c: DecoderConfig) -> int:
        """The convolution's kernel length (conv_L_cache)."""
        return c.integer("conv_L_cache", 3)

    @classmethod
    def role_shape(cls, c: DecoderConfig, role) -> tuple[int, ...]:
        h = c.hidden_size
        own = {CONV_IN: (3 * h, h), CONV_OUT: (h, h), CONV_KERNEL: (h, 1, cls.taps(c))}
        return own[role] if role in own else super().role_shape(c, role)

    @classmethod
    def genai_decoder(cls, c: DecoderConfig) -> dict:
        return {**super().genai_decoder(c), "conv_cache_size": cls.taps(c) - 1}

    @classmethod
    def layer_states(cls, c: DecoderConfig, layer: int) -> tuple[LayerState, ...]:
        if cls.layer_kind(c, layer) != "conv":
            return ()
        return (LayerState("conv", (c.hidden_size, cls.taps(c) - 1)),)

    def mixer(self, layer: int, x: str) -> str:
        if self.layer_kind(self.config, layer) != "conv":
            return super().mixer(layer, x)
        c, gb = self.config, self.gb
        biased = self.config.flag("conv_bias")

        def bias(role):
            role = role + "_bias"
            return (self.weight(role, layer), self.weight_name(role, layer)) if biased \
                else (None, None)

        with gb.scope("conv"):
            x = self.lowering.zero_padding(x)
            bcx = self.project("in_proj", x, CONV_IN, layer, self.weight(CONV_IN, layer),
                               self.weight_name(CONV_IN, layer), *bias(CONV_IN))
            h = c.hidden_size
            b, gate, v = gb.node("Split", [bcx, gb.constant([h, h, h])], outputs=3, axis=-1)
            y = self.lowering.conv("conv", layer, "conv", gb.node("Mul", [b, v]),
                                   self.weight(CONV_KERNEL, layer),
                                   self.weight_name(CONV_KERNEL, layer), *bias(CONV_KERNEL))
            y = gb.node("Mul", [gate, y], "Mul_1")
            return self.project("out_proj", y, CONV_OUT, layer, self.weight(CONV_OUT, layer),
                                self.weight_name(CONV_OUT, layer), *bias(CONV_OUT))
