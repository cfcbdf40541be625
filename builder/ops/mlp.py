"""Gated MLPs."""

from __future__ import annotations

import numpy as np

from builder.graph import GraphBuilder
from builder.ops.linear import linear


def swiglu(gb: GraphBuilder, name: str, x: str, gate: np.ndarray, up: np.ndarray,
           down: np.ndarray, names: tuple[str, str, str]) -> str:
    """down(silu(gate(x)) * up(x)), the Llama MLP; SiLU as Sigmoid + Mul."""
    with gb.scope(name):
        g = linear(gb, "gate_proj", x, gate, names[0])
        u = linear(gb, "up_proj", x, up, names[1])
        with gb.scope("act_fn"):
            act = gb.node("Mul", [g, gb.node("Sigmoid", [g])])
        h = gb.node("Mul", [act, u])
        return linear(gb, "down_proj", h, down, names[2])
