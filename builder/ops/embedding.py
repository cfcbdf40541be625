"""Token embedding lookup."""

from __future__ import annotations

from builder.graph import GraphBuilder


def embedding(gb: GraphBuilder, name: str, input_ids: str, table: str) -> str:
    """Gather rows of ``table`` ([vocab, hidden] initializer) for ``input_ids``."""
    with gb.scope(name):
        return gb.node("Gather", [table, input_ids], axis=0)
