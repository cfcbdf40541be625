"""Soft-capping: x → cap * tanh(x / cap), as Gemma 2 caps attention scores and final logits."""

from __future__ import annotations

import numpy as np

from builder.graph import GraphBuilder


def softcap(gb: GraphBuilder, name: str, x: str, cap: float) -> str:
    with gb.scope(name):
        scaled = gb.node("Div", [x, gb.constant(cap, np.float32)])
        return gb.node("Mul", [gb.node("Tanh", [scaled]), gb.constant(cap, np.float32)])
