"""Granite 4.0-H: mirrors Hugging Face ``GraniteMoeHybridForCausalLM``.

A hybrid of Mamba2 layers (``layer_types`` "mamba" / "linear_attention") and attention layers
("attention" / "full_attention"; rotary only where ``position_embedding_type`` is "rope"),
with Granite's multipliers (``builder.models.granite``). Each layer's MLP is a shared SwiGLU
(``shared_mlp.input_linear``: gate's rows then up's, ``output_linear``) plus, where
``num_local_experts`` > 0, Granite-MoE's experts (``builder.models.granitemoe``).

The Mamba2 layer: ``in_proj`` → [z | x B C | dt]; x B C through a depthwise causal conv
(``mamba_d_conv`` taps, bias, SiLU; padding positions zeroed before and after it, as
transformers does); dt = softplus(dt + dt_bias) (a ``time_step_limit`` that binds is
refused: transformers applies it to a prompt's scan and not to decode steps); the
selective scan h_t = exp(dt A) h_{t-1} + B_t (dt x_t)ᵀ, y_t = C_tᵀ h_t, per head of
``mamba_d_head`` values with a state of ``mamba_d_state`` per group of heads
(``mamba_n_groups``): onnxruntime's LinearAttention with ``update_rule="gated"`` (q = C, k = B,
v = dt x, decay dt A, value head h reading group h // (heads / groups)); + D x; then
RMSNorm(y · silu(z)) per group, times its weight, and ``out_proj``. States: ``past.{i}.conv``
[batch, conv channels, taps - 1] and ``past.{i}.recurrent`` [batch, heads, d_state, d_head].

At -p int4 in_proj's z, x, B and C rows are quantized; its dt rows (a row per head, the decay)
stay float. cpu and cuda; qnn's static graphs without experts (``lowering.conv`` and
``lowering.recurrence`` from standard ops; routed experts are refused there).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from builder.config import DecoderConfig
from builder.errors import ConfigError
from builder.models.base import DecoderBuilder, LayerState
from builder.models.granitemoe import GraniteMoeBuilder
from builder.models.moe import MoeBuilder
from builder.ops.norms import float32_constant, from_float32, to_float32
from builder.ops.recurrence import time_step_decay
from builder.roles import TensorRole as R

MAMBA = "linear_attention"
KINDS = {"mamba": MAMBA, "attention": "full_attention"}  # older configs' names
IN, DT, OUT, CONV, A_LOG, D, DT_BIAS, NORM = (
    "mamba_in", "mamba_dt", "mamba_out", "mamba_conv", "mamba_A_log", "mamba_D",
    "mamba_dt_bias", "mamba_norm")
SIZES = ("mamba_n_heads", "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_expand")
# GraniteMoeHybridConfig's values for what a config.json may leave out
DEFAULTS = {"mamba_n_heads": 128, "mamba_n_groups": 1, "mamba_d_state": 256,
            "mamba_d_conv": 4, "mamba_expand": 2}
LAYER = "model.layers.{i}."


class GraniteMoeHybridConfig(DecoderConfig):
    other_layer_types = (MAMBA,)

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> DecoderConfig:
        """layer_types by transformers' names ("mamba" is "linear_attention", "attention"
        "full_attention"; the older key ``layers_block_type``); every layer Mamba without
        them, as transformers fills them."""
        types = d.get("layer_types", d.get("layers_block_type"))
        if types is None and isinstance(d.get("num_hidden_layers"), int):
            types = [MAMBA] * d["num_hidden_layers"]
        if isinstance(types, list):
            types = [KINDS.get(t, t) if isinstance(t, str) else t for t in types]
        d = {k: v for k, v in d.items() if k != "layers_block_type"}
        return super().from_hf({**d, "layer_types": types}, source)


class GraniteMoeHybridBuilder(GraniteMoeBuilder):
    architectures = ("GraniteMoeHybridForCausalLM",)
    config_class = GraniteMoeHybridConfig
    genai_model_type = None
    config_keys = frozenset({*SIZES, "mamba_d_head", "mamba_conv_bias", "mamba_proj_bias",
                             "mamba_chunk_size", "time_step_limit", "position_embedding_type",
                             "shared_intermediate_size"})
    weight_names = {**GraniteMoeBuilder.weight_names,
                    R.GATE_UP: LAYER + "shared_mlp.input_linear.weight",
                    R.DOWN: LAYER + "shared_mlp.output_linear.weight",
                    IN: LAYER + "mamba.in_proj.weight", OUT: LAYER + "mamba.out_proj.weight",
                    CONV: LAYER + "mamba.conv1d.weight",
                    CONV + "_bias": LAYER + "mamba.conv1d.bias",
                    IN + "_bias": LAYER + "mamba.in_proj.bias",
                    OUT + "_bias": LAYER + "mamba.out_proj.bias",
                    A_LOG: LAYER + "mamba.A_log", D: LAYER + "mamba.D",
                    DT_BIAS: LAYER + "mamba.dt_bias", NORM: LAYER + "mamba.norm.weight"}
    linear_roles = frozenset({IN, OUT})
    static_layer_kinds = ("linear_attention",)  # lowering.conv and .recurrence
    kind_projections = {"linear_attention": (IN, OUT)}  # (in_proj without its dt rows)
    # the gated norm's values: where y silu(z) is small its mean square falls under the
    # epsilon, and its normed values follow the token's scale; one token the calibration text
    # lacked clipped them (trained tiny Granite 4.0-H, w8a16 on the HTP: min step cosine
    # 0.99472, 0.99984 widened)
    headroom_scopes = ("/mlp/", "/mamba/norm/")
    float_roles = frozenset({DT})

    @staticmethod
    def sizes(c: DecoderConfig) -> dict[str, int]:
        s = {k.removeprefix("mamba_"): c.extra.get(k) or DEFAULTS[k] for k in SIZES}
        for key, value in s.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config.json: mamba_{key} must be a positive integer, got "
                                  f"{value!r}")
        s["inner"] = s["expand"] * c.hidden_size
        head = c.extra.get("mamba_d_head", "auto")
        s["d_head"] = s["inner"] // s["n_heads"] if head in ("auto", None) else head
        if not isinstance(s["d_head"], int) or isinstance(s["d_head"], bool):
            raise ConfigError(f"config.json: mamba_d_head must be \"auto\" or an integer, got "
                              f"{head!r}")
        if s["d_head"] * s["n_heads"] != s["inner"] or s["n_heads"] % s["n_groups"]:
            raise ConfigError(f"config.json: mamba_n_heads={s['n_heads']} of mamba_d_head="
                              f"{s['d_head']} must make mamba_expand * hidden_size = "
                              f"{s['inner']}, in groups of mamba_n_groups={s['n_groups']}")
        s["conv_dim"] = s["inner"] + 2 * s["n_groups"] * s["d_state"]
        return s

    @classmethod
    def shared_size(cls, c: DecoderConfig) -> int:
        return c.extra.get("shared_intermediate_size") or 1024

    @classmethod
    def num_experts(cls, c: DecoderConfig) -> int:
        return c.extra.get("num_local_experts", 8) or 0

    @classmethod
    def role_shape(cls, c: DecoderConfig, role):
        h, i = c.hidden_size, cls.shared_size(c)
        if role in (IN, DT, OUT, CONV, A_LOG, D, DT_BIAS, NORM):
            s = cls.sizes(c)
            return {IN: (s["inner"] + s["conv_dim"] + s["n_heads"], h), OUT: (h, s["inner"]),
                    CONV: (s["conv_dim"], 1, s["d_conv"]), A_LOG: (s["n_heads"],),
                    D: (s["n_heads"],), DT_BIAS: (s["n_heads"],), NORM: (s["inner"],),
                    DT: (s["n_heads"], h)}[role]
        shared = {R.GATE: (i, h), R.UP: (i, h), R.GATE_UP: (2 * i, h), R.DOWN: (h, i)}
        return shared[role] if role in shared else super().role_shape(c, role)

    @classmethod
    def layer_states(cls, c: DecoderConfig, layer: int) -> tuple[LayerState, ...]:
        if cls.layer_kind(c, layer) != MAMBA:
            return ()
        s = cls.sizes(c)
        return (LayerState("conv", (s["conv_dim"], s["d_conv"] - 1)),
                LayerState("recurrent", (s["n_heads"], s["d_state"], s["d_head"])))

    def check_supported(self) -> None:
        c = self.config
        if self.num_experts(c):
            super().check_supported()
        else:  # (no experts: the shared MLP alone, Granite 4.0-H-Micro)
            DecoderBuilder.check_supported(self)
        self.sizes(c)
        if c.hidden_act not in ("silu", "swish"):
            raise ConfigError(f"config.json: hidden_act {c.hidden_act!r}: the Mamba layers' "
                              "convolution (CausalConvWithState) takes silu or none")
        kind = c.extra.get("position_embedding_type")
        if kind not in (None, "rope", "nope"):
            raise ConfigError(f"config.json: position_embedding_type {kind!r}: \"rope\" or none")
        self.dt_limits()

    def dt_limits(self) -> None:
        """time_step_limit must be (0, inf), which clamps nothing: transformers (as the Mamba2
        kernels) clamps the time step in a prompt's scan but not in a decode step's update, so
        a binding limit is no one model, and it is refused, naming the field."""
        limit = self.config.extra.get("time_step_limit")
        if limit is None:
            return None
        values = [float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else v
                  for v in limit] if isinstance(limit, list) else None
        if not values or len(values) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"config.json: time_step_limit must be [low, high], got {limit!r}")
        low, high = values
        if low > 0 or not math.isinf(high):
            raise ConfigError(f"config.json: time_step_limit={limit!r} binds, and transformers "
                              "clamps the time step in a prompt but not in a decode step (the "
                              "Mamba2 kernels alike): no one model to build; only [0.0, "
                              "Infinity] is supported")

    def rope(self, layer: int):
        if self.config.extra.get("position_embedding_type") != "rope":
            return None
        return super().rope(layer)

    def sparse(self, layer: int) -> bool:
        return self.num_experts(self.config) > 0

    def mlp_weights(self, layer: int):
        gate, up = np.split(self.weight(R.GATE_UP, layer), 2)
        return gate, up, self.weight(R.DOWN, layer)

    def mlp(self, layer: int, x: str) -> str:
        """The shared MLP, plus the routed experts where the model has them."""
        gb = self.gb
        with gb.scope("shared_mlp"):
            shared = DecoderBuilder.mlp(self, layer, x)
        if not self.sparse(layer):
            return shared
        return gb.node("Add", [MoeBuilder.mlp(self, layer, x), shared], "mlp/shared/Add")

    # -- Mamba2 --------------------------------------------------------------------------
    def projection_weight(self, role, layer: int) -> np.ndarray:
        """in_proj as its projection reads it: without the dt rows (their own, float)."""
        w = super().projection_weight(role, layer)
        if role != IN:
            return w
        s = self.sizes(self.config)
        return w[:s["inner"] + s["conv_dim"]]

    def mixer(self, layer: int, x: str) -> str:
        c = self.config
        if self.layer_kind(c, layer) != MAMBA:
            return super().mixer(layer, x)
        gb, s = self.gb, self.sizes(c)
        biased = c.flag("mamba_proj_bias")
        heads, groups, state, head = s["n_heads"], s["n_groups"], s["d_state"], s["d_head"]
        with gb.scope("mamba"):
            x = self.lowering.zero_padding(x)
            w = self.weight(IN, layer)
            bias = self.weight(IN + "_bias", layer) if biased else None
            rows = s["inner"] + s["conv_dim"]
            name = self.weight_name(IN, layer)
            zxbc = self.project("in_proj", x, IN, layer, w[:rows], name,
                                None if bias is None else bias[:rows], name + ".bias")
            dt = self.project("dt_proj", x, DT, layer, w[rows:], name + ".dt",
                              None if bias is None else bias[rows:], name + ".dt_bias")
            z, xbc = gb.node("Split", [zxbc, gb.constant([s["inner"], s["conv_dim"]])],
                             outputs=2, axis=-1)
            biased_conv = c.flag("mamba_conv_bias", True)
            xbc = self.lowering.conv(
                "conv1d", layer, "conv", xbc, self.weight(CONV, layer),
                self.weight_name(CONV, layer),
                self.weight(CONV + "_bias", layer) if biased_conv else None,
                self.weight_name(CONV + "_bias", layer) if biased_conv else None, "silu")
            xbc = self.lowering.zero_padding(xbc)
            xs, b, cc = gb.node("Split", [xbc, gb.constant(
                [s["inner"], groups * state, groups * state])], outputs=3, axis=-1)
            dt, decay = self.time_step(layer, dt)
            per_head = gb.node("Reshape", [xs, gb.constant([0, 0, heads, head])])
            v = gb.node("Reshape", [gb.node("Mul", [per_head, gb.node(
                "Unsqueeze", [dt, gb.constant([-1])])]), gb.constant([0, 0, -1])], "Reshape_v")
            y = self.lowering.recurrence("LinearAttention", layer, "recurrent", cc, b, v,
                                         decay, None, q_heads=groups, v_heads=heads,
                                         update_rule="gated", scale=1.0)
            skip = gb.initializer(self.weight_name(D, layer) + ".per_value", np.repeat(
                np.asarray(self.weight(D, layer), np.float32), head))
            y = gb.node("Add", [y, gb.node("Mul", [xs, skip])], "skip/Add")
            y = self.gated_norm(layer, y, z, s["inner"] // groups)
            return self.project("out_proj", y, OUT, layer, self.weight(OUT, layer),
                                self.weight_name(OUT, layer),
                                self.weight(OUT + "_bias", layer) if biased else None,
                                self.weight_name(OUT + "_bias", layer) if biased else None)

    def time_step(self, layer: int, dt: str) -> tuple[str, str]:
        """(dt = softplus(dt + dt_bias); the decay dt A, A = -exp(A_log)), each
        [B, S, heads]."""
        gb = self.gb
        with gb.scope("time_step"):
            return time_step_decay(gb, dt, self.weight(DT_BIAS, layer),
                                   self.weight_name(DT_BIAS, layer), self.weight(A_LOG, layer),
                                   self.weight_name(A_LOG, layer))

    def gated_norm(self, layer: int, y: str, z: str, group: int) -> str:
        """RMSNorm of y · silu(z) over each group of ``group`` channels, times the weight."""
        gb, eps = self.gb, self.config.rms_norm_eps
        with gb.scope("norm"):  # (in float32, as transformers)
            y, z = to_float32(gb, y), to_float32(gb, z)
            t = gb.node("Mul", [y, gb.node("Mul", [z, gb.node("Sigmoid", [z])])])
            groups = gb.node("Reshape", [t, gb.constant([0, 0, -1, group])])
            mean = gb.node("ReduceMean", [gb.node("Mul", [groups, groups]), gb.constant([-1])],
                           keepdims=1)
            normed = gb.node("Div", [groups, gb.node("Sqrt", [gb.node("Add", [
                mean, float32_constant(gb, eps)])])])
            flat = from_float32(gb, gb.node("Reshape", [normed, gb.constant([0, 0, -1])],
                                            "Reshape_1"))
            return gb.node("Mul", [flat, gb.initializer(self.weight_name(NORM, layer),
                                                         self.weight(NORM, layer))], "Mul_w")
