"""Checkpoints that arrive quantized: GPTQ, AWQ and compressed-tensors linears.

config.json's ``quantization_config`` (or an older GPTQ folder's quantize_config.json) names the
format. A quantized Linear ``<base>`` is stored as integer tensors in place of ``<base>.weight``:

- GPTQ (``quant_method: gptq``): ``qweight`` int32 [K * bits / 32, N], codes packed along K, the
  lowest bits first; ``qzeros`` int32 [G, N * bits / 32], packed along N; ``scales`` [G, N];
  ``g_idx`` int32 [K], each input column's group (``desc_act`` orders the groups by activation,
  so a group's columns are not contiguous). ``checkpoint_format: gptq`` (the default, "v1")
  stores every zero point one less than it is; ``gptq_v2`` stores them as they are.
- AWQ (``quant_method: awq``, ``version: gemm``): ``qweight`` int32 [K, N / 8] and ``qzeros``
  int32 [G, N / 8], both packed along N in the order 0, 2, 4, 6, 1, 3, 5, 7; ``scales`` [G, N].
- compressed-tensors (``quant_method: compressed-tensors``, ``format: pack-quantized``):
  ``weight_packed`` int32 [N, K * bits / 32], packed along K, each code stored plus 2^(bits-1);
  ``weight_scale`` [N, G]; ``weight_zero_point`` int32 [N * bits / 32, G] (packed along N, also
  offset) when asymmetric; ``weight_shape`` [2]; ``weight_g_idx`` [K] from an activation-ordered
  GPTQ run.

Every format dequantizes as ``(code - zero point) * scale`` per (row, group), which is what
onnxruntime's MatMulNBits computes: ``read`` turns the tensors into a ``QuantizedWeight`` with the
checkpoint's own codes, scales and zero points (no rounding), its input columns in group order
(``k_order``) when the groups are not contiguous. Bits, groups and symmetry are read from each
tensor's shapes, so checkpoints that quantize some modules differently (GPTQModel's ``dynamic``,
several compressed-tensors config groups) read as they are stored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from builder.errors import ConfigError, WeightError
from builder.quant.base import QuantizedWeight, pack, unpack
from builder.quant.qdq import QdqWeight
from builder.roles import TensorRole as R
from builder.source import checkpoint_file

logger = logging.getLogger(__name__)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the packed position i holds column 8c + AWQ_ORDER[i]
MIN_BLOCK = 16  # MatMulNBits: a power of two, at least 16
MAX_BLOCK = 128  # larger groups (and one group a row) are stored in blocks of this size


@dataclass(frozen=True)
class StoredFormat:
    """How a checkpoint stores its quantized linears (from ``quantization_config``)."""

    method: str            # "gptq", "awq", "compressed-tensors"
    bits: int              # as the config says (each tensor's own are read from its shapes)
    group_size: int        # 0: one group per row
    zero_offset: int = 0   # GPTQ v1: stored zero points are one less than they are
    description: str = ""  # for log lines and the manifest
    symmetric: bool = False  # as the config says: every zero point 2^(bits - 1)

    def fits_qdq_blocks(self) -> bool:
        """Whether the static graphs' float-scale int4 blocks can hold the codes as they are
        (symmetric 4-bit; a group a power of two of at least 16, or one a row)."""
        size = self.group_size
        return self.symmetric and self.bits == 4 and (size == 0 or (
            size >= MIN_BLOCK and size & (size - 1) == 0))

    @property
    def marker(self) -> str:
        """The suffix that marks a quantized linear in place of ``weight``."""
        return "weight_packed" if self.method == "compressed-tensors" else "qweight"

    def parts(self, base: str, has: Callable[[str], bool]) -> list[str]:
        """The tensors ``base`` is stored as (the optional ones where present)."""
        if self.method == "compressed-tensors":
            names = ["weight_packed", "weight_scale", "weight_shape"]
            names += [n for n in ("weight_zero_point", "weight_g_idx") if has(f"{base}.{n}")]
        else:
            names = ["qweight", "qzeros", "scales"]
            names += ["g_idx"] if self.method == "gptq" and has(f"{base}.g_idx") else []
        return [f"{base}.{n}" for n in names]

    def shape(self, base: str, shape_of: Callable[[str], tuple[int, ...]],
              get: Callable[[str], np.ndarray], has: Callable[[str], bool]) -> tuple[int, int]:
        """[N, K] of ``base``'s weight, from its tensors' shapes (compressed-tensors: its
        weight_shape tensor)."""
        if self.method == "compressed-tensors":
            shape = get(f"{base}.weight_shape").reshape(-1)
            if shape.size != 2:
                raise WeightError(f"tensor {base}.weight_shape holds {shape.tolist()}; "
                                  "expected [N, K]")
            rows = shape_of(f"{base}.weight_packed")[0]
            if rows != int(shape[0]):
                raise WeightError(f"tensor {base}.weight_packed has {rows} rows; its "
                                  f"weight_shape says {int(shape[0])}")
            return int(shape[0]), int(shape[1])
        n = shape_of(f"{base}.scales")[-1]
        qweight = shape_of(f"{base}.qweight")
        packed_n = qweight[-1] * (8 if self.method == "awq" else 1)
        if len(qweight) != 2 or packed_n != n:
            raise WeightError(f"tensor {base}.scales has shape {list(shape_of(base + '.scales'))}"
                              f" and {base}.qweight {list(qweight)}: they disagree on the "
                              f"output features ({n} and {packed_n})")
        if self.method == "awq":
            return n, qweight[0]
        if has(f"{base}.g_idx"):
            return n, shape_of(f"{base}.g_idx")[0]
        return n, qweight[0] * 32 // self.bits

    def read(self, base: str, get: Callable[[str], np.ndarray],
             has: Callable[[str], bool]) -> QuantizedWeight:
        """``base``'s stored linear as MatMulNBits reads it, codes as they are."""
        reader = {"gptq": _gptq, "awq": _awq, "compressed-tensors": _compressed}[self.method]
        return to_blocks(base, *reader(self, base, get, has))

    def summary(self) -> dict:
        return {"method": self.method, "bits": self.bits,
                "group_size": self.group_size or "per channel", "format": self.description}


def stored_format(folder: Path, quantization_config: object) -> StoredFormat | None:
    """The checkpoint's format, or None for a float checkpoint; an error for a quantization
    builder does not read (naming it)."""
    q, source = quantization_config, "config.json"
    if q is None and (folder / "quantize_config.json").is_file():  # older GPTQ folders
        source = "quantize_config.json"
        try:
            q = json.loads(checkpoint_file(folder, source).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{folder / source}: not JSON ({e})") from None
        q = {"quant_method": "gptq", **q} if isinstance(q, dict) else q
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError(f"{source}: quantization_config must be an object, got {q!r}")
    method = q.get("quant_method")
    if method == "gptq":
        return _gptq_format(q, source)
    if method == "awq":
        return _awq_format(q, source)
    if method == "compressed-tensors":
        return _compressed_format(q, source)
    raise ConfigError(f"{source}: quantization_config quant_method={method!r}: builder reads "
                      "checkpoints quantized by gptq, awq and compressed-tensors "
                      "(pack-quantized); give a float checkpoint for others")


def _int(q: dict, key: str, source: str, default=None) -> int:
    v = q.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{source}: quantization_config {key}={v!r}: expected an integer")
    return v


def _bits(bits: int, source: str, method: str) -> int:
    if bits not in (4, 8):
        raise ConfigError(f"{source}: quantization_config bits={bits}: of {method} checkpoints "
                          "builder reads 4- and 8-bit ones (what MatMulNBits stores)")
    return bits


def _group(size: int, source: str) -> int:
    if size == -1:
        return 0
    if size <= 0:
        raise ConfigError(f"{source}: quantization_config group_size={size}: expected -1 (per "
                          "channel) or a positive size")
    return size


def _gptq_format(q: dict, source: str) -> StoredFormat:
    bits = _bits(_int(q, "bits", source), source, "gptq")
    group = _group(_int(q, "group_size", source, 128), source)
    fmt = q.get("checkpoint_format", q.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"{source}: quantization_config checkpoint_format={fmt!r}: builder "
                          "reads the gptq and gptq_v2 layouts (marlin, bitblas and others "
                          "are repacked for one kernel; save the model in the gptq format)")
    desc = "desc_act" if q.get("desc_act") else "groups in order"
    sym = bool(q.get("sym", True))
    return StoredFormat("gptq", bits, group, 1 if fmt == "gptq" else 0,
                        f"{fmt}, {'symmetric' if sym else 'asymmetric'}, {desc}",
                        sym and not q.get("desc_act"))


def _awq_format(q: dict, source: str) -> StoredFormat:
    bits = _bits(_int(q, "bits", source, q.get("w_bit", 4)), source, "awq")
    group = _group(_int(q, "group_size", source, q.get("q_group_size", 128)), source)
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise ConfigError(f"{source}: quantization_config version={version!r}: builder reads "
                          "AWQ's gemm packing (gemv and the kernel-specific ones differ)")
    if q.get("zero_point", True) is not True:
        raise ConfigError(f"{source}: quantization_config zero_point={q.get('zero_point')!r}: "
                          "builder reads AWQ checkpoints with zero points (the gemm default)")
    return StoredFormat("awq", bits, group, 0, "gemm, zero points")


def _compressed_format(q: dict, source: str) -> StoredFormat:
    fmt = q.get("format")
    if fmt != "pack-quantized":
        raise ConfigError(f"{source}: quantization_config format={fmt!r}: of compressed-tensors "
                          "checkpoints builder reads pack-quantized (integer weights)")
    if q.get("sparsity_config") or q.get("transform_config"):
        raise ConfigError(f"{source}: quantization_config has a sparsity or transform config: "
                          "builder reads compressed-tensors weights quantized alone")
    if q.get("kv_cache_scheme"):
        raise ConfigError(f"{source}: quantization_config kv_cache_scheme: a quantized KV cache "
                          "is not read from a checkpoint; give one without it")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"{source}: quantization_config config_groups: expected an object of "
                          "schemes")
    bits, sizes, symmetric = set(), set(), True
    for name, scheme in groups.items():
        w = scheme.get("weights") if isinstance(scheme, dict) else None
        if not isinstance(w, dict):
            raise ConfigError(f"{source}: quantization_config config_groups.{name}: no weights")
        if scheme.get("input_activations") or scheme.get("output_activations"):
            raise ConfigError(f"{source}: quantization_config config_groups.{name} quantizes "
                              "activations: builder reads weight-only schemes (w4a16, w8a16)")
        if w.get("type", "int") != "int" or w.get("strategy") not in ("group", "channel"):
            raise ConfigError(f"{source}: quantization_config config_groups.{name}: weights "
                              f"type={w.get('type')!r} strategy={w.get('strategy')!r}: builder "
                              "reads int weights with group or channel strategies")
        bits.add(_bits(_int(w, "num_bits", source), source, "compressed-tensors"))
        sizes.add(_int(w, "group_size", source) if w["strategy"] == "group" else 0)
        symmetric = symmetric and w.get("symmetric", True) is True and not w.get("actorder")
    return StoredFormat("compressed-tensors", max(bits), max(sizes), 0, "pack-quantized",
                        symmetric and len(bits) == 1)


# -- the formats' layouts ------------------------------------------------------------------
def _unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """int32 [..., W] → uint8 codes [..., W * 32 / bits], the lowest bits first."""
    u = words.view(np.uint32)
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    return ((u[..., None] >> shifts) & ((1 << bits) - 1)).astype(np.uint8).reshape(
        *u.shape[:-1], -1)


def _bits_of(base: str, packed_values: int, values: int) -> int:
    """The bits a tensor packs ``values`` codes in, from its packed size (32-bit words)."""
    for bits in (4, 8):
        if -(-values * bits // 32) == packed_values:
            return bits
    raise WeightError(f"{base}: {packed_values} packed 32-bit words for {values} codes: "
                      "neither 4 nor 8 bits a code")


def _check(name: str, array: np.ndarray, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    if array.shape != shape:
        raise WeightError(f"tensor {name!r} has shape {list(array.shape)}; expected "
                          f"{list(shape)}")
    if dtype == "int" and array.dtype.kind not in "iu":
        raise WeightError(f"tensor {name!r} has dtype {array.dtype}; expected int32")
    if dtype == "float" and array.dtype.kind != "f" and array.dtype.name != "bfloat16":
        raise WeightError(f"tensor {name!r} has dtype {array.dtype}; expected a float type")
    return array


def _groups_of(base: str, g_idx: np.ndarray | None, k: int, g: int, size: int) -> np.ndarray:
    """Each input column's group: the checkpoint's g_idx, else contiguous groups of ``size``
    (or one per row), checked against the G groups the scales have."""
    if g_idx is not None:
        groups = g_idx.astype(np.int64)
        if groups.min(initial=0) < 0 or groups.max(initial=0) >= g:
            raise WeightError(f"tensor {base}.g_idx names groups outside 0..{g - 1}")
        return groups
    size = size or k
    if -(-k // size) != g:
        raise WeightError(f"{base}: {g} groups of scales for {k} input columns; the config's "
                          f"group size {size} implies {-(-k // size)}")
    return np.arange(k) // size


def _gptq(fmt: StoredFormat, base: str, get, has):
    qweight, scales = get(f"{base}.qweight"), get(f"{base}.scales")
    g, n = scales.shape
    g_idx = get(f"{base}.g_idx") if has(f"{base}.g_idx") else None
    k = len(g_idx) if g_idx is not None else qweight.shape[0] * 32 // fmt.bits
    bits = _bits_of(f"{base}.qweight", qweight.shape[0], k)
    _check(f"{base}.qweight", qweight, (k * bits // 32, n), "int")
    _check(f"{base}.scales", scales, (g, n), "float")
    qzeros = _check(f"{base}.qzeros", get(f"{base}.qzeros"), (g, -(-n * bits // 32)), "int")
    codes = _unpack(qweight.T, bits)[:, :k]  # [N, K]: each row's words along K
    zeros = (_unpack(qzeros, bits)[:, :n].T + fmt.zero_offset) & ((1 << bits) - 1)
    return bits, codes, scales.T.astype(np.float32), zeros.astype(np.uint8), _groups_of(
        base, g_idx, k, g, fmt.group_size)


def _awq(fmt: StoredFormat, base: str, get, has):
    qweight, scales = get(f"{base}.qweight"), get(f"{base}.scales")
    g, n = scales.shape
    k = qweight.shape[0]
    _check(f"{base}.qweight", qweight, (k, n // 8), "int")
    _check(f"{base}.scales", scales, (g, n), "float")
    qzeros = _check(f"{base}.qzeros", get(f"{base}.qzeros"), (g, n // 8), "int")

    def columns(words):  # [rows, N / 8] → [rows, N] in column order
        packed = _unpack(words, 4).reshape(words.shape[0], -1, 8)
        out = np.empty_like(packed)
        out[:, :, list(AWQ_ORDER)] = packed
        return out.reshape(words.shape[0], -1)
    return (4, columns(qweight).T, scales.T.astype(np.float32), columns(qzeros).T,
            _groups_of(base, None, k, g, fmt.group_size))


def _compressed(fmt: StoredFormat, base: str, get, has):
    packed, scale = get(f"{base}.weight_packed"), get(f"{base}.weight_scale")
    n, k = fmt.shape(base, lambda name: get(name).shape, get, has)
    bits = _bits_of(f"{base}.weight_packed", packed.shape[-1], k)
    _check(f"{base}.weight_packed", packed, (n, -(-k * bits // 32)), "int")
    g = scale.shape[-1] if scale.ndim == 2 else 0
    _check(f"{base}.weight_scale", scale, (n, g), "float")
    codes = _unpack(packed, bits)[:, :k]
    mid = 1 << (bits - 1)
    if has(f"{base}.weight_zero_point"):
        zp = _check(f"{base}.weight_zero_point", get(f"{base}.weight_zero_point"),
                    (-(-n * bits // 32), g), "int")
        zeros = _unpack(zp.T, bits)[:, :n].T  # packed along N: stored plus 2^(bits-1), as codes
    else:
        zeros = np.full((n, g), mid, np.uint8)
    g_idx = get(f"{base}.weight_g_idx") if has(f"{base}.weight_g_idx") else None
    size = -(-k // g) if g > 1 else 0
    return bits, codes, scale.astype(np.float32), zeros, _groups_of(base, g_idx, k, g, size)


def to_blocks(base: str, bits: int, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
              groups: np.ndarray) -> QuantizedWeight:
    """Codes [N, K], scales and zero points [N, G] and each column's group [K] → MatMulNBits'
    blocks: the columns in group order (``k_order`` where that is not their own), each group
    cut into blocks of the largest power of two that divides its size (16 to MAX_BLOCK), the
    group's scale and zero point repeated over its blocks; one group a row in blocks of
    MAX_BLOCK."""
    n, k = codes.shape
    g = scales.shape[1]
    order = np.argsort(groups, kind="stable")
    counts = np.bincount(groups, minlength=g)
    if g == 1:
        block, per_group = MAX_BLOCK, -(-k // MAX_BLOCK)
    else:
        size = int(counts[0])
        if np.any(counts[:-1] != size) or not 0 < counts[-1] <= size:
            raise WeightError(f"{base}: groups of {sorted(set(counts.tolist()))} columns; "
                              "MatMulNBits stores groups of one size (the last may be short)")
        block = min(size & -size, MAX_BLOCK)  # the largest power of two dividing the size
        if block < MIN_BLOCK:
            raise WeightError(f"{base}: group size {size}: MatMulNBits blocks are powers of "
                              f"two of at least {MIN_BLOCK}, and none divides it")
        per_group = size // block
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), np.uint8)
    padded[:, :k] = codes[:, order]
    group_of = np.arange(blocks) // per_group
    block_zeros = zeros[:, group_of]
    symmetric = bool(np.all(block_zeros == 1 << (bits - 1)))
    k_order = None if np.array_equal(order, np.arange(k)) else order.astype(np.int64)
    return QuantizedWeight(pack(padded, bits).reshape(n, blocks, -1),
                           np.ascontiguousarray(scales[:, group_of], np.float32),
                           None if symmetric else pack(block_zeros, bits), bits, block, k,
                           k_order)


def reblocked(weight: QuantizedWeight, block: int) -> QuantizedWeight | None:
    """``weight`` in blocks of ``block`` columns, exactly (each new block within one scale and
    zero point of the old: a smaller block, or a larger one over equal scales); None where a
    new block would straddle two scales."""
    if block == weight.block_size:
        return weight
    n, k, bits = weight.n, weight.k, weight.bits
    codes = unpack(weight.data.reshape(n, -1), bits)[:, :k]
    per_column = np.repeat(np.arange(weight.scales.shape[1]), weight.block_size)[:k]
    mid = np.full(weight.scales.shape, 1 << (bits - 1), np.uint8)
    zeros = mid if weight.zero_points is None else \
        unpack(weight.zero_points, bits)[:, :weight.scales.shape[1]]
    blocks = -(-k // block)
    pad = blocks * block - k
    columns = np.pad(per_column, (0, pad), mode="edge").reshape(blocks, block)
    if np.any(weight.scales[:, columns] != weight.scales[:, columns[:, :1]]) or np.any(
            zeros[:, columns] != zeros[:, columns[:, :1]]):
        return None
    first = columns[:, 0]
    padded = np.zeros((n, blocks * block), np.uint8)
    padded[:, :k] = codes
    return QuantizedWeight(pack(padded, bits).reshape(n, blocks, -1),
                           np.ascontiguousarray(weight.scales[:, first]),
                           None if weight.zero_points is None else pack(zeros[:, first], bits),
                           bits, block, k, weight.k_order)


def as_qdq(weight: QuantizedWeight, block: int) -> QdqWeight | None:
    """A symmetric 4-bit weight as the static graphs' float-scale int4 blocks of ``block``
    (codes minus 8, the same scales), exactly; None where it is not symmetric 4-bit in input
    order, or its groups do not cut into such blocks."""
    if weight.bits != 4 or weight.zero_points is not None or weight.k_order is not None:
        return None
    w = reblocked(weight, block)
    if w is None or w.k % block:
        return None
    codes = unpack(w.data.reshape(w.n, -1), 4)[:, :w.k].astype(np.int8) - 8
    return QdqWeight.of(np.ascontiguousarray(codes.T), np.ascontiguousarray(w.scales.T), 4,
                        block)


# -- finding a weight's rows among the stored ones ------------------------------------------
def _row_keys(values: np.ndarray) -> list[bytes]:
    rows = np.ascontiguousarray(values, np.float32)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


class StoredCodes:
    """The checkpoint's own codes for a weight an architecture assembled from stored rows.

    An architecture reads a quantized linear as float (its dequantized values, exact in
    float32) and may reorder its rows (interleaved rotary), stack several (q, k and v), or take
    some of them (a fused tensor split): every such weight is made of the stored rows, so each
    of its rows is looked up among the dequantized rows of the layer's stored tensors, and the
    codes, scales and zero points of the rows found are the weight MatMulNBits gets. A weight
    whose rows are not all found, or come from linears stored differently, is not: the
    caller rounds it again, and ``rounded`` says which and why. One layer's stored tensors
    are indexed at a time."""

    def __init__(self, read: Callable[[str], QuantizedWeight]) -> None:
        self._read = read
        self._names: tuple[str, ...] = ()
        self._parts: list[QuantizedWeight] = []
        self._index: dict[bytes, tuple[int, int]] = {}
        self.kept: list[str] = []               # nodes stored with the checkpoint's codes
        self.rounded: dict[str, str] = {}       # node -> why the build rounded it

    def find(self, weight: np.ndarray, names: list[str]) -> tuple[QuantizedWeight | None, str]:
        """(the stored codes of ``weight``, "kept"); or (None, why not): "float" (none of its
        rows is stored quantized), "changed" (some rows are not the stored ones), "mixed" (its
        rows come from linears stored with different bits, blocks or column orders)."""
        if tuple(names) != self._names:
            self._names, self._parts, self._index = tuple(names), [], {}
            for i, name in enumerate(names):
                part = self._read(name)
                self._parts.append(part)
                for r, key in enumerate(_row_keys(part.dequantize())):
                    self._index.setdefault(key, (i, r))
        found = [self._index.get(key) for key in _row_keys(weight)] \
            if weight.dtype == np.float32 else []
        if not any(f is not None for f in found):
            return None, "float"
        if any(f is None for f in found):
            return None, "changed"
        parts = [self._parts[i] for i in sorted({i for i, _ in found})]
        first = parts[0]
        if any((p.bits, p.block_size, p.k) != (first.bits, first.block_size, first.k)
               or not _same_order(p.k_order, first.k_order) for p in parts):
            return None, "mixed"
        mid = 1 << (first.bits - 1)

        def zeros(p: QuantizedWeight) -> np.ndarray:
            if p.zero_points is not None:
                return p.zero_points
            return pack(np.full(p.scales.shape, mid, np.uint8), p.bits)
        pick = [(self._parts[i], r) for i, r in found]
        data = np.stack([p.data[r] for p, r in pick])
        scales = np.stack([p.scales[r] for p, r in pick])
        zps = None if all(p.zero_points is None for p in parts) else \
            np.stack([zeros(p)[r] for p, r in pick])
        return QuantizedWeight(data, scales, zps, first.bits, first.block_size, first.k,
                               first.k_order), "kept"


def _same_order(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None
                                         and np.array_equal(a, b))


def checkpoint_codes(builder, layer: int | None, weight: np.ndarray, node: str, bits: int,
                     fits=None) -> QuantizedWeight | QdqWeight | None:
    """A pre-quantized checkpoint's own codes for the weight ``builder`` is about to store at
    ``bits`` in ``node``, found by its rows among ``layer``'s stored linears (``StoredCodes``):
    as MatMulNBits stores them (cpu, cuda), or as the static graphs' float-scale int4 blocks
    (qnn_int4_format=float_block: symmetric codes). None where the checkpoint is float, the
    graph's grid is not the checkpoint's (LPBQ, int8, Conv), the weight is not made of stored
    rows, or ``fits(codes)`` cannot give them the layout the node stores (QMoE's experts: one
    block size): then the build rounds it, and the manifest names it."""
    codes = getattr(builder.weights, "stored_codes", None)
    p = builder.policy
    if codes is None:
        return None
    if p.qdq_conv is not None:  # static QDQ weights: float-scale int4 blocks only
        if bits != 4 or p.qdq_conv or p.lpbq:
            return None
        fits = functools.partial(as_qdq, block=p.block_size)
    names = builder.layer_weight_names(layer) if layer is not None else [
        builder.weight_name(r) for r in (R.LM_HEAD, R.EMBED) if r in builder.weight_names]
    names = [n for n in names if builder.weights.quantized(n)]
    if not names:
        return None
    found, why = codes.find(weight, names)
    if found is not None and fits is not None:  # (the layout the node takes, or None)
        found = fits(found)
        why = why if found is not None else "layout"
    if found is not None:
        codes.kept.append(node)
    else:
        codes.rounded[node] = why
    return found
