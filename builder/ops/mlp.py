"""Gated MLPs."""

from __future__ import annotations

import numpy as np

from builder.graph import GraphBuilder
from builder.ops.linear import linear


def swiglu(gb: GraphBuilder, name: str, x: str, gate: np.ndarray | None, up: np.ndarray | None,
           down: np.ndarray, names: tuple[str, str, str],
           gate_up: tuple[np.ndarray, str] | None = None) -> str:
    """down(silu(gate(x)) * up(x)), the Llama MLP; SiLU as Sigmoid + Mul.

    With ``gate_up`` = (weight [2 * intermediate, in], name), gate and up are one MatMul and a
    Split instead of two MatMuls.
    """
    with gb.scope(name):
        if gate_up is None:
            g = linear(gb, "gate_proj", x, gate, names[0])
            u = linear(gb, "up_proj", x, up, names[1])
        else:
            fused = linear(gb, "gate_up_proj", x, gate_up[0], gate_up[1])
            with gb.scope("gate_up_proj"):
                g, u = gb.node("Split", [fused], outputs=2, axis=-1, num_outputs=2)
        with gb.scope("act_fn"):
            act = gb.node("Mul", [g, gb.node("Sigmoid", [g])])
        h = gb.node("Mul", [act, u])
        return linear(gb, "down_proj", h, down, names[2])
