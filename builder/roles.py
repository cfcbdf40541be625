"""TensorRole: what a checkpoint tensor is for, independent of how an architecture names it."""

from __future__ import annotations

import enum


class TensorRole(enum.StrEnum):
    EMBED = "embed"
    ATTN_NORM = "attn_norm"
    Q = "q"
    K = "k"
    V = "v"
    QKV = "qkv"
    Q_BIAS = "q_bias"
    K_BIAS = "k_bias"
    V_BIAS = "v_bias"
    O = "o"
    O_BIAS = "o_bias"
    Q_NORM = "q_norm"
    K_NORM = "k_norm"
    MLP_NORM = "mlp_norm"
    GATE = "gate"
    UP = "up"
    GATE_UP = "gate_up"
    DOWN = "down"
    # mixture of experts: the router, and each expert's gated MLP (templates name "{e}")
    ROUTER = "router"
    EXPERT_GATE = "expert_gate"
    EXPERT_UP = "expert_up"
    EXPERT_DOWN = "expert_down"
    FINAL_NORM = "final_norm"
    LM_HEAD = "lm_head"
    # LayerNorm biases (a norm has one when the architecture's table names it), the MLP's
    # biases (mlp_bias, or an architecture that always has them) and lm_head's
    ATTN_NORM_BIAS = "attn_norm_bias"
    MLP_NORM_BIAS = "mlp_norm_bias"
    FINAL_NORM_BIAS = "final_norm_bias"
    Q_NORM_BIAS = "q_norm_bias"
    K_NORM_BIAS = "k_norm_bias"
    GATE_BIAS = "gate_bias"
    UP_BIAS = "up_bias"
    DOWN_BIAS = "down_bias"
    LM_HEAD_BIAS = "lm_head_bias"


# the packed tensor each part belongs to (q of qkv, gate of gate_up), in the order they stack
PACKED_IN = {TensorRole.Q: TensorRole.QKV, TensorRole.K: TensorRole.QKV,
             TensorRole.V: TensorRole.QKV, TensorRole.GATE: TensorRole.GATE_UP,
             TensorRole.UP: TensorRole.GATE_UP}


def bias_of(role: TensorRole | str) -> TensorRole | str:
    """The role of a norm's or projection's bias: ``attn_norm`` → ``attn_norm_bias``; an
    architecture's own role ``post_norm`` → ``post_norm_bias``."""
    name = f"{role}_bias"
    return TensorRole(name) if name in TensorRole._value2member_map_ else name
