"""MLPs: gated (Llama's SwiGLU, GeGLU) and not gated (``up → act → down``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from builder.graph import GraphBuilder
from builder.ops.linear import linear
from builder.quant.base import QuantizedWeight

Weight = np.ndarray | QuantizedWeight


ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


Activation = str | Callable[[GraphBuilder, str], str]


def activate(gb: GraphBuilder, x: str, activation: Activation) -> str:
    """silu (Sigmoid + Mul), gelu (erf) or gelu_tanh (the tanh approximation), as standard ONNX
    ops; or a function ``(gb, x) -> output`` that writes an activation of a plugin's own."""
    with gb.scope("act_fn"):
        if callable(activation):
            return activation(gb, x)
        if activation == "silu":
            return gb.node("Mul", [x, gb.node("Sigmoid", [x])])
        if activation in ("gelu", "gelu_tanh"):
            return gb.node("Gelu", [x], approximate="tanh" if activation == "gelu_tanh" else "none")
    raise ValueError(f"activation {activation!r}: one of {', '.join(ACTIVATIONS)}")


def relu2(gb: GraphBuilder, x: str) -> str:
    """Squared ReLU (transformers' ``relu2``: Nemotron, Arcee), as standard ONNX ops: an
    activation function for ``mlp_activation``."""
    r = gb.node("Relu", [x])
    return gb.node("Mul", [r, r])


def swiglu(gb: GraphBuilder, name: str, x: str, gate: Weight | None, up: Weight | None,
           down: Weight, names: tuple[str, str, str],
           gate_up: tuple[Weight, str] | None = None, accuracy_level: int = 4,
           conv: bool = False, activation: Activation = "silu",
           biases: tuple[np.ndarray | None, ...] = (None, None, None),
           bias_names: tuple[str | None, ...] = (None, None, None)) -> str:
    """down(act(gate(x)) * up(x)), the gated MLP (Llama's: SiLU; GeGLU with gelu / gelu_tanh).

    With ``gate_up`` = (weight [2 * intermediate, in], name), gate and up are one MatMul and a
    Split instead of two MatMuls (its bias, gate's and up's stacked, is ``biases[0]``).
    """
    with gb.scope(name):
        if gate_up is None:
            g = linear(gb, "gate_proj", x, gate, names[0], biases[0], bias_names[0],
                       accuracy_level=accuracy_level, conv=conv)
            u = linear(gb, "up_proj", x, up, names[1], biases[1], bias_names[1],
                       accuracy_level=accuracy_level, conv=conv)
        else:
            fused = linear(gb, "gate_up_proj", x, gate_up[0], gate_up[1], biases[0],
                           bias_names[0], accuracy_level=accuracy_level, conv=conv)
            with gb.scope("gate_up_proj"):
                g, u = gb.node("Split", [fused], outputs=2, axis=-1, num_outputs=2)
        h = gb.node("Mul", [activate(gb, g, activation), u])
        return linear(gb, "down_proj", h, down, names[2], biases[2], bias_names[2],
                      accuracy_level=accuracy_level, conv=conv)


def plain_mlp(gb: GraphBuilder, name: str, x: str, up: Weight, down: Weight,
              names: tuple[str, str], biases: tuple[np.ndarray | None, ...] = (None, None),
              bias_names: tuple[str | None, ...] = (None, None), accuracy_level: int = 4,
              conv: bool = False, activation: Activation = "gelu") -> str:
    """down(act(up(x))), the MLP without a gate (GPT-2's, Phi-2's fc1 → GELU → fc2)."""
    with gb.scope(name):
        h = linear(gb, "up_proj", x, up, names[0], biases[0], bias_names[0],
                   accuracy_level=accuracy_level, conv=conv)
        return linear(gb, "down_proj", activate(gb, h, activation), down, names[1], biases[1],
                      bias_names[1], accuracy_level=accuracy_level, conv=conv)
