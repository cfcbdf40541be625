"""Linear projections, y = x @ W^T (+ b): float MatMul, or MatMulNBits for a QuantizedWeight."""

from __future__ import annotations

import numpy as np

from builder.graph import MS_DOMAIN, GraphBuilder
from builder.quant.base import QuantizedWeight
from builder.quant.qdq import QdqWeight


def quantized_initializers(gb: GraphBuilder, weight: QuantizedWeight, name: str) -> list[str]:
    """Store a quantized weight: [codes, scales(, zero points)] initializer names."""
    names = [gb.initializer(f"{name}_Q{weight.bits}", weight.data),
             gb.initializer(f"{name}_scales", weight.scales)]
    if weight.zero_points is not None:
        names.append(gb.initializer(f"{name}_zp", weight.zero_points))
    return names


def matmul_nbits(gb: GraphBuilder, x: str, weight: QuantizedWeight, stored: list[str],
                 accuracy_level: int) -> str:
    """com.microsoft MatMulNBits over already stored quantized initializers (the input's
    columns gathered into the weight's order first where it has its own: ``k_order``)."""
    if weight.k_order is not None:
        x = gb.node("Gather", [x, gb.constant(weight.k_order)], "Gather_k_order", axis=-1)
    return gb.node("MatMulNBits", [x, *stored], f"MatMul_Q{weight.bits}", domain=MS_DOMAIN,
                   K=weight.k, N=weight.n, bits=weight.bits, block_size=weight.block_size,
                   accuracy_level=accuracy_level)


def linear(gb: GraphBuilder, name: str, x: str, weight: np.ndarray | QuantizedWeight,
           weight_name: str, bias: np.ndarray | None = None, bias_name: str | None = None,
           accuracy_level: int = 4, conv: bool = False) -> str:
    """A Hugging Face Linear: ``weight`` is [out, in] as in the checkpoint, or its quantized form.
    ``conv``: as a 1x1 Conv over [1, in, 1, S] (static shapes, for NPUs that prefer it)."""
    with gb.scope(name):
        if conv:
            y = conv1x1(gb, x, weight, weight_name)
        elif isinstance(weight, QdqWeight):  # static QDQ graphs: DequantizeLinear → MatMul
            y = gb.node("MatMul", [x, gb.weight(weight_name, weight)])
        elif isinstance(weight, QuantizedWeight):
            y = matmul_nbits(gb, x, weight, quantized_initializers(gb, weight, weight_name),
                             accuracy_level)
        else:
            stored = weight_name in gb.store.written  # by another graph of the folder
            y = gb.node("MatMul", [x, gb.initializer(
                weight_name, None if stored else np.ascontiguousarray(weight.T))])
        if gb.lora is not None and not conv:
            n, k = (weight.n, weight.k) if isinstance(weight, QuantizedWeight) else weight.shape
            y = gb.lora(gb, x, y, weight_name, k, n)
        if bias is not None:
            b = gb.initializer(bias_name or weight_name.replace("weight", "bias"), bias)
            y = gb.node("Add", [y, b])
    return y


def linear_transposed(gb: GraphBuilder, name: str, x: str, table: str) -> str:
    """y = x @ table^T for an initializer already stored as [out, in] (a tied embedding table),
    so the table is stored once for both the lookup and the projection."""
    with gb.scope(name):
        return gb.node("FusedMatMul", [x, table], "MatMul", domain=MS_DOMAIN, transB=1,
                       alpha=1.0)


def conv1x1(gb: GraphBuilder, x: str, weight: np.ndarray | QdqWeight, weight_name: str) -> str:
    """[1, S, in] → Transpose → [1, in, 1, S] → Conv(W [out, in, 1, 1]) → back to [1, S, out]."""
    if isinstance(weight, QdqWeight):
        w = gb.weight(weight_name, weight)
    else:
        out_features, in_features = weight.shape
        w = gb.initializer(weight_name, weight.reshape(out_features, in_features, 1, 1))
    nchw = gb.node("Unsqueeze", [gb.node("Transpose", [x], perm=[0, 2, 1]), gb.constant([2])])
    y = gb.node("Conv", [nchw, w], "Conv", kernel_shape=[1, 1])
    return gb.node("Transpose", [gb.node("Squeeze", [y, gb.constant([2])])], "Transpose_1",
                   perm=[0, 2, 1])
