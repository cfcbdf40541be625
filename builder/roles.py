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
