"""DecoderBuilder: the pre-norm decoder template every architecture builds on.

A model is ``embedding → layers → final norm → lm_head``. An architecture states its
differences once, smallest first: a class flag (``qk_norm``), a weight-name table or a weight
override (``attention_weights``, ``mlp_weights``), a math hook (``mlp_activation``,
``embedding_multiplier``, ``attention_scale``, ``attention_softcap``, ``final_logit_softcap``,
``rope``, ``sliding_window``), a step of the layer (``pre_norm``, ``attention_output``,
``mlp_output``, ``head_norm``), and only then a method override of the dataflow
(``attention``, ``mixer``, ``mlp``, ``decoder_layer``). A hybrid's layers of other kinds
than attention (LFM2's convolutions) are ``mixer`` overrides with the states they declare
(``layer_states``).

Every target runs this same code. What must differ between targets (the graph's inputs and
outputs, rotary + KV cache + attention, the embedding lookup, lm_head's projection) is written
by the target's lowering: ``builder.models.decoder`` (one graph: cpu, cuda) or
``builder.models.static`` (static-shape graphs: qnn). ONNX wiring of primitives lives in
``builder.ops``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from builder.config import LAYER_TYPES, DecoderConfig, RopeConfig
from builder.errors import ConfigError, OptionError, WeightError
from builder.graph import GraphBuilder
from builder.lora import LoraBranches
from builder.options import BuildOptions
from builder.ops import ACTIVATIONS, linear, softcap, swiglu
from builder.ops.mlp import Activation, plain_mlp
from builder.ops.norms import NORM_KINDS, norm
from builder.ops.rotary import interleaved_order
from builder.quant import QuantizedWeight, QuantPolicy
from builder.quant.prequantized import checkpoint_codes
from builder.roles import PACKED_IN, bias_of
from builder.roles import TensorRole as R
from builder.targets import TargetCaps
from builder.weights import CheckpointReader, Rows

logger = logging.getLogger(__name__)

# transformers' activation names → the MLP emitter's (gelu_new and gelu_pytorch_tanh are both
# the tanh approximation)
HIDDEN_ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh"}

LLAMA_WEIGHT_NAMES: Mapping[R, str] = {
    R.EMBED: "model.embed_tokens.weight",
    R.ATTN_NORM: "model.layers.{i}.input_layernorm.weight",
    R.Q: "model.layers.{i}.self_attn.q_proj.weight",
    R.K: "model.layers.{i}.self_attn.k_proj.weight",
    R.V: "model.layers.{i}.self_attn.v_proj.weight",
    R.O: "model.layers.{i}.self_attn.o_proj.weight",
    R.Q_BIAS: "model.layers.{i}.self_attn.q_proj.bias",
    R.K_BIAS: "model.layers.{i}.self_attn.k_proj.bias",
    R.V_BIAS: "model.layers.{i}.self_attn.v_proj.bias",
    R.O_BIAS: "model.layers.{i}.self_attn.o_proj.bias",
    R.Q_NORM: "model.layers.{i}.self_attn.q_norm.weight",
    R.K_NORM: "model.layers.{i}.self_attn.k_norm.weight",
    R.MLP_NORM: "model.layers.{i}.post_attention_layernorm.weight",
    R.GATE: "model.layers.{i}.mlp.gate_proj.weight",
    R.UP: "model.layers.{i}.mlp.up_proj.weight",
    R.DOWN: "model.layers.{i}.mlp.down_proj.weight",
    R.FINAL_NORM: "model.norm.weight",
    R.LM_HEAD: "lm_head.weight",
    # read where config.json's mlp_bias says
    R.GATE_BIAS: "model.layers.{i}.mlp.gate_proj.bias",
    R.UP_BIAS: "model.layers.{i}.mlp.up_proj.bias",
    R.DOWN_BIAS: "model.layers.{i}.mlp.down_proj.bias",
}
# the packed tensor that holds a projection's weight, when a checkpoint stores them fused


@dataclass(frozen=True)
class LayerState:
    """What a layer of a kind other than attention carries from one call to the next (LFM2's
    convolution window): graph input ``past.{layer}.{name}`` and output
    ``present.{layer}.{name}``, [batch, *shape] in the graph's float type, zeros before the
    first call (onnxruntime-genai's names for them)."""

    name: str
    shape: tuple[int, ...]


def lowering_for(builder: DecoderBuilder):
    """How the builder's target writes the parts of the dataflow that differ between targets:
    the single-graph decoder (cpu, cuda) or static-shape graphs (qnn)."""
    if builder.target.static_shapes:
        from builder.models.static import StaticLowering

        return StaticLowering(builder)
    from builder.models.decoder import DecoderLowering

    return DecoderLowering(builder)


class DecoderBuilder:
    """Builds one decoder-only model into a GraphBuilder."""

    architectures: ClassVar[tuple[str, ...]] = ()
    config_class: ClassVar[type[DecoderConfig]] = DecoderConfig
    # what transformers' config class of the architecture gives the keys config.json leaves out,
    # where that differs from builder's defaults (Llama's)
    config_defaults: ClassVar[dict] = {}
    weight_names: ClassVar[Mapping[R, str]] = LLAMA_WEIGHT_NAMES
    ignored_weights: ClassVar[tuple[str, ...]] = ("*.rotary_emb.inv_freq",)
    qk_norm: ClassVar[bool] = False      # per-head norm on q and k before rotary
    qk_norm_after_rotary: ClassVar[bool] = False  # ... after it instead (HunYuan)
    # every norm's math (builder.ops.norms): "rms" or "layer" (LayerNorm: with a bias where
    # weight_names names the norm's bias role, ``bias_of(role)``; without where it does not)
    norm_kind: ClassVar[str] = "rms"
    norm_offset: ClassVar[float] = 0.0   # norms scale by offset + weight (Gemma, Nemotron: 1)
    # the MLP: down(act(gate(x)) * up(x)); not gated: down(act(up(x))) (no gate weight)
    gated_mlp: ClassVar[bool] = True
    # rotary turns the pairs (2i, 2i + 1) of each head (GPT-J, Cohere, GLM) instead of
    # (i, i + rotary_dim / 2): built as the rotate-half form on q and k rows reordered to match
    # (``rotary_order``), so every target's rotary op runs it
    rotary_interleaved: ClassVar[bool] = False
    # config.json keys of the family's own naming → builder's (GPT-NeoX: {"rotary_pct":
    # "partial_rotary_factor", "layer_norm_eps": "rms_norm_eps"}); both given and different is
    # refused
    config_aliases: ClassVar[dict[str, str]] = {}
    # config.json keys the architecture reads beyond DecoderConfig's fields (``config.number``,
    # ``config.flag``, ``config.extra``), with those of the classes it extends: any other key is
    # an error (``builder.config.check_keys``) unless it is known to change nothing
    config_keys: ClassVar[frozenset[str]] = frozenset()
    # genai_config.json's model type, where onnxruntime-genai does not know the checkpoint's
    # model_type but runs the graph as this one (None: the checkpoint's)
    genai_model_type: ClassVar[str | None] = None
    # an architecture's own roles (keys of weight_names that are not TensorRole) that feed a
    # projection (``project``): quantized as the layers' projections are (``linear_roles``) or
    # kept in float on purpose (``float_roles``); one in neither is an error, never a weight
    # silently left in float at -p int4
    linear_roles: ClassVar[frozenset[str]] = frozenset()
    float_roles: ClassVar[frozenset[str]] = frozenset()
    # layer kinds beside attention whose ``mixer`` the static graphs (qnn) lower: it uses only
    # what their lowering writes from standard ops (``lowering.conv``, ``lowering.state``'s
    # buffers); a kind not listed stops a qnn build, naming it
    static_layer_kinds: ClassVar[tuple[str, ...]] = ()
    # per layer kind beside attention, the roles of its own projections that data-aware
    # rounding (gptq) rounds, those sharing an input next to each other (``projection_weight``
    # gives each weight as its projection reads it); a kind not listed is refused by gptq
    kind_projections: ClassVar[dict[str, tuple]] = {}
    # the graphs' scopes whose values take qnn_calibration_headroom (``graph.Calibrated``): the
    # MLP's, whose values follow the token more than any other's; an architecture adds those of
    # its own that do alike (a short convolution's window, a norm whose mean square can fall
    # under its epsilon)
    headroom_scopes: ClassVar[tuple[str, ...]] = ("/mlp/",)

    def __init__(self, config: DecoderConfig, options: BuildOptions, target: TargetCaps,
                 weights: CheckpointReader, gb: GraphBuilder,
                 policy: QuantPolicy | None = None) -> None:
        self.config = config
        self.policy = policy or QuantPolicy()
        self.options = options
        self.extra = options.extra
        self.target = target
        self.weights = weights
        self.gb = gb
        self.shared_embeddings = self._shared_embeddings()
        apart = getattr(weights, "apart", ())
        self.packed = self._packed(bool(apart))
        if apart:
            gb.lora = LoraBranches(apart, self)
        # 1x1 Conv projections: only for static graphs (qnn_linear=conv)
        self.conv_projections = target.static_shapes and self.extra.qnn_linear == "conv"
        self.check_supported()
        self.check_checkpoint()
        self.lowering = lowering_for(self)
        windows = sorted({w for w in map(self.sliding_window, range(config.num_hidden_layers))
                          if w is not None})
        logger.info("attention: %s on %s%s", target.attention, target.name,
                    f", sliding window {windows}" if windows else "")

    @classmethod
    def genai_decoder(cls, c: DecoderConfig) -> dict:
        """What genai_config.json's "decoder" says beyond the attention model's fields: for a
        model with layers of other kinds, ``layer_types`` and the names of their states
        (``past_<state>_names``: ``past.%d.<state>``, as ``layer_states`` declares them and
        onnxruntime-genai reads them)."""
        if c.layer_types is None or all(t in LAYER_TYPES for t in c.layer_types):
            return {}
        names = {s.name for layer in range(c.num_hidden_layers)
                 for s in cls.layer_states(c, layer)}
        return {"layer_types": list(c.layer_types[:c.num_hidden_layers]),
                "inputs": {f"past_{n}_names": f"past.%d.{n}" for n in sorted(names)},
                "outputs": {f"present_{n}_names": f"present.%d.{n}" for n in sorted(names)}}

    @classmethod
    def read_keys(cls) -> frozenset[str]:
        """The config.json keys this architecture reads beyond DecoderConfig's fields: its
        ``config_keys`` and its bases'."""
        return frozenset().union(*(vars(k).get("config_keys", frozenset()) for k in cls.__mro__))

    # -- decisions -----------------------------------------------------------------------
    def check_supported(self) -> None:
        """Refuse configs this builder cannot express, before anything is written. What the
        hooks decide (the MLP's activation) is checked through them, so that an architecture
        that overrides a hook to accept more is not refused here first."""
        c = self.config
        activation = self.mlp_activation()
        if not callable(activation) and activation not in ACTIVATIONS:
            raise ConfigError(f"{type(self).__name__}.mlp_activation gives {activation!r}, "
                              f"which no MLP emitter has ({', '.join(ACTIVATIONS)}; or give a "
                              "function that writes it)")
        if self.norm_kind not in NORM_KINDS:
            raise ConfigError(f"{type(self).__name__}.norm_kind is {self.norm_kind!r}: one of "
                              f"{', '.join(NORM_KINDS)}")
        for layer in range(c.num_hidden_layers if c.layer_types is not None else 0):
            kind = self.layer_kind(c, layer)  # (without layer_types every layer is attention)
            if kind != "attention" and type(self).mixer is DecoderBuilder.mixer:
                raise ConfigError(f"config.json: layer {layer} is a {kind!r} layer "
                                  f"(layer_types), which {type(self).__name__} does not build "
                                  "(its mixer builds attention only)")
        if self.target.attention == "gqa" and c.head_dim % 16:
            raise ConfigError(f"head_dim={c.head_dim}: GroupQueryAttention needs a multiple "
                              "of 16")

    def check_checkpoint(self) -> None:
        """The sizes in config.json are confirmed by the checkpoint's tensor headers before
        anything is allocated from them: a damaged num_hidden_layers or hidden_size fails here,
        in milliseconds, instead of after the graph declared inputs for a billion layers."""
        c, w = self.config, self.weights
        layers = c.extra.get("checkpoint_num_hidden_layers", c.num_hidden_layers)
        per_layer = [f for f in self.weight_names.values() if "{i}" in f]
        if layers > len(w.names()):  # every layer has tensors of its own
            raise ConfigError(f"config.json: num_hidden_layers={layers}, but the checkpoint "
                              f"holds only {len(w.names())} tensors")
        for layer in range(layers):
            if not any(f.format(i=layer, e=0) in w for f in per_layer):
                raise ConfigError(f"config.json: num_hidden_layers={layers}, but the "
                                  f"checkpoint has no tensors of layer {layer} (such as "
                                  f"{per_layer[0].format(i=layer, e=0)!r})")
        for role, template in self.weight_names.items():
            for layer in range(c.num_hidden_layers) if "{i}" in template else [None]:
                for e in self.experts(layer) if "{e}" in template else [None]:
                    name = self.weight_name(role, layer, e)
                    if name in w and w.shape(name) != self.expected_shape(role):
                        raise WeightError(f"tensor {name!r} has shape {list(w.shape(name))}; "
                                          f"the config implies {list(self.expected_shape(role))}")

    def _shared_embeddings(self) -> bool:
        asked = self.extra.shared_embeddings
        tied = self.config.tie_word_embeddings
        if asked and not tied:
            raise ConfigError("shared_embeddings=true needs a checkpoint that ties its "
                              "embeddings, but config.json has tie_word_embeddings=false")
        shared = tied if asked is None else asked
        if self.target.static_shapes:
            return False  # separate embeddings and lm_head graphs (see builder.pipeline)
        logger.info("embeddings: %s (tie_word_embeddings=%s%s)",
                    "one table shared by the lookup and lm_head" if shared else
                    "separate lookup and lm_head tables", tied,
                    "" if asked is None else f", shared_embeddings={asked}")
        return shared

    def _packed(self, adapters: bool = False) -> bool:
        asked = self.extra.unpack_matmul
        packed = self.target.pack_matmuls if asked is None else not asked
        if adapters and packed:
            if asked is not None:
                raise OptionError("unpack_matmul=false: LoRA adapters kept apart adapt q, k, "
                                  "v, gate and up each on its own MatMul")
            packed, asked = False, "LoRA adapters kept apart"
        why = (f"unpack_matmul={asked}" if isinstance(asked, bool) else asked if asked else
               f"the {self.target.name} default: one GEMM instead of three (QKV) and two "
               "(gate/up)" if packed else f"the {self.target.name} default")
        logger.info("projections: %s (%s)", "packed QKV and gate/up" if packed else
                    "separate q/k/v and gate/up, as in the checkpoint's Llama layout", why)
        return packed

    # -- weights -------------------------------------------------------------------------
    def expected_shape(self, role: R) -> tuple[int, ...]:
        return self.role_shape(self.config, role)

    @classmethod
    def role_shape(cls, c: DecoderConfig, role: R | str) -> tuple[int, ...]:
        """A role's tensor shape as ``c`` implies it (the checkpoint must agree). An
        architecture may name roles of its own (plain strings, as keys of ``weight_names``):
        it gives their shapes by overriding this."""
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        h, i = c.hidden_size, c.intermediate_size
        shapes = {
            R.EMBED: (c.vocab_size, h), R.LM_HEAD: (c.vocab_size, h),
            R.ATTN_NORM: (h,), R.MLP_NORM: (h,), R.FINAL_NORM: (h,),
            R.Q: (q, h), R.K: (kv, h), R.V: (kv, h), R.O: (h, q), R.QKV: (q + 2 * kv, h),
            R.Q_BIAS: (q,), R.K_BIAS: (kv,), R.V_BIAS: (kv,), R.O_BIAS: (h,),
            R.Q_NORM: (c.head_dim,), R.K_NORM: (c.head_dim,),
            R.GATE: (i, h), R.UP: (i, h), R.DOWN: (h, i), R.GATE_UP: (2 * i, h),
            R.GATE_BIAS: (i,), R.UP_BIAS: (i,), R.DOWN_BIAS: (h,), R.LM_HEAD_BIAS: (c.vocab_size,),
            R.ATTN_NORM_BIAS: (h,), R.MLP_NORM_BIAS: (h,), R.FINAL_NORM_BIAS: (h,),
            R.Q_NORM_BIAS: (c.head_dim,), R.K_NORM_BIAS: (c.head_dim,),
        }
        if role not in shapes and isinstance(role, str) and not isinstance(role, R) \
                and role.endswith("_bias"):  # an own role's bias: its norm's size, its rows
            return cls.role_shape(c, role.removesuffix("_bias"))[:1]
        if role not in shapes:
            raise ConfigError(f"{cls.__name__}.weight_names has role {role!r}, whose shape "
                              f"{cls.__name__}.role_shape does not give")
        return shapes[role]

    @classmethod
    def layer_weight_shapes(cls, c: DecoderConfig, layer: int) -> list[tuple[R, tuple[int, ...]]]:
        """(role, shape) of one layer's weights, from config.json alone: how a static
        pipeline sizes its parts before any weight is read (``builder.pipeline``). The
        projections and norms; an architecture whose layers hold other weights (experts)
        lists them here. A layer of another kind than attention (a hybrid's) has no q, k, v, o
        or their norms; its own roles are counted in every layer (an upper bound)."""
        attention = cls.layer_kind(c, layer) == "attention"
        roles = [*([R.Q, R.K, R.V, R.O] if attention else []),
                 *([R.GATE] if cls.gated_mlp else []), R.UP, R.DOWN]
        roles += [r for r in (R.ATTN_NORM, R.MLP_NORM) if r in cls.weight_names]
        roles += [R.Q_NORM, R.K_NORM] if cls.has_qk_norm(c) and attention else []
        roles += [r for r, name in cls.weight_names.items()  # an architecture's own roles
                  if not isinstance(r, R) and "{i}" in name and r not in roles]
        roles += [bias_of(r) for r in roles if bias_of(r) in cls.weight_names
                  and bias_of(r) not in roles]
        return [(role, cls.role_shape(c, role)) for role in roles]

    def weight_name(self, role: R, layer: int | None = None, expert: int | None = None) -> str:
        if role not in self.weight_names:
            raise ConfigError(f"{type(self).__name__}.weight_names has no "
                              f"{getattr(role, 'value', role)!r}: name the checkpoint's tensor "
                              "for it")
        return self.weight_names[role].format(i=layer, e=expert)

    @classmethod
    def has_qk_norm(cls, config: DecoderConfig) -> bool:
        """Per-head RMSNorm on q and k before rotary: the class flag ``qk_norm``; an
        architecture whose config.json decides (Cohere's ``use_qk_norm``) overrides this."""
        if not isinstance(cls.qk_norm, bool):  # (a property would be truthy for the class)
            raise ConfigError(f"{cls.__name__}.qk_norm must be True or False; a choice made by "
                              "config.json overrides has_qk_norm(config)")
        return cls.qk_norm

    def initializer_name(self, role: R, layer: int | None = None) -> str:
        """The name a weight's initializer takes: its tensor's, or for a part of a packed tensor
        the table does not name (q of a stored qkv, gate of a stored gate_up) the packed
        tensor's name with the part (``...qkv_proj.weight.q``)."""
        if role in self.weight_names:
            return self.weight_name(role, layer)
        packed = PACKED_IN.get(role)
        if packed in self.weight_names:
            return f"{self.weight_name(packed, layer)}.{role.value}"
        name = type(self).__name__
        raise ConfigError(f"{name}.weight_names has no {role.value!r}"
                          + (f" (nor {packed.value!r}, which holds it)" if packed else "")
                          + ": name the checkpoint's tensor for it")

    def weight(self, role: R, layer: int | None = None, expert: int | None = None) -> np.ndarray:
        """Read one tensor (in its stored dtype) by role, checking its shape against the config
        (q's and k's rows in ``rotary_order``)."""
        w = self.weights.read(self.weight_name(role, layer, expert), self.expected_shape(role))
        return self.rotary_order(role, layer, w)

    def rotary_order(self, role: R | str, layer: int | None, w: np.ndarray) -> np.ndarray:
        """For interleaved rotary, q's and k's values of each head reordered so that the pair
        (2i, 2i + 1) becomes (i, i + rotary_dim / 2): rotate-half rotary on the reordered
        values is the interleaved rotary on the stored ones, and q·k is unchanged (both are
        reordered alike; v and the cache's use of k are indifferent to the order)."""
        rows = {R.Q: "q", R.K: "k", R.Q_BIAS: "q", R.K_BIAS: "k", R.QKV: "qkv",
                R.Q_NORM: "norm", R.K_NORM: "norm", R.Q_NORM_BIAS: "norm",
                R.K_NORM_BIAS: "norm"}.get(role)
        rope = self.rope(layer) if rows and self.rotary_interleaved else None
        if rope is None:
            return w
        c, hd = self.config, self.config.head_dim
        order = interleaved_order(hd, round(hd * rope.partial_rotary_factor))
        if rows == "norm":  # over head_dim, or over each head of the projection
            return w.reshape(*w.shape[:-1], -1, hd)[..., order].reshape(w.shape)
        heads = w.shape[0] // hd
        if rows == "qkv":  # q's and k's heads, then v's as they are
            heads = c.num_attention_heads + c.num_key_value_heads
        per_head = w[:heads * hd].reshape(heads, hd, *w.shape[1:])[:, order]
        return np.concatenate([per_head.reshape(heads * hd, *w.shape[1:]), w[heads * hd:]])

    def experts(self, layer: int) -> range:
        """The experts of ``layer`` (none: a dense layer)."""
        return range(0)

    def layer_weight_names(self, layer: int) -> list[str]:
        """Every name the templates give ``layer``, each expert's included."""
        names = []
        for template in self.weight_names.values():
            if "{e}" in template:
                names += [template.format(i=layer, e=e) for e in self.experts(layer)]
            elif "{i}" in template:
                names.append(template.format(i=layer))
        return names

    def weight_rows(self, role: R) -> Rows:
        """A table (embeddings, lm_head) read a range of rows at a time: ``rows[a:b]``."""
        return self.weights.rows(self.weight_name(role), self.expected_shape(role))

    def quantize(self, role: R, layer: int | None, weight: np.ndarray,
                 node: str) -> np.ndarray | QuantizedWeight:
        """The weight as the quantization policy wants it for the node that will read it (its
        input columns scaled first where activation-aware scaling chose so: ``quant.awq``)."""
        weight = self.policy.fold_projection(role, layer, weight, self)
        bits = self.policy.bits_for(self.policy_role(role), layer, node, own=role)
        if bits is None:
            return weight
        kept = checkpoint_codes(self, layer, weight, node, bits)
        if kept is not None:
            return kept
        quantized = self.policy.quantize(role, layer, weight, bits)
        logger.debug("%s: %s %s -> %s int%d", node, weight.dtype, list(weight.shape),
                     self.policy.algorithm, bits)
        return quantized

    def policy_role(self, role: R | str) -> R | str:
        """The role the quantization policy sees: an own linear role as a layer projection
        (o's rules), an own float role as itself (not a projection: float)."""
        if isinstance(role, R) or role in self.float_roles:
            return role
        if role in self.linear_roles:
            return R.O
        name = type(self).__name__
        raise ConfigError(f"{name} projects with its own role {role!r}, which it declares "
                          f"neither in {name}.linear_roles (quantized as the layers' "
                          f"projections) nor in {name}.float_roles (kept in float)")

    def project(self, name: str, x: str, role: R, layer: int | None, weight: np.ndarray,
                weight_name: str, bias: np.ndarray | None = None,
                bias_name: str | None = None) -> str:
        """A linear layer, quantized or not as the policy decides."""
        w = self.quantize(role, layer, weight, self.gb.path(name) + "/MatMul")
        return linear(self.gb, name, x, w, weight_name, bias, bias_name,
                      self.policy.accuracy_level, conv=self.conv_projections)

    def projection_weight(self, role, layer: int) -> np.ndarray:
        """A projection of a layer of another kind (``kind_projections``) as it reads it."""
        return self.weight(role, layer)

    def attention_weights(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(q, k, v) projection weights, each [out, in]."""
        return self.weight(R.Q, layer), self.weight(R.K, layer), self.weight(R.V, layer)

    def packed_attention_weight(self, layer: int) -> np.ndarray:
        """q, k and v stacked on the output axis: [q + 2 kv, in]."""
        return np.concatenate(self.attention_weights(layer))

    def attention_biases(self, layer: int) -> tuple[np.ndarray | None, ...]:
        """(q, k, v, o) biases; None where the architecture has none."""
        if not self.config.attention_bias:
            return (None, None, None, None)
        return tuple(self.weight(r, layer) for r in (R.Q_BIAS, R.K_BIAS, R.V_BIAS, R.O_BIAS))

    def mlp_weights(self, layer: int) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """(gate, up, down) weights, each [out, in]; gate None in a non-gated MLP."""
        gate = self.weight(R.GATE, layer) if self.gated_mlp else None
        return gate, self.weight(R.UP, layer), self.weight(R.DOWN, layer)

    def packed_mlp_weights(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(gate and up stacked on the output axis, down)."""
        gate, up, down = self.mlp_weights(layer)
        return np.concatenate([gate, up]), down

    def ignored(self) -> tuple[str, ...]:
        """Checkpoint tensors the build may leave unused (glob patterns)."""
        c, x = self.config, self.extra
        names = list(self.ignored_weights)
        if c.tie_word_embeddings:  # Hugging Face ignores a stored lm_head.weight then; so do we
            names.append(self.weight_name(R.LM_HEAD))
        if x.exclude_embeds:
            names.append(self.weight_name(R.EMBED))
        if x.exclude_lm_head:
            names += [self.weight_name(r) for r in (R.LM_HEAD, R.LM_HEAD_BIAS)
                      if r in self.weight_names]
        first_unbuilt = c.num_hidden_layers
        for layer in range(first_unbuilt, c.extra.get("checkpoint_num_hidden_layers",
                                                      first_unbuilt)):
            names += self.layer_weight_names(layer)
        return tuple(names)

    # -- the model's math, stated once; every target lowers it ---------------------------
    def mlp_activation(self) -> Activation:
        """The gated MLP's activation, from hidden_act: one of ``builder.ops.ACTIVATIONS``, or
        a function ``(gb, x) -> output`` that writes one of an architecture's own (standard
        ONNX ops: every target runs it)."""
        act = self.config.hidden_act
        if act not in HIDDEN_ACTS:
            raise ConfigError(f"config.json: hidden_act {act!r} is not supported yet "
                              f"({', '.join(HIDDEN_ACTS)})")
        return HIDDEN_ACTS[act]

    def embedding_multiplier(self) -> float | None:
        """Factor on the looked-up embeddings (Gemma: sqrt(hidden_size)); None: none."""
        return None

    def attention_scale(self) -> float:
        """Factor on q·k before the softmax."""
        return float(self.config.head_dim ** -0.5)

    def attention_softcap(self) -> float | None:
        """Scores become cap * tanh(scores / cap) before the mask (Gemma 2); None: none."""
        return None

    def attention_sinks(self, layer: int) -> tuple[np.ndarray, str] | None:
        """(values, tensor name): per head, a logit that joins each softmax's denominator and
        attends to nothing (GPT-OSS's sinks), [num_attention_heads]; None: none."""
        return None

    def final_logit_softcap(self) -> float | None:
        """Logits become cap * tanh(logits / cap); None: none."""
        return None

    def rope(self, layer: int) -> RopeConfig | None:
        """The rotary embedding of ``layer`` (its layer type's where the config gives one per
        type); None: the layer's attention has no rotary (SmolLM3's NoPE layers), or the layer
        is of another kind than attention (a hybrid's)."""
        if self.layer_kind(self.config, layer) != "attention":
            return None
        return self.config.rope_of(layer)

    def sliding_window(self, layer: int) -> int | None:
        """Each query of ``layer`` sees itself and window - 1 earlier keys; None: all of them."""
        return self.config.window(layer)

    # -- dataflow, shared by every target ------------------------------------------------
    def build(self) -> None:
        """The single-graph decoder (cpu, cuda); static targets use builder.models.static."""
        self.lowering.build()

    def embedding(self, input_ids: str) -> str:
        """The lookup (lowered per target), times the embedding multiplier."""
        h = self.lowering.lookup(input_ids)
        multiplier = self.embedding_multiplier()
        if multiplier is None:
            return h
        with self.gb.scope("/model/embed_tokens/multiplier"):
            return self.gb.node("Mul", [h, self.gb.constant(multiplier, np.float32)])

    def parallel_block(self) -> bool:
        """Attention and the MLP side by side on the same stream, their outputs summed into one
        residual add (GPT-J, Phi-2, Cohere, GPT-NeoX's use_parallel_residual), the MLP reading
        the attention's normed input or its own norm of the stream (``parallel_mlp_norm``).
        False: one after the other."""
        return False

    def parallel_mlp_norm(self) -> bool:
        """In a parallel block, whether the MLP norms the stream itself (GPT-NeoX's
        post_attention_layernorm) rather than reading the attention's norm (Phi-2, Cohere): by
        default, where weight_names has a ``mlp_norm``."""
        return R.MLP_NORM in self.weight_names

    def decoder_layer(self, layer: int, x: str, residual: str | None) -> tuple[str, str | None]:
        """Pre-norm block, composed of steps an architecture overrides one at a time:
        ``pre_norm`` (input_layernorm) → ``mixer`` (attention) → ``attention_output`` →
        ``pre_norm`` (the residual add, then the MLP's norm) → ``mlp`` → ``mlp_output``.
        Returns (the block's output, the residual stream to add to it), or (the block's output
        with its residual added, None) where norms do not fuse adds."""
        gb = self.gb
        with gb.scope(f"/model/layers.{layer}"):
            h, residual = self.pre_norm(layer, "input_layernorm", R.ATTN_NORM, x, residual)
            a = self.attention_output(layer, self.mixer(layer, h))
            if self.parallel_block():
                if self.parallel_mlp_norm():
                    h = self.norm("post_attention_layernorm", residual, R.MLP_NORM, layer)
                m = gb.node("Add", [a, self.mlp_output(layer, self.mlp(layer, h))],
                            "parallel/Add")
                if not self.target.skip_norm:
                    return gb.node("Add", [residual, m], "mlp_residual/Add"), None
                return m, residual
            h, residual = self.pre_norm(layer, "post_attention_layernorm", R.MLP_NORM, a,
                                        residual, "attn_residual/Add")
            m = self.mlp_output(layer, self.mlp(layer, h))
            if not self.target.skip_norm:  # residual adds stay separate from the norms
                return gb.node("Add", [residual, m], "mlp_residual/Add"), None
            return m, residual

    def pre_norm(self, layer: int, name: str, role: R, x: str, residual: str | None,
                 add: str = "residual/Add") -> tuple[str, str]:
        """(RMSNorm of the stream, the stream): the stream is ``x`` plus ``residual`` (when
        there is one); fused into one SkipSimplifiedLayerNormalization where the target has it,
        else an Add named ``add`` and the norm."""
        if residual is not None and self.target.skip_norm:
            return self.normalize(name, x, role, layer, skip=residual, fold=True)
        stream = x if residual is None else self.gb.node("Add", [residual, x], add)
        return self.normalize(name, stream, role, layer, fold=True)[0], stream

    def norm(self, name: str, x: str, role: R | str, layer: int | None = None) -> str:
        """The norm of ``x`` with the weights of ``role`` (a norm of an architecture's own, such
        as Gemma's after attention, is one line of ``attention_output``)."""
        return self.normalize(name, x, role, layer)[0]

    def normalize(self, name: str, x: str, role: R | str, layer: int | None = None,
                  skip: str | None = None, fold: bool = False) -> tuple[str, str]:
        """(the norm of ``x`` (+ ``skip``, fused where given), the sum normed): every norm step
        writes its norm here, as ``norm_kind`` and ``norm_offset`` say, with the bias the table
        names for the role (a LayerNorm without one gets zeros on static targets: the HTP
        runs LayerNorm only with a bias). ``fold``: a pre-norm, whose weight (and bias) take
        activation-aware scales (``quant.awq``)."""
        w, weight_name = self.weight(role, layer), self.weight_name(role, layer)
        if self.norm_offset:
            w = self.norm_offset + w.astype(np.float32)
        b_role = bias_of(role)
        bias = self.weight(b_role, layer) if b_role in self.weight_names else None
        bias_name = self.weight_name(b_role, layer) if bias is not None else None
        if bias is None and self.norm_kind == "layer" and self.target.static_shapes:
            bias = np.zeros(w.shape[-1], np.float32)
            bias_name = weight_name.removesuffix(".weight") + ".zero_bias"
        if fold:  # (divided by activation-aware scales)
            w = self.policy.fold_norm(role, layer, w)
            bias = None if bias is None else self.policy.fold_norm(role, layer, bias)
        return norm(self.gb, self.norm_kind, name, x, w, weight_name, self.config.rms_norm_eps,
                    bias, bias_name, skip)

    @classmethod
    def layer_kind(cls, c: DecoderConfig, layer: int) -> str:
        """"attention" (full or sliding), or the layer's type in config.json's layer_types
        where it is another kind (``DecoderConfig.other_layer_types``: LFM2's "conv")."""
        kind = "full_attention" if c.layer_types is None else c.layer_types[layer]
        return "attention" if kind in LAYER_TYPES else kind

    @classmethod
    def layer_states(cls, c: DecoderConfig, layer: int) -> tuple[LayerState, ...]:
        """The states a layer of another kind than attention carries between calls (the
        lowering declares them as graph inputs and outputs: ``lowering.state``); attention's
        KV cache is the lowering's own."""
        return ()

    def mixer(self, layer: int, x: str) -> str:
        """The layer's token mixer: attention; an architecture with layers of other kinds
        (``layer_kind``) builds those here, from standard ops or onnxruntime's."""
        return self.attention(layer, x)

    def attention_output(self, layer: int, a: str) -> str:
        """The attention block's output before the residual add (Gemma: a norm); as is."""
        return a

    def mlp_output(self, layer: int, m: str) -> str:
        """The MLP block's output before the residual add (Gemma: a norm); as is."""
        return m

    def final_norm(self, x: str, residual: str | None) -> str:
        """The last residual add (when still pending) and the final norm."""
        with self.gb.scope(f"/model/layers.{self.config.num_hidden_layers}"):
            return self.normalize("final_norm_layernorm", x, R.FINAL_NORM, skip=residual)[0]

    def attention(self, layer: int, x: str) -> str:
        """q/k/v projections → [per-head q/k norm] → rotary, KV cache and attention (lowered per
        target, with this layer's scale, soft-cap and window) → o_proj."""
        c, gb = self.config, self.gb
        with gb.scope("attn"):
            q, k, v = self.qkv_projections(layer, x)
            if self.has_qk_norm(c) and not self.qk_norm_after_rotary:
                q, k = self.qk_norms(layer, q, k)
            out = self.attention_gate(layer, x, self.lowering.attend(layer, q, k, v))
            return self.project("o_proj", out, R.O, layer, self.weight(R.O, layer),
                                self.weight_name(R.O, layer), self.attention_biases(layer)[3])

    def attention_gate(self, layer: int, x: str, out: str) -> str:
        """The heads' output before o_proj, from the attention's input ``x`` (Qwen3.5: times
        sigmoid of a gate projection); as is."""
        return out

    def qk_norms(self, layer: int, q: str, k: str) -> tuple[str, str]:
        """q and k, each normed per head (``head_norm``)."""
        c = self.config
        return (self.head_norm("q_norm", q, R.Q_NORM, layer, c.num_attention_heads),
                self.head_norm("k_norm", k, R.K_NORM, layer, c.num_key_value_heads))

    def after_rotary(self, layer: int, q: str, k: str) -> tuple[str, str]:
        """q and k after the lowering's rotary (or where the layer has none): normed per head
        where ``qk_norm_after_rotary``; as they are otherwise."""
        if self.qk_norm_after_rotary and self.has_qk_norm(self.config):
            return self.qk_norms(layer, q, k)
        return q, k

    def qkv_projections(self, layer: int, x: str) -> tuple[str, str, str]:
        """(q, k, v) values; with packed projections and nothing between them and attention,
        (qkv, '', '') so that GroupQueryAttention splits the packed tensor itself."""
        c, gb = self.config, self.gb
        qb, kb, vb, _ = self.attention_biases(layer)
        names = [self.initializer_name(r, layer) for r in (R.Q, R.K, R.V)]
        if not self.packed:
            return tuple(self.project(f"{r.value}_proj", x, r, layer, w, n, b) for r, w, n, b in
                         zip((R.Q, R.K, R.V), self.attention_weights(layer), names, (qb, kb, vb)))
        packed = self.weight_name(R.QKV, layer) if R.QKV in self.weight_names else \
            names[0].rsplit(".q_proj.", 1)[0] + ".qkv_proj.weight"
        bias = None if qb is None else np.concatenate([qb, kb, vb])
        qkv = self.project("qkv_proj", x, R.QKV, layer, self.packed_attention_weight(layer),
                           packed, bias, packed.removesuffix(".weight") + ".bias")
        if self.lowering.takes_packed_qkv and not self.has_qk_norm(c) \
                and not self.qk_norm_after_rotary:
            return qkv, "", ""
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        with gb.scope("qkv_proj"):
            return tuple(gb.node("Split", [qkv, gb.constant([q, kv, kv])], outputs=3, axis=-1))

    def head_norm(self, name: str, x: str, role: R, layer: int, heads: int) -> str:
        """RMSNorm over head_dim of each head: [B, S, heads*hd] → [B, S*heads, hd] and back.

        Rank 3, not [B, S, heads, hd]: the QNN HTP's fp16 RmsNorm is wrong on many rank-4
        shapes (measured on onnxruntime-qnn 2.7's simulator: [1, 64, 8, 128], Qwen3-0.6B's k
        at the default prefill length, and [1, S, 2, 32] for S > 8 give rows normalized
        wrongly, while every [1, N, hd] tried is right), which made Qwen3's keys wrong at P = 64.
        """
        gb, hd = self.gb, self.config.head_dim
        with gb.scope(name):
            split = gb.node("Reshape", [x, gb.constant([0, -1, hd])], "Reshape")
            normed = self.norm("", split, role, layer)
            return gb.node("Reshape", [normed, gb.constant([0, -1, heads * hd])], "Reshape_1")

    def mlp_biases(self, layer: int) -> tuple[np.ndarray | None, ...]:
        """(gate, up, down) biases, as config.json's mlp_bias says; None where there is none
        (gate's always, in a non-gated MLP)."""
        if not self.config.mlp_bias:
            return (None, None, None)
        return (self.weight(R.GATE_BIAS, layer) if self.gated_mlp else None,
                self.weight(R.UP_BIAS, layer), self.weight(R.DOWN_BIAS, layer))

    def mlp(self, layer: int, x: str) -> str:
        """The gated MLP (packed gate/up where the target packs), or ``up → act → down``."""
        level = self.policy.accuracy_level
        biases = self.mlp_biases(layer)
        bias_names = [self.weight_name(bias_of(r), layer) if b is not None else None
                      for r, b in zip((R.GATE, R.UP, R.DOWN), biases)]

        def q(role, weight, proj):
            return self.quantize(role, layer, weight, self.gb.path(f"mlp/{proj}/MatMul"))

        if not self.gated_mlp:
            up, down = self.mlp_weights(layer)[1:]
            names = tuple(self.initializer_name(r, layer) for r in (R.UP, R.DOWN))
            return plain_mlp(self.gb, "mlp", x, q(R.UP, up, "up_proj"),
                             q(R.DOWN, down, "down_proj"), names, biases[1:], bias_names[1:],
                             accuracy_level=level, conv=self.conv_projections,
                             activation=self.mlp_activation())
        names = tuple(self.initializer_name(r, layer) for r in (R.GATE, R.UP, R.DOWN))
        if self.packed:
            gate_up, down = self.packed_mlp_weights(layer)
            fused = self.weight_name(R.GATE_UP, layer) if R.GATE_UP in self.weight_names \
                else names[0].replace("gate_proj", "gate_up_proj")
            gate_up_bias = None if biases[0] is None else np.concatenate(biases[:2])
            return swiglu(self.gb, "mlp", x, None, None, q(R.DOWN, down, "down_proj"), names,
                          gate_up=(q(R.GATE_UP, gate_up, "gate_up_proj"), fused),
                          accuracy_level=level, conv=self.conv_projections,
                          activation=self.mlp_activation(), biases=(
                              gate_up_bias, None, biases[2]), bias_names=(
                              fused.removesuffix(".weight") + ".bias", None, bias_names[2]))
        gate, up, down = self.mlp_weights(layer)
        return swiglu(self.gb, "mlp", x, q(R.GATE, gate, "gate_proj"), q(R.UP, up, "up_proj"),
                      q(R.DOWN, down, "down_proj"), names, accuracy_level=level,
                      conv=self.conv_projections, activation=self.mlp_activation(),
                      biases=biases, bias_names=bias_names)

    def lm_head_bias(self) -> np.ndarray | None:
        """lm_head's bias (Phi-2's), where the table names one."""
        return self.weight(R.LM_HEAD_BIAS) if R.LM_HEAD_BIAS in self.weight_names else None

    def lm_head(self, x: str) -> str:
        """The projection to the vocabulary (lowered per target), then ``logits``."""
        return self.logits(self.lowering.lm_head_projection(x))

    def logits(self, x: str) -> str:
        """The final logits from lm_head's projection: soft-capped where
        ``final_logit_softcap`` says; an architecture that scales them (Granite) overrides
        this. (The accuracy report runs it on its fp32 reference logits too.)"""
        cap = self.final_logit_softcap()
        return x if cap is None else softcap(self.gb, "/lm_head/softcap", x, cap)
