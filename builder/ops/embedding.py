"""Token embedding lookup: a float Gather, or GatherBlockQuantized on a quantized table."""

from __future__ import annotations

from builder.graph import MS_DOMAIN, GraphBuilder
from builder.quant.base import QuantizedWeight


def embedding(gb: GraphBuilder, name: str, input_ids: str, table: str) -> str:
    """Gather rows of ``table`` ([vocab, hidden] initializer) for ``input_ids``."""
    with gb.scope(name):
        return gb.node("Gather", [table, input_ids], axis=0)


def embedding_quantized(gb: GraphBuilder, name: str, input_ids: str, weight: QuantizedWeight,
                        stored: list[str]) -> str:
    """GatherBlockQuantized over a table stored for MatMulNBits ([vocab, blocks, blob]): the
    codes are viewed as [vocab, padded hidden * bits / 8], so one copy serves both ops."""
    with gb.scope(name):
        codes = gb.node("Reshape", [stored[0], gb.constant([weight.n, -1])])
        out = gb.node("GatherBlockQuantized", [codes, input_ids, *stored[1:]],
                      domain=MS_DOMAIN, bits=weight.bits, block_size=weight.block_size,
                      gather_axis=0, quantize_axis=1)
        padded = weight.data.shape[1] * weight.block_size
        if padded != weight.k:  # hidden size not a whole number of blocks
            out = gb.node("Slice", [out, gb.constant([0]), gb.constant([weight.k]),
                                    gb.constant([-1])])
        return out
