"""Sparse mixture of experts: the shared template of Qwen3-MoE, Mixtral, OLMoE, Granite-MoE,
Qwen3.5-MoE and GPT-OSS.

The Llama block whose MLP, in the layers the config makes sparse, is a router (a float linear
layer to one logit per expert) and ``experts`` gated MLPs, the top k of which each token runs,
their outputs summed with the router's softmax weights (renormalized over the k or not):
onnxruntime's MoE / QMoE (``builder.ops.moe``). Every expert's weights are roles of their own
(``{e}`` in the name templates), so each one is read, shape-checked, quantized and counted as
consumed; the stacked [experts, N, K] initializers are written an expert at a time.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np

from builder.config import DecoderConfig
from builder.errors import ConfigError
from builder.models.llama import LlamaBuilder
from builder.ops import interleave, moe
from builder.ops.moe import SwiGLU
from builder.options import QDQ_PRECISIONS
from builder.quant.base import QuantizedWeight, pack
from builder.quant.prequantized import checkpoint_codes, reblocked
from builder.roles import TensorRole as R
from builder.weights import SAFETENSORS_DTYPES

logger = logging.getLogger(__name__)


def expert_weight_names(block: str, gate: str, up: str, down: str) -> dict[R, str]:
    """The router and expert name templates of a sparse MLP at ``model.layers.{i}.<block>``:
    its router ``gate``, and each expert's ``experts.{e}.<gate|up|down>`` projections."""
    prefix = f"model.layers.{{i}}.{block}"
    return {R.ROUTER: f"{prefix}.gate.weight",
            **{role: f"{prefix}.experts.{{e}}.{name}.weight" for role, name in (
                (R.EXPERT_GATE, gate), (R.EXPERT_UP, up), (R.EXPERT_DOWN, down))}}


class MoeBuilder(LlamaBuilder):
    """Subclasses name their config fields and add ROUTER / EXPERT_* name templates."""
    config_keys = frozenset({"num_experts", "num_local_experts", "num_experts_per_tok",
                             "moe_intermediate_size"})

    # config.json keys of the expert count, in order of preference (transformers maps
    # num_experts to num_local_experts and writes the latter)
    experts_fields: ClassVar[tuple[str, ...]] = ("num_experts", "num_local_experts")
    expert_size_field: ClassVar[str | None] = "moe_intermediate_size"  # None: intermediate_size

    # -- the config's routing --------------------------------------------------------------
    @classmethod
    def experts_field(cls, c: DecoderConfig) -> str:
        given = [k for k in cls.experts_fields if c.extra.get(k) is not None]
        if len({c.extra[k] for k in given}) > 1:
            raise ConfigError(f"config.json: {' and '.join(f'{k}={c.extra[k]}' for k in given)} "
                              "disagree")
        return given[0] if given else cls.experts_fields[0]

    @classmethod
    def num_experts(cls, c: DecoderConfig) -> int:
        return c.extra[cls.experts_field(c)]

    @classmethod
    def expert_size(cls, c: DecoderConfig) -> int:
        return c.extra[cls.expert_size_field] if cls.expert_size_field else c.intermediate_size

    def top_k(self) -> int:
        return self.config.extra["num_experts_per_tok"]

    def normalize_top_k(self) -> bool:
        """Whether the k picked weights are renormalized to sum to 1."""
        return True

    def swiglu(self) -> SwiGLU:
        """The experts' activation (GPT-OSS: alpha, beta and a clamp); the standard SwiGLU."""
        return SwiGLU()

    def router_bias(self, layer: int) -> tuple[np.ndarray, str] | None:
        """(values, tensor name) of the router's bias; None: none."""
        return None

    def expert_biases(self, layer: int) -> tuple[str, str]:
        """Initializer names of the experts' stacked fc1 [experts, 2I] (gate and up
        interleaved) and fc2 [experts, hidden] biases; '' where there is none."""
        return ("", "")

    @classmethod
    def layer_weight_shapes(cls, c: DecoderConfig, layer: int) -> list[tuple[R, tuple[int, ...]]]:
        """The dense layer's weights, plus every expert's gate, up and down and the router
        (counted in every layer: an upper bound where some layers are dense), for a static
        pipeline's parts, whose graphs hold every expert."""
        experts, h, i = cls.num_experts(c), c.hidden_size, cls.expert_size(c)
        return [*super().layer_weight_shapes(c, layer), (R.ROUTER, (experts, h)),
                (R.EXPERT_GATE, (experts * i, h)), (R.EXPERT_UP, (experts * i, h)),
                (R.EXPERT_DOWN, (experts * h, i))]

    def expert_bias_values(self, layer: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The experts' fc1 [experts, 2I] (gate and up interleaved) and fc2 [experts, hidden]
        biases as values (the static graphs' dense experts); None: none."""
        return None

    def sparse(self, layer: int) -> bool:
        """Whether ``layer``'s MLP is the experts (else the dense MLP)."""
        return True

    def experts(self, layer: int) -> range:
        return range(self.num_experts(self.config)) if self.sparse(layer) else range(0)

    @classmethod
    def role_shape(cls, c: DecoderConfig, role: R) -> tuple[int, ...]:
        h = c.hidden_size
        if role in (R.ROUTER, R.EXPERT_GATE, R.EXPERT_UP, R.EXPERT_DOWN):
            size = cls.expert_size(c)
            return {R.ROUTER: (cls.num_experts(c), h), R.EXPERT_GATE: (size, h),
                    R.EXPERT_UP: (size, h), R.EXPERT_DOWN: (h, size)}[role]
        return super().role_shape(c, role)

    def check_supported(self) -> None:
        super().check_supported()
        c = self.config
        for key in (self.experts_field(c), "num_experts_per_tok", self.expert_size_field):
            if key and c.integer(key) is None:
                raise ConfigError(f"config.json: {key} must be a positive integer, got none")
        if self.mlp_activation() != "silu":
            raise ConfigError(f"config.json: hidden_act {c.hidden_act!r}: onnxruntime's MoE "
                              "experts are SwiGLU (silu) only here")
        if self.top_k() > self.num_experts(c):
            raise ConfigError(f"config.json: num_experts_per_tok={self.top_k()} is more than "
                              f"the {self.num_experts(c)} experts")
        if self.target.static_shapes and self.options.precision in QDQ_PRECISIONS:
            raise ConfigError(f"{c.architecture} (mixture of experts) on -e {self.target.name} "
                              f"-p {self.options.precision}: the routing runs on quantized "
                              "activations there, and a token's k-th and next expert weights "
                              "that quantize alike flip which experts run (a trained tiny "
                              "Qwen3-MoE at w8a16: mean logit cosine 0.964 against fp32, the "
                              "HTP against the CPU EP 0.990); build it with -p fp16")
        sparse = [i for i in range(c.num_hidden_layers) if self.sparse(i)]
        logger.info("experts: %d per sparse layer (%d of %d layers), top %d%s", self.num_experts(c),
                    len(sparse), c.num_hidden_layers, self.top_k(),
                    ", renormalized" if self.normalize_top_k() else "")

    # -- dataflow ----------------------------------------------------------------------------
    def mlp(self, layer: int, x: str) -> str:
        if not self.sparse(layer):
            return super().mlp(layer, x)
        gb = self.gb
        with gb.scope("mlp"):
            router = self.project("gate", x, R.ROUTER, layer, self.weight(R.ROUTER, layer),
                                  self.weight_name(R.ROUTER, layer),
                                  *(self.router_bias(layer) or (None, None)))
            return self.lowering.experts(layer, x, router)

    def routed_experts(self, layer: int, x: str, router: str) -> str:
        """The experts as onnxruntime's MoE / QMoE run them (cpu, cuda: the picked k only)."""
        gb = self.gb
        node = gb.path("experts/MoE")
        bits = (self.policy.bits_for(R.EXPERT_GATE, layer, node),
                self.policy.bits_for(R.EXPERT_DOWN, layer, node))
        prefix = self.weight_name(R.ROUTER, layer).rsplit(".", 2)[0] + ".experts"
        if bits == (None, None):
            fc1 = [self._float_stack(f"{prefix}.gate_up_proj", layer, True)]
            fc2 = [self._float_stack(f"{prefix}.down_proj", layer, False)]
            quantized = None
        else:
            if None in bits:
                raise ConfigError(f"{node}: the quantization policy keeps only one of the "
                                  "experts' projections in float, which QMoE cannot run")
            if 8 in bits:
                raise ConfigError(f"{node}: 8-bit experts are not supported: onnxruntime's "
                                  "QMoE computes them about 1% off their own weights "
                                  "(4-bit is exact); build them with -p int4, or keep them "
                                  f"in float with int4_nodes_to_exclude={node}")
            fc1 = self._quantized_stack(f"{prefix}.gate_up_proj", layer, True, bits[0])
            fc2 = self._quantized_stack(f"{prefix}.down_proj", layer, False, bits[1])
            quantized = (*bits, self.policy.block_size)
        return moe(gb, "experts", x, router, fc1, fc2, k=self.top_k(),
                   normalize=self.normalize_top_k(), quantized=quantized,
                   accuracy_level=self.policy.accuracy_level,
                   biases=self.expert_biases(layer), swiglu=self.swiglu())

    def stacked_expert(self, role, layer: int, expert: int) -> np.ndarray:
        """One expert of a tensor that stacks them ([experts, ...] under one name: ``role``),
        read alone."""
        stack = self.weights.rows(self.weight_name(role, layer), self.expected_shape(role))
        return stack[expert:expert + 1][0]

    def stacked_expert_weight(self, layer: int, expert: int, fused: bool, gate_up,
                              down) -> np.ndarray:
        """``expert_weight`` for a checkpoint that stacks gate and up as [experts, 2I, hidden]
        (gate's rows, then up's) and down as [experts, hidden, I]."""
        w = self.stacked_expert(gate_up if fused else down, layer, expert)
        return interleave(*np.split(w, 2)) if fused else w

    def expert_weight(self, layer: int, expert: int, fused: bool) -> np.ndarray:
        """One expert's FC1 (gate and up rows interleaved, [2I, hidden]) or FC2 (down,
        [hidden, I]), as stored."""
        if not fused:
            return self.weight(R.EXPERT_DOWN, layer, expert)
        return interleave(self.weight(R.EXPERT_GATE, layer, expert),
                          self.weight(R.EXPERT_UP, layer, expert))

    def expert_dtype(self, layer: int, fused: bool) -> str:
        """The checkpoint's dtype of ``layer``'s experts (safetensors' name: "BF16")."""
        return self.weights.dtype(self.weight_name(
            R.EXPERT_GATE if fused else R.EXPERT_DOWN, layer, 0))

    def _float_stack(self, name: str, layer: int, fused: bool) -> str:
        role = R.EXPERT_GATE if fused else R.EXPERT_DOWN
        n, k = self.expected_shape(role)
        shape = (len(self.experts(layer)), 2 * n if fused else n, k)
        stored = SAFETENSORS_DTYPES[self.expert_dtype(layer, fused)]
        parts = (self.expert_weight(layer, e, fused) for e in self.experts(layer))
        return self.gb.stacked_initializer(name, shape, stored, parts)

    def _quantized_stack(self, name: str, layer: int, fused: bool, bits: int) -> list[str]:
        """Codes [experts, N, K * bits / 8] written an expert at a time; their scales
        [experts, N, K / block] (and zero points) kept until then: a layer's worth."""
        role = R.EXPERT_GATE if fused else R.EXPERT_DOWN
        n, k = self.expected_shape(role)
        n = 2 * n if fused else n
        block = self.policy.block_size
        if k % block:
            raise ConfigError(f"{self.weight_name(role, layer, 0)}: QMoE needs the input size "
                              f"({k}) to be a multiple of int4_block_size={block}")
        quantizer = self.policy.quantizer(bits)
        scales, zero_points = [], []

        def fits(q: QuantizedWeight) -> QuantizedWeight | None:  # every expert one layout
            q = reblocked(q, block) if (q.bits, q.k_order) == (bits, None) else None
            return q if q is not None and (q.zero_points is None
                                           or not quantizer.symmetric) else None

        def codes():
            for e in self.experts(layer):
                w = self.expert_weight(layer, e, fused)
                q = checkpoint_codes(self, layer, w, f"{name}/expert_{e}", bits, fits)
                if q is None:
                    q = quantizer.quantize(w)
                elif q.zero_points is None and not quantizer.symmetric:
                    mid = np.full(q.scales.shape, 1 << (bits - 1), np.uint8)
                    q = QuantizedWeight(q.data, q.scales, pack(mid, bits), bits, block, q.k)
                scales.append(q.scales)
                if q.zero_points is not None:
                    zero_points.append(q.zero_points)
                yield q.data.reshape(n, -1)

        count = len(self.experts(layer))
        out = [self.gb.stacked_initializer(f"{name}.qweight", (count, n, k * bits // 8),
                                           np.uint8, codes())]
        out.append(self.gb.initializer(f"{name}.scales", np.stack(scales)))
        if zero_points:
            out.append(self.gb.initializer(f"{name}.qzeros", np.stack(zero_points)))
        return out
