"""Qwen3.5 (text): mirrors Hugging Face ``Qwen3_5ForCausalLM``.

A hybrid: three layers of four (``layer_types`` "linear_attention", or every layer but each
``full_attention_interval``-th) are Gated DeltaNet linear attention, the others gated full
attention.

- Every RMSNorm scales by (1 + w) (``norm_offset``), the per-head q/k norms included; the
  DeltaNet's own output norm scales by w.
- Full attention: q_proj gives each head's query and a gate side by side ([q | gate] per head);
  the heads' output is multiplied by sigmoid(gate) before o_proj. Rotary on a quarter of each
  head (``partial_rotary_factor``; the multimodal rotary's three position streams are one for
  text).
- Gated DeltaNet: ``in_proj_qkv`` → a depthwise causal conv (``linear_conv_kernel_dim`` taps,
  SiLU) over [q | k | v] → q and k L2-normed per head (eps 1e-6), q scaled by dk^-0.5 → the
  gated delta rule over a state [value heads, dk, dv] per sequence, each value head reading
  query/key head h // (value heads / key heads), with decay g = -exp(A_log) softplus(a +
  dt_bias) and rate beta = sigmoid(b) (``in_proj_a``, ``in_proj_b``) → an RMSNorm per value head
  times SiLU(z) (``in_proj_z``) → ``out_proj``. States: ``past.{i}.conv`` [batch, 2 key dims +
  value dims, taps - 1] and ``past.{i}.recurrent`` [batch, value heads, dk, dv]
  (onnxruntime-genai's names).

cpu and cuda: onnxruntime's com.microsoft CausalConvWithState and LinearAttention
(update_rule gated_delta). At -p int4, in_proj_qkv, in_proj_z and out_proj are quantized like
every projection; in_proj_a and in_proj_b (a row per value head) stay float, as the decay they
drive compounds over the sequence. qnn's static graphs: the convolution and the recurrence from
standard ops (``lowering.conv``, ``lowering.recurrence``, the recurrence token by token).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from builder.config import DecoderConfig
from builder.errors import ConfigError
from builder.models.base import LayerState
from builder.models.qwen3 import Qwen3Builder
from builder.ops.norms import norm
from builder.ops.recurrence import time_step_decay
from builder.roles import TensorRole as R

LINEAR = "linear_attention"
GATE = "attn_gate"  # the query gate's rows of q_proj
QKV, Z, A, B = "linear_qkv", "linear_z", "linear_a", "linear_b"
CONV, A_LOG, DT_BIAS, NORM, OUT = ("linear_conv", "linear_A_log", "linear_dt_bias",
                                   "linear_norm", "linear_out")
# a multimodal checkpoint's keys for the vision tower, whose weights the text model leaves
VISION_KEYS = ("text_config", "vision_config", "image_token_id", "video_token_id",
               "vision_start_token_id", "vision_end_token_id")
SIZES = ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
         "linear_num_key_heads", "linear_num_value_heads")


class Qwen3_5Config(DecoderConfig):
    other_layer_types = (LINEAR,)

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> DecoderConfig:
        """The text model's config (a multimodal checkpoint's ``text_config``, with its
        top-level architecture and tie_word_embeddings; the vision keys describe weights the
        text model does not use); layer_types from ``full_attention_interval`` (default 4)
        where a config has none, as transformers fills them."""
        if isinstance(d.get("text_config"), dict):
            text = d["text_config"]
            outer = {k: v for k, v in d.items() if k not in (*VISION_KEYS, "model_type")}
            d = {**outer, **text, "architectures": d.get("architectures"),
                 "tie_word_embeddings": d.get("tie_word_embeddings",
                                              text.get("tie_word_embeddings", False))}
        if d.get("layer_types") is None and isinstance(d.get("num_hidden_layers"), int):
            every = d.get("full_attention_interval", 4)
            if not isinstance(every, int) or isinstance(every, bool) or every < 1:
                raise ConfigError(f"{source}: full_attention_interval must be a positive "
                                  f"integer, got {every!r}")
            d = {**d, "layer_types": [LINEAR if (i + 1) % every else "full_attention"
                                      for i in range(d["num_hidden_layers"])]}
        for key in SIZES:
            value = d.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
        return super().from_hf(d, source)


class Qwen3_5Builder(Qwen3Builder):
    architectures = ("Qwen3_5ForCausalLM",)
    config_class = Qwen3_5Config
    # (attn_output_gate must be true; the released configs' mtp_*, mamba_ssm_dtype,
    # output_gate_type and language_model_only are not read by transformers' Qwen3.5 either:
    # the multi-token-prediction head's weights are left unused)
    config_keys = frozenset({*SIZES, "full_attention_interval", "attn_output_gate",
                             "mtp_num_hidden_layers", "mtp_use_dedicated_embeddings",
                             "mamba_ssm_dtype", "output_gate_type", "language_model_only"})
    # Qwen3_5TextConfig's values for the keys a config.json may leave out
    config_defaults = {"max_position_embeddings": 32768, "head_dim": 256,
                       "partial_rotary_factor": 0.25, "linear_conv_kernel_dim": 4,
                       "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                       "linear_num_key_heads": 16, "linear_num_value_heads": 32}
    norm_offset = 1.0
    weight_names = {
        **Qwen3Builder.weight_names,
        QKV: "model.layers.{i}.linear_attn.in_proj_qkv.weight",
        Z: "model.layers.{i}.linear_attn.in_proj_z.weight",
        A: "model.layers.{i}.linear_attn.in_proj_a.weight",
        B: "model.layers.{i}.linear_attn.in_proj_b.weight",
        CONV: "model.layers.{i}.linear_attn.conv1d.weight",
        A_LOG: "model.layers.{i}.linear_attn.A_log",
        DT_BIAS: "model.layers.{i}.linear_attn.dt_bias",
        NORM: "model.layers.{i}.linear_attn.norm.weight",
        OUT: "model.layers.{i}.linear_attn.out_proj.weight",
    }
    linear_roles = frozenset({QKV, Z, OUT, GATE})
    static_layer_kinds = ("linear_attention",)  # lowering.conv and .recurrence
    kind_projections = {"linear_attention": (QKV, Z, OUT)}  # (in_proj_a, _b: float)
    # the Gated DeltaNet's recurrence: its state and what it reads from it follow the whole
    # prompt, not one token, and a prompt of tokens the calibration text lacked went beyond
    # them (trained tiny Qwen3.5, w8a16, 8 prompts of random tokens on the CPU EP: min step
    # cosine 0.99763, 0.99978 widened; the convolution's, widened too, cost on the HTP)
    headroom_scopes = ("/mlp/", "/LinearAttention/")
    float_roles = frozenset({A, B})
    genai_model_type = "qwen3_5_text"

    @staticmethod
    def sizes(c: DecoderConfig) -> dict[str, int]:
        """The DeltaNet's sizes (Qwen3_5TextConfig's defaults where config.json has none)."""
        defaults = Qwen3_5Builder.config_defaults
        s = {k.removeprefix("linear_"): c.extra.get(k) or defaults[k] for k in SIZES}
        s["key_dim"] = s["key_head_dim"] * s["num_key_heads"]
        s["value_dim"] = s["value_head_dim"] * s["num_value_heads"]
        s["conv_dim"] = 2 * s["key_dim"] + s["value_dim"]
        return s

    @classmethod
    def check_config(cls, c: DecoderConfig) -> None:
        s = cls.sizes(c)
        if s["num_value_heads"] % s["num_key_heads"]:
            raise ConfigError(f"config.json: linear_num_value_heads={s['num_value_heads']} is "
                              f"not a multiple of linear_num_key_heads={s['num_key_heads']}")

    @classmethod
    def role_shape(cls, c: DecoderConfig, role) -> tuple[int, ...]:
        s, h = cls.sizes(c), c.hidden_size
        heads = s["num_value_heads"]
        own = {QKV: (s["conv_dim"], h), Z: (s["value_dim"], h), A: (heads, h), B: (heads, h),
               CONV: (s["conv_dim"], 1, s["conv_kernel_dim"]), A_LOG: (heads,),
               DT_BIAS: (heads,), NORM: (s["value_head_dim"],), OUT: (h, s["value_dim"]),
               R.Q: (2 * c.num_attention_heads * c.head_dim, h)}  # [q | gate] per head
        return own[role] if role in own else super().role_shape(c, role)

    @classmethod
    def layer_states(cls, c: DecoderConfig, layer: int) -> tuple[LayerState, ...]:
        if cls.layer_kind(c, layer) != LINEAR:
            return ()
        s = cls.sizes(c)
        return (LayerState("conv", (s["conv_dim"], s["conv_kernel_dim"] - 1)),
                LayerState("recurrent", (s["num_value_heads"], s["key_head_dim"],
                                         s["value_head_dim"])))

    def check_supported(self) -> None:
        super().check_supported()
        self.check_config(self.config)
        c = self.config
        if not c.flag("attn_output_gate", True):
            raise ConfigError("config.json: attn_output_gate=false: Qwen3.5's attention without "
                              "its output gate is not supported (q_proj then has no gate rows)")
        if c.hidden_act not in ("silu", "swish"):
            raise ConfigError(f"config.json: hidden_act {c.hidden_act!r}: the DeltaNet's "
                              "convolution (CausalConvWithState) takes silu or none")

    # -- gated full attention ------------------------------------------------------------
    def query_and_gate(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """q_proj's rows split into the queries and the gate ([q | gate] per head)."""
        c = self.config
        w = self.weight(R.Q, layer)
        per_head = w.reshape(c.num_attention_heads, 2, c.head_dim, w.shape[-1])
        rows = c.num_attention_heads * c.head_dim
        return per_head[:, 0].reshape(rows, -1), per_head[:, 1].reshape(rows, -1)

    def attention_weights(self, layer: int):
        return (self.query_and_gate(layer)[0], self.weight(R.K, layer),
                self.weight(R.V, layer))

    def attention_gate(self, layer: int, x: str, out: str) -> str:
        gate = self.project("gate_proj", x, GATE, layer, self.query_and_gate(layer)[1],
                            self.weight_name(R.Q, layer) + ".gate")
        with self.gb.scope("gate"):
            return self.gb.node("Mul", [out, self.gb.node("Sigmoid", [gate])])

    # -- Gated DeltaNet ------------------------------------------------------------------
    def mixer(self, layer: int, x: str) -> str:
        if self.layer_kind(self.config, layer) != LINEAR:
            return super().mixer(layer, x)
        gb, s = self.gb, self.sizes(self.config)

        def project(name, role, h):
            return self.project(name, h, role, layer, self.weight(role, layer),
                                self.weight_name(role, layer))

        with gb.scope("linear_attn"):
            x = self.lowering.zero_padding(x)
            qkv = project("in_proj_qkv", QKV, x)
            z = project("in_proj_z", Z, x)
            a, b = project("in_proj_a", A, x), project("in_proj_b", B, x)
            mixed = self.lowering.conv("conv1d", layer, "conv", qkv, self.weight(CONV, layer),
                                       self.weight_name(CONV, layer), None, None, "silu")
            q, k, v = gb.node("Split", [mixed, gb.constant(
                [s["key_dim"], s["key_dim"], s["value_dim"]])], outputs=3, axis=-1)
            q = self.l2norm("q_l2norm", q, s["key_head_dim"])
            k = self.l2norm("k_l2norm", k, s["key_head_dim"])
            decay, rate = self.gates(layer, a, b)
            y = self.lowering.recurrence(
                "LinearAttention", layer, "recurrent", q, k, v, decay, rate,
                q_heads=s["num_key_heads"], v_heads=s["num_value_heads"],
                update_rule="gated_delta", scale=float(s["key_head_dim"] ** -0.5))
            y = self.gated_norm(layer, y, z, s["value_head_dim"])
            return project("out_proj", OUT, y)

    def l2norm(self, name: str, x: str, head_dim: int) -> str:
        """Each head's vector over its own L2 norm, as transformers' ``l2norm`` (eps 1e-6 on
        the sum of squares), [B, S, heads * d]: an RMSNorm (in float32) with weight d^-1/2 and
        eps 1e-6 / d is exactly that, and the HTP runs it (its 16-bit Reciprocal of the norm
        measured 85% off); rank 3, [B, S * heads, d], as ``head_norm``."""
        gb = self.gb
        with gb.scope(name):
            heads = gb.node("Reshape", [x, gb.constant([0, -1, head_dim])])
            normed = gb.node("RMSNormalization", [heads, gb.constant(
                np.full(head_dim, head_dim ** -0.5), np.float32)], "RMSNormalization", axis=-1,
                epsilon=1e-6 / head_dim, stash_type=1)
            return gb.node("Reshape", [normed, gb.node("Shape", [x])], "Reshape_1")

    def gates(self, layer: int, a: str, b: str) -> tuple[str, str]:
        """(g = -exp(A_log) · softplus(a + dt_bias), beta = sigmoid(b)), [B, S, value heads]."""
        gb = self.gb
        with gb.scope("gates"):
            _, g = time_step_decay(gb, a, self.weight(DT_BIAS, layer),
                                   self.weight_name(DT_BIAS, layer), self.weight(A_LOG, layer),
                                   self.weight_name(A_LOG, layer))
            return g, gb.node("Sigmoid", [b])

    def gated_norm(self, layer: int, y: str, z: str, head_dim: int) -> str:
        """RMSNorm of each value head (weight w, not 1 + w) times SiLU(z)."""
        gb = self.gb
        with gb.scope("norm"):
            heads = gb.node("Reshape", [y, gb.constant([0, -1, head_dim])])
            normed = norm(gb, "rms", "", heads, self.weight(NORM, layer),
                          self.weight_name(NORM, layer), self.config.rms_norm_eps)[0]
            silu = gb.node("Mul", [z, gb.node("Sigmoid", [z])])
            gated = gb.node("Mul", [normed, gb.node("Reshape", [
                silu, gb.constant([0, -1, head_dim])], "Reshape_z")])
            return gb.node("Reshape", [gated, gb.node("Shape", [y])], "Reshape_1")


def language_model(names: dict) -> dict:
    """A multimodal checkpoint's names of the text model's tensors (under
    ``model.language_model.``; lm_head where it was)."""
    return {role: name.replace("model.", "model.language_model.", 1)
            for role, name in names.items()}


class Qwen3_5VisionLanguageBuilder(Qwen3_5Builder):
    """The text model of a multimodal Qwen3.5 checkpoint (``Qwen3_5ForConditionalGeneration``,
    as Qwen3.5's small models are released): its weights under ``model.language_model.``; the
    vision tower's (``model.visual.``) and the multi-token-prediction head's (``mtp.``) are
    left unused. The folder generates text; images need the vision tower, which is not built."""

    architectures = ("Qwen3_5ForConditionalGeneration",)
    weight_names = language_model(Qwen3_5Builder.weight_names)
    ignored_weights = (*Qwen3_5Builder.ignored_weights, "model.visual.*", "mtp.*")
