"""Weight-only quantizers, registered through the ``register_quantizers`` hook like any plugin
(entry point ``quant`` in pyproject.toml)."""

from __future__ import annotations

from builder.hookspecs import hookimpl
from builder.quant.base import Quantizer, QuantizedWeight
from builder.quant.kquant import KQuantQuantizer
from builder.quant.policy import QuantPolicy
from builder.quant.rtn import RtnQuantizer

__all__ = ["KQuantQuantizer", "QuantPolicy", "QuantizedWeight", "Quantizer", "RtnQuantizer"]


@hookimpl
def register_quantizers(register):
    register(RtnQuantizer)
    register(KQuantQuantizer)
