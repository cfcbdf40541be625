"""Mixture of experts: onnxruntime's com.microsoft MoE (float experts) and QMoE (int4/int8).

The router's raw logits go in as ``router_probs``: the kernel takes the softmax over every
expert, picks the top k and (``normalize_routing_weights=1``) renormalizes their weights to sum
to 1; each picked expert computes down(silu(gate(x)) * up(x)) and the outputs are summed with
those weights. Facts of onnxruntime 1.32's CPU kernels that fix the layout (its op schema, and
the tests against transformers):

- gate and up are one fused FC1 whose rows interleave them (``swiglu_fusion=1``: gate row j,
  then up row j); the CPU kernels take no separate FC3.
- SwiGLU is G * sigmoid(alpha * G) * (L + beta): ``activation_alpha=1``, ``activation_beta=0``
  give the standard silu(gate) * up.
- QMoE weights are [experts, N, K * bits / 8], the codes of each row packed along K as
  MatMulNBits packs them, with scales [experts, N, K / block_size] (block-wise) and the default
  zero point 2^(bits-1) when none is given, which is what a symmetric quantizer writes.
- QMoE renormalizes the top-k weights whatever ``normalize_routing_weights`` says (also when
  ``router_weights`` is given); MoE honours it. Without renormalization (Qwen3-MoE's
  ``norm_topk_prob=false``) QMoE's output is therefore multiplied by the top k's share of the
  softmax, computed beside it: the same sum, exactly.
- 8-bit QMoE computes about 1% off its own dequantized weights (a 6.5e-3 error on outputs of
  0.5, with or without explicit zero points, any accuracy_level), where 4-bit is exact: the
  builder refuses 8-bit experts (``builder.models.moe``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from builder.graph import GraphBuilder

MS_DOMAIN = "com.microsoft"


def interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """[I, K] gate and up → [2I, K] with gate row j at 2j and up row j at 2j + 1."""
    out = np.empty((2 * gate.shape[0], *gate.shape[1:]), gate.dtype)
    out[0::2], out[1::2] = gate, up
    return out


@dataclass(frozen=True)
class SwiGLU:
    """The experts' activation: G * sigmoid(alpha * G) * (L + beta), with G clamped at
    ``limit`` from above and L to [-limit, limit] when a limit is given (GPT-OSS: alpha 1.702,
    beta 1, limit 7); the default is the standard silu(gate) * up."""

    alpha: float = 1.0
    beta: float = 0.0
    limit: float | None = None


def moe(gb: GraphBuilder, name: str, x: str, router_logits: str, fc1: list[str],
        fc2: list[str], *, k: int, normalize: bool, quantized: tuple[int, int, int] | None = None,
        accuracy_level: int = 0, biases: tuple[str, str] = ("", ""),
        swiglu: SwiGLU = SwiGLU()) -> str:
    """``x`` [B, S, hidden] and the router's logits [B, S, experts] → [B, S, hidden].

    ``fc1`` / ``fc2``: initializer names of the fused gate/up and of down: [weights] for float
    experts; [codes, scales] or [codes, scales, zero points] for ``quantized`` = (fc1 bits, fc2
    bits, block size). ``biases``: the experts' stacked fc1 [experts, 2I] (interleaved as fc1's
    rows) and fc2 [experts, hidden] biases ('': none)."""
    with gb.scope(name):
        # router_probs is [tokens, experts]
        experts_logits = gb.node("Flatten", [router_logits], "router/Flatten", axis=2)
        attrs = dict(k=k, normalize_routing_weights=int(normalize), activation_type="swiglu",
                     swiglu_fusion=1, activation_alpha=float(swiglu.alpha),
                     activation_beta=float(swiglu.beta))
        if swiglu.limit is not None:
            attrs["swiglu_limit"] = float(swiglu.limit)
        if quantized is None:
            inputs = [x, experts_logits, fc1[0], biases[0], fc2[0], biases[1]]
            while inputs[-1] == "":
                inputs.pop()
            return gb.node("MoE", inputs, "MoE", domain=MS_DOMAIN, **attrs)
        bits1, bits2, block = quantized
        attrs["normalize_routing_weights"] = 1  # what QMoE does in any case (above)
        zp1 = fc1[2] if len(fc1) > 2 else ""
        zp2 = fc2[2] if len(fc2) > 2 else ""
        inputs = [x, experts_logits, fc1[0], fc1[1], biases[0], fc2[0], fc2[1], biases[1], "",
                  "", "", zp1, zp2]
        while inputs[-1] == "":
            inputs.pop()
        extra = {} if bits1 == bits2 else dict(fc1_expert_weight_bits=bits1,
                                               fc2_expert_weight_bits=bits2)
        if accuracy_level:  # (0, the default, is left out: onnxruntime < 1.31 refuses it)
            extra["accuracy_level"] = accuracy_level
        out = gb.node("QMoE", inputs, "QMoE", domain=MS_DOMAIN, expert_weight_bits=bits1,
                      block_size=block, **attrs, **extra)
        if normalize:
            return out
        with gb.scope("top_k_share"):  # Σ of the k largest softmax weights, [B, S, 1]
            probs = gb.node("Softmax", [router_logits], axis=-1)
            top = gb.node("TopK", [probs, gb.constant([k])], outputs=2, axis=-1)[0]
            share = gb.node("ReduceSum", [top, gb.constant([-1])], keepdims=1)
        return gb.node("Mul", [out, share], "unnormalized/Mul")


def swiglu_of(gb: GraphBuilder, gate: str, up: str, swiglu: SwiGLU) -> str:
    """G * sigmoid(alpha * G) * (L + beta), G clamped at ``limit`` from above and L to
    [-limit, limit] when a limit is given: what the MoE kernels compute, from standard ops."""
    if swiglu.limit is not None:
        gate = gb.node("Min", [gate, gb.constant(swiglu.limit, np.float32)], "gate/Min")
        up = gb.node("Clip", [up, gb.constant(-swiglu.limit, np.float32),
                              gb.constant(swiglu.limit, np.float32)], "up/Clip")
    scaled = gate if swiglu.alpha == 1 else gb.node(
        "Mul", [gate, gb.constant(swiglu.alpha, np.float32)], "gate/alpha")
    act = gb.node("Mul", [gate, gb.node("Sigmoid", [scaled], "Sigmoid")], "gate/Mul")
    if swiglu.beta:
        up = gb.node("Add", [up, gb.constant(swiglu.beta, np.float32)], "up/beta")
    return gb.node("Mul", [act, up], "Mul")


def dense_experts(gb: GraphBuilder, name: str, x: str, router_logits: str, experts: list,
                  project, *, k: int, normalize: bool, swiglu: SwiGLU = SwiGLU(),
                  biases: tuple[np.ndarray, np.ndarray] | None = None) -> str:
    """What ``moe`` computes, for graphs without it (static NPU graphs): every expert on every
    token, weighted by its routing weight: the softmax over the router's logits, kept where
    it is among the k largest of its token (0 elsewhere), renormalized over those k with
    ``normalize``. ``experts``: (gate [I, K], up [I, K], down [K, I]) per expert;
    ``project(name, x, expert, weight, bias)`` writes one projection, ``name`` gate_proj,
    up_proj or down_proj (quantized as the build's policy says); ``biases``: fc1 [experts, 2I]
    (gate and up interleaved) and fc2 [experts, hidden], or None. A tie with the k-th weight
    keeps both (onnxruntime picks one): a measure-zero event for trained routers."""
    with gb.scope(name):
        probs = gb.node("Softmax", [router_logits], "router/Softmax", axis=-1)
        top = gb.node("TopK", [probs, gb.constant([k])], "router/TopK", outputs=2, axis=-1)[0]
        kth = gb.node("ReduceMin", [top, gb.constant([-1])], "router/kth", keepdims=1)
        picked = gb.node("Cast", [gb.node("GreaterOrEqual", [probs, kth], "router/picked")],
                         "router/Cast", to=gb.float_type)
        weights = gb.node("Mul", [probs, picked], "router/Mul")
        if normalize:
            total = gb.node("ReduceSum", [weights, gb.constant([-1])], "router/ReduceSum",
                            keepdims=1)
            weights = gb.node("Div", [weights, total], "router/Div")
        shares = gb.node("Split", [weights], "router/Split", outputs=len(experts), axis=-1,
                         num_outputs=len(experts))
        if len(experts) == 1:
            shares = [shares]
        out = None
        for e, ((gate, up, down), share) in enumerate(zip(experts, shares)):
            with gb.scope(str(e)):
                fc1 = (None, None) if biases is None else (biases[0][e, 0::2],
                                                            biases[0][e, 1::2])
                g = project("gate_proj", x, e, gate, fc1[0])
                u = project("up_proj", x, e, up, fc1[1])
                h = swiglu_of(gb, g, u, swiglu)
                y = project("down_proj", h, e, down, None if biases is None else biases[1][e])
                y = gb.node("Mul", [y, share], "weighted")
            out = y if out is None else gb.node("Add", [out, y], f"sum_{e}")
        return out
