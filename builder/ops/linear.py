"""Linear projections: y = x @ W^T (+ b), with W stored as [in, out] for MatMul."""

from __future__ import annotations

import numpy as np

from builder.graph import MS_DOMAIN, GraphBuilder


def linear(gb: GraphBuilder, name: str, x: str, weight: np.ndarray, weight_name: str,
           bias: np.ndarray | None = None, bias_name: str | None = None) -> str:
    """A Hugging Face Linear: ``weight`` is [out, in] as in the checkpoint."""
    w = gb.initializer(weight_name, np.ascontiguousarray(weight.T))
    with gb.scope(name):
        y = gb.node("MatMul", [x, w])
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
