"""The 8-bit KV cache's one grid per buffer: which tensors belong to a layer's K or V buffer (the
buffer itself and every value of its update chain in a transformer graph), the union of their
calibrated ranges, and the quantization parameters on that grid at 8 or 16 bits."""

from __future__ import annotations

import re

import numpy as np

from builder.quant.qdq import activation_params

KV_BUFFER = re.compile(r"^(?:past|present)_(key|value)_(\d+)$")
KV_CHAIN = re.compile(r"/layers\.(\d+)/(?:.*/)?([kv])_cache/")


def kv_group(name: str) -> tuple[int, str] | None:
    """(layer, "k" or "v") of a KV buffer (past_key_3, present_value_0) or a value of its
    update chain in a transformer graph (the ``k_cache`` / ``v_cache`` scope of write_kv); None
    for any other tensor."""
    m = KV_BUFFER.match(name)
    if m:
        return int(m.group(2)), m.group(1)[0]
    m = KV_CHAIN.search(name)
    return (int(m.group(1)), m.group(2)) if m else None


def tie_kv_ranges(ranges: dict[str, dict[str, tuple]]) -> None:
    """Each layer's K (and V) buffer and every value of its update chain, in every graph kind,
    over the union of their calibrated ranges: a row the graph leaves as it is then keeps its
    uint8 code from past to present (each 16-bit step inside is 1/257 of the 8-bit one), and the
    prefill graph's present is the decode graph's past byte for byte."""
    union: dict[tuple[int, str], tuple[float, float]] = {}
    for tensors in ranges.values():
        for name, r in tensors.items():
            group = kv_group(name)
            if group is not None:
                lo, hi = union.get(group, (r[0], r[1]))
                union[group] = (min(lo, r[0]), max(hi, r[1]))
    for tensors in ranges.values():
        for name, r in tensors.items():
            group = kv_group(name)
            if group is not None:
                tensors[name] = (*union[group], *r[2:])


def kv_params(lo: float, hi: float, bits: int, dtype=np.float32
              ) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) of a value of an 8-bit KV buffer's chain at ``bits``: the 8-bit
    parameters of [lo, hi], and at 16 bits exactly that grid refined 257 times (scale / 257,
    zero point x 257), so that every uint8 code is a uint16 code: a row passed through keeps
    its byte. The 8-bit parameters are the float16 buffers' own whatever ``dtype`` the value
    has: its zero point, rounded from a float32 scale, could differ by one from theirs (a
    chain of float32 values then shifted the top codes of rows it passed through)."""
    scale, zero = activation_params(lo, hi, 8, np.float16)  # (models.static.KV_TYPE)
    if bits == 8:
        return np.asarray(scale, dtype), zero
    return (np.asarray(np.float32(scale) / np.float32(257), dtype),
            np.asarray(int(zero) * 257, np.uint16))
