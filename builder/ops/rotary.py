"""Rotary position embedding caches.

The cos/sin tables are computed here in numpy, exactly as Hugging Face computes its inverse
frequencies (float32 arithmetic), and handed to the attention op as initializers of shape
[max_positions, rotary_dim / 2]. Scaling schemes are selected by ``rope_type``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from builder.config import RopeConfig
from builder.errors import ConfigError
from builder.graph import GraphBuilder, batch_dim


@dataclass(frozen=True)
class RopeCache:
    cos: np.ndarray          # [positions, rotary_dim // 2], float32
    sin: np.ndarray
    rotary_dim: int
    # LongRoPE: a second table for sequences longer than ``switch_length`` (None otherwise)
    long: tuple[np.ndarray, np.ndarray] | None = None
    switch_length: int | None = None


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / np.power(np.float32(theta), exponents, dtype=np.float32)).astype(np.float32)


def _llama3(inv_freq: np.ndarray, p: dict) -> np.ndarray:
    """Llama 3.x: long wavelengths slowed by `factor`, a smooth blend in between."""
    try:
        factor = float(p["factor"])
        low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_len = float(p["original_max_position_embeddings"])
    except KeyError as e:
        raise ConfigError(f"rope_scaling type llama3 needs {e.args[0]!r}") from None
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _linear(inv_freq: np.ndarray, p: dict) -> np.ndarray:
    return (inv_freq / np.float32(p.get("factor", 1.0))).astype(np.float32)


_INV_FREQ_SCALERS = {"default": None, "llama3": _llama3, "linear": _linear}
LONGROPE = ("longrope", "su")


def _tables(inv_freq: np.ndarray, positions: int, scale: float = 1.0):
    freqs = np.arange(positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    return ((np.cos(freqs) * np.float32(scale)).astype(np.float32),
            (np.sin(freqs) * np.float32(scale)).astype(np.float32))


def _longrope(rope: RopeConfig, rotary_dim: int, max_positions: int,
              model_max_positions: int) -> RopeCache:
    """Phi-3 LongRoPE: per-frequency factors, short below the original context length and long
    above it, both tables scaled by the attention factor."""
    p = rope.params
    try:
        short, long = (np.asarray(p[k], np.float32) for k in ("short_factor", "long_factor"))
        original = int(p["original_max_position_embeddings"])
    except KeyError as e:
        raise ConfigError(f"rope type longrope needs {e.args[0]!r}") from None
    if short.shape != (rotary_dim // 2,) or long.shape != (rotary_dim // 2,):
        raise ConfigError(f"longrope short/long factors must have {rotary_dim // 2} entries")
    factor = p.get("factor") or model_max_positions / original
    scale = p.get("attention_factor")
    if scale is None:
        scale = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim
    base = np.power(np.float32(rope.theta), exponents, dtype=np.float32)
    cos, sin = _tables((1.0 / (short * base)).astype(np.float32), min(original, max_positions),
                       scale)
    long_tables = _tables((1.0 / (long * base)).astype(np.float32), max_positions, scale)
    return RopeCache(cos, sin, rotary_dim, long=long_tables, switch_length=original)


def _yarn(rope: RopeConfig, rotary_dim: int, max_positions: int,
          model_max_positions: int) -> RopeCache:
    """YaRN (GPT-OSS): each frequency blended between the original (extrapolated) and the
    factor-slowed (interpolated) one by a linear ramp over the dimensions whose wavelengths fall
    between beta_fast and beta_slow rotations of the original context (the ramp's ends floored
    and ceiled under ``truncate``, the default), both tables scaled by the attention factor
    (0.1 ln(factor) + 1 unless given), as transformers computes them."""
    p = rope.params
    # (transformers fills a missing original context with max_position_embeddings)
    original = float(p.get("original_max_position_embeddings") or model_max_positions)
    factor = p.get("factor") or model_max_positions / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    scale = p.get("attention_factor")
    if scale is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        scale = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction(rotations):
        return (rotary_dim * math.log(original / (rotations * 2 * math.pi))
                / (2 * math.log(rope.theta)))

    low, high = correction(fast), correction(slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim
    base = np.power(np.float32(rope.theta), exponents, dtype=np.float32)
    extrapolated = 1 - ramp.astype(np.float32)
    inv_freq = (1.0 / (np.float32(factor) * base)) * (1 - extrapolated) + \
        (1.0 / base) * extrapolated
    return RopeCache(*_tables(inv_freq.astype(np.float32), max_positions, scale), rotary_dim)


def rope_cache(rope: RopeConfig, head_dim: int, max_positions: int,
               model_max_positions: int | None = None) -> RopeCache:
    """cos/sin tables for positions [0, max_positions). ``model_max_positions`` (default
    max_positions) is the model's max_position_embeddings, which LongRoPE's scale depends on
    even when fewer positions are tabulated."""
    rotary_dim = round(head_dim * rope.partial_rotary_factor)  # whole, even: DecoderConfig
    if rope.type in LONGROPE:
        return _longrope(rope, rotary_dim, max_positions, model_max_positions or max_positions)
    if rope.type == "yarn":
        return _yarn(rope, rotary_dim, max_positions, model_max_positions or max_positions)
    if rope.type not in _INV_FREQ_SCALERS:
        raise ConfigError(f"rope type {rope.type!r} is not supported yet; supported: "
                          f"{', '.join((*_INV_FREQ_SCALERS, *LONGROPE, 'yarn'))}")
    inv_freq = _default_inv_freq(rope.theta, rotary_dim)
    scaler = _INV_FREQ_SCALERS[rope.type]
    if scaler is not None:
        inv_freq = scaler(inv_freq, rope.params)
    return RopeCache(*_tables(inv_freq, max_positions), rotary_dim)


T = TypeVar("T")


class RopeTables(Generic[T]):
    """What ``make(rope, suffix)`` gives once per distinct rotary config of the model: ``ropes``
    are every layer's (None: a layer without rotary), and the k-th distinct one in layer order
    gets suffix "" (k = 0) or "_k", so that a name means the same table in every graph of a
    pipeline (its parts share one data file); one set of tables serves every layer that rotates
    alike (Gemma 3's local and global layers differ). Made for the ropes of ``layers`` now,
    in layer order."""

    def __init__(self, ropes: list[RopeConfig | None], make: Callable[[RopeConfig, str], T],
                 layers: Iterable[int]) -> None:
        self.ropes, self.distinct = ropes, []
        for rope in ropes:
            if rope is not None and all(r != rope for r in self.distinct):
                self.distinct.append(rope)
        self.make, self.made = make, {}
        for layer in layers:
            self(ropes[layer])

    def __call__(self, rope: RopeConfig | None) -> T | None:
        if rope is None:
            return None
        k = next(k for k, r in enumerate(self.distinct) if r == rope)
        if k not in self.made:
            self.made[k] = self.make(rope, f"_{k}" if k else "")
        return self.made[k]


def interleaved_order(head_dim: int, rotary_dim: int) -> np.ndarray:
    """The order of a head's values that makes rotate-half rotary (pairs i, i + rotary_dim / 2)
    compute interleaved rotary (pairs 2i, 2i + 1): the even rotary dimensions, then the odd
    ones, then the unrotated rest as it is."""
    order = np.arange(head_dim)
    order[:rotary_dim] = np.concatenate([np.arange(0, rotary_dim, 2),
                                         np.arange(1, rotary_dim, 2)])
    return order


def position_ids(gb: GraphBuilder, tokens: str, attention_mask: str) -> str:
    """[B, S] positions of the current tokens, counted over the unmasked ones as transformers'
    generate() does: cumsum(mask) - 1, clipped at 0, last S columns."""
    with gb.scope("/model/position_ids"):
        seq_len = gb.node("Slice", [gb.node("Shape", [tokens]), gb.constant([1]),
                                    gb.constant([2])])
        cumsum = gb.node("CumSum", [attention_mask, gb.constant(1)])
        pos = gb.node("Max", [gb.node("Sub", [cumsum, gb.constant(1)]), gb.constant(0)])
        return gb.node("Slice", [pos, gb.node("Neg", [seq_len]), gb.constant([2**62]),
                                 gb.constant([1])])


def rotary(gb: GraphBuilder, name: str, x: str, cos: str, sin: str, positions: str, *,
           num_heads: int, rotary_dim: int) -> str:
    """ONNX RotaryEmbedding-23 on [B, S, heads * head_dim] (rotate-half layout, the first
    ``rotary_dim`` dims of each head rotated)."""
    with gb.scope(name):
        return gb.node("RotaryEmbedding", [x, cos, sin, positions], num_heads=num_heads,
                       rotary_embedding_dim=rotary_dim, interleaved=0)


def rotary_decomposed(gb: GraphBuilder, name: str, x: str, cos_cache: str, sin_cache: str,
                      positions: str, *, num_heads: int, head_dim: int, rotary_dim: int,
                      seq_len: int, batch: int | str = 1) -> str:
    """Rotate-half rotary from Gather/Slice/Mul/Add (int32 positions [B, S]), for targets that
    take neither contrib rotary nor int64 position arithmetic (the HTP). ``batch``: B, or a
    name for any batch."""
    half, b = rotary_dim // 2, batch_dim(batch)
    with gb.scope(name):
        heads = gb.node("Reshape", [x, gb.constant([b, seq_len, num_heads, head_dim])])
        cos = gb.node("Unsqueeze", [gb.node("Gather", [cos_cache, positions], "cos/Gather",
                                            axis=0), gb.constant([2])], "cos/Unsqueeze")
        sin = gb.node("Unsqueeze", [gb.node("Gather", [sin_cache, positions], "sin/Gather",
                                            axis=0), gb.constant([2])], "sin/Unsqueeze")
        sizes = [half, half] + ([head_dim - rotary_dim] if head_dim > rotary_dim else [])
        parts = gb.node("Split", [heads, gb.constant(sizes)], outputs=len(sizes), axis=-1)
        x1, x2 = parts[0], parts[1]
        first = gb.node("Sub", [gb.node("Mul", [x1, cos], "Mul_1"),
                                gb.node("Mul", [x2, sin], "Mul_2")])
        second = gb.node("Add", [gb.node("Mul", [x2, cos], "Mul_3"),
                                 gb.node("Mul", [x1, sin], "Mul_4")])
        rotated = gb.node("Concat", [first, second, *parts[2:]], axis=-1)
        return gb.node("Reshape", [rotated, gb.constant([b, seq_len, num_heads * head_dim])],
                       "Reshape_1")
