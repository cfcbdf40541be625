"""A lazy, strict reader over single-file and sharded safetensors checkpoints.

Headers are read up front (names, shapes, dtypes, which shard holds what); tensor data is read one
tensor at a time, on request, each through a short-lived handle: safetensors maps the file, and
pages of a mapping that stays open count as resident memory until it closes, which would let the
process grow to the size of the checkpoint. Every read is recorded, so that after a build any tensor no code used
is reported: a silently mis-mapped weight is an error, not a wrong model.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open

from builder.errors import WeightError, did_you_mean
from builder.quant.base import QuantizedWeight
from builder.quant.prequantized import StoredCodes, StoredFormat
from builder.source import checkpoint_file

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
FLOAT_DTYPES = {"BF16", "F16", "F32"}


CHECK_ELEMENTS = 1 << 22  # values are checked a slice at a time: no tensor-sized temporary


def nonfinite(array: np.ndarray) -> int:
    """How many elements of ``array`` are NaN or infinite."""
    flat = array.reshape(-1)
    return sum(int(np.count_nonzero(~np.isfinite(flat[i:i + CHECK_ELEMENTS])))
               for i in range(0, flat.size, CHECK_ELEMENTS))


SAFETENSORS_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
                      "U8": np.uint8, "I32": np.int32, "I64": np.int64}  # (U8, I32, I64: a
# pre-quantized checkpoint's codes, scales, group indices and shapes)


class CheckpointReader:
    """Reads tensors by name from a folder of ``*.safetensors`` files, tracking what was used.

    A pre-quantized checkpoint (``stored``: GPTQ, AWQ, compressed-tensors) stores a quantized
    linear ``<base>`` as integer tensors in place of ``<base>.weight``: the reader serves
    ``<base>.weight`` as if it were stored, its values dequantized (exact in float32), and its
    codes as they are (``codes``)."""

    def __init__(self, folder: Path, stored: StoredFormat | None = None,
                 merged: tuple = (), apart: tuple = ()) -> None:
        self.folder = folder
        self.stored = stored
        self.merged = merged  # LoRA adapters (builder.lora.Adapter) merged into the weights
        self.apart = apart    # and kept apart: the graphs add their branches (LoraBranches)
        self._virtual: dict[str, str] = {}  # <base>.weight -> <base>, of a quantized linear
        self.stored_codes = None if stored is None else StoredCodes(self.codes)
        self._shard_files: list[Path] = []
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[str, tuple[int, ...]]] = {}  # name -> (dtype, shape)
        self._consumed: set[str] = set()
        self._checked: set[tuple[str, int, int]] = set()  # (name, first row, end row) read
        self._offsets: dict[str, int] = {}  # name -> byte offset of its data in its shard
        self._index: dict[str, str] | None = None
        for shard in self._shards():
            self._offsets.update(self._data_offsets(shard))
            with self._open(shard) as handle:
                for name in handle.keys():
                    if name in self._where:
                        raise WeightError(f"tensor {name!r} is stored twice: in "
                                          f"{self._where[name].name} and {shard.name}")
                    self._where[name] = shard
                    sl = handle.get_slice(name)
                    self._meta[name] = (sl.get_dtype(), tuple(sl.get_shape()))
            self._shard_files.append(shard)
        self._check_index()
        if stored is not None:
            self._find_quantized(stored)
        for adapter in (*merged, *apart):
            adapter.check(self.__contains__)
        logger.info("checkpoint: %d tensors in %d file(s)", len(self._where),
                    len(self._shard_files))

    # -- opening -------------------------------------------------------------------------
    def _shards(self) -> list[Path]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            weight_map = self._read_index(checkpoint_file(self.folder, INDEX_NAME))
            names = sorted(set(weight_map.values()))
            files = [checkpoint_file(self.folder, n) for n in names]
            missing = [n for n, f in zip(names, files) if not f.is_file()]
            if missing:
                raise WeightError(f"{index}: shard(s) {', '.join(missing)} listed but not found")
            return files
        files = [checkpoint_file(self.folder, p.name)
                 for p in sorted(self.folder.glob("*.safetensors"))]
        if not files:
            raise WeightError(f"{self.folder}: no *.safetensors files")
        return files

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise WeightError(f"{index}: malformed index ({e})") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) and v for v in weight_map.values()):
            raise WeightError(f"{index}: 'weight_map' must map tensor names to shard file names")
        self._index = weight_map
        return weight_map

    def _open(self, shard: Path):
        try:
            handle = safe_open(str(shard), framework="numpy")
        except Exception as e:  # safetensors raises its own error types for bad headers
            if "Cannot allocate memory" in str(e):  # (not the file's fault: the cli says so)
                raise MemoryError(str(e)) from None
            raise WeightError(f"{shard}: not a readable safetensors file ({e})") from None
        self._check_size(shard)
        return handle

    @staticmethod
    def _data_offsets(shard: Path) -> dict[str, int]:
        """Where each tensor's bytes start in ``shard`` (the safetensors header's data_offsets,
        counted from the end of the header)."""
        try:
            with open(shard, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if header_len > shard.stat().st_size - 8:
                    return {}  # (a damaged length: never read that much)
                header = json.loads(f.read(header_len))
            return {k: 8 + header_len + int(v["data_offsets"][0])
                    for k, v in header.items() if k != "__metadata__"}
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            return {}  # _open names what is wrong with the file

    @staticmethod
    def _check_size(shard: Path) -> None:
        """Catch truncated files at open time: the data section must cover every tensor."""
        with open(shard, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
        if shard.stat().st_size < 8 + header_len + end:
            raise WeightError(f"{shard}: truncated: header promises {8 + header_len + end} bytes, "
                              f"file has {shard.stat().st_size}")

    def _check_index(self) -> None:
        index = self._index
        if index is None:
            return
        for name, shard in index.items():
            if name not in self._where or self._where[name].name != shard:
                raise WeightError(f"{INDEX_NAME} says {name!r} is in {shard}, but it is not there")

    def _find_quantized(self, stored: StoredFormat) -> None:
        suffix = "." + stored.marker
        for name in [n for n in self._where if n.endswith(suffix)]:
            base = name[: -len(suffix)]
            weight = f"{base}.weight"
            if weight in self._where:
                raise WeightError(f"{base} is stored twice: as {weight!r} and quantized "
                                  f"({name!r})")
            for part in stored.parts(base, self.__contains__):
                self._locate(part)
            self._virtual[weight] = base
            self._meta[weight] = ("F32", stored.shape(base, self.shape, self._read_any,
                                                         self.__contains__))
        if not self._virtual:
            raise WeightError(f"{self.folder}: config.json says the checkpoint is quantized "
                              f"({stored.method}), but no tensor is named '*{suffix}'")
        logger.info("checkpoint: %d linear(s) quantized by %s (%s)", len(self._virtual),
                    stored.method, stored.description)

    # -- reading -------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._where or name in self._virtual

    def quantized(self, name: str) -> bool:
        """Whether ``name`` is a pre-quantized checkpoint's quantized linear."""
        return name in self._virtual

    def codes(self, name: str) -> QuantizedWeight:
        """A quantized linear's codes, scales and zero points as the checkpoint stores them,
        in MatMulNBits' layout; marks its tensors consumed."""
        base = self._virtual[name]
        weight = self.stored.read(base, self._read_any, self.__contains__)
        self._consumed.update(self.stored.parts(base, self.__contains__))
        if nonfinite(weight.scales):
            raise WeightError(f"tensor {base!r}'s scales hold NaN or infinite values: the "
                              "checkpoint is damaged")
        return weight

    def summary(self) -> dict | None:
        """For the manifest: a pre-quantized checkpoint's format, and which MatMul nodes kept
        its codes and which the build rounded (float in the checkpoint, or values an
        architecture changed); None for a float checkpoint."""
        if self.stored is None:
            return None
        codes = self.stored_codes
        return {**self.stored.summary(), "linears": len(self._virtual),
                "kept_codes": len(codes.kept), "rounded_by_build": dict(sorted(
                    codes.rounded.items()))}

    def _read_any(self, name: str) -> np.ndarray:
        """A whole tensor of any stored dtype (a quantized linear's parts)."""
        shard = self._locate(name)
        try:
            with safe_open(str(shard), framework="numpy") as handle:
                return handle.get_tensor(name)
        except Exception as e:
            raise WeightError(f"{shard}: cannot read tensor {name!r} ({e})") from None

    def names(self) -> list[str]:
        return sorted(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        self._locate(name)
        return self._meta[name][1]

    def dtype(self, name: str) -> str:
        self._locate(name)
        return self._meta[name][0]

    def _locate(self, name: str) -> Path:
        if name in self._virtual:
            return self._where[f"{self._virtual[name]}.{self.stored.marker}"]
        if name not in self._where:
            raise WeightError(f"tensor {name!r} not found in {self.folder}"
                              f"{did_you_mean(name, self._where)}")
        return self._where[name]

    def _checked_float(self, name: str, shape: tuple[int, ...] | None) -> Path:
        shard = self._locate(name)
        dtype = self.dtype(name)
        if dtype not in FLOAT_DTYPES:
            raise WeightError(f"tensor {name!r} in {shard.name} has dtype {dtype}; expected one "
                              f"of {', '.join(sorted(FLOAT_DTYPES))}")
        actual = self.shape(name)
        if shape is not None and actual != tuple(shape):
            raise WeightError(f"tensor {name!r} in {shard.name} has shape {list(actual)}; the "
                              f"config implies {list(shape)}")
        return shard

    def _check_finite(self, name: str, array: np.ndarray, start: int, stop: int) -> None:
        """NaN/inf are looked for at a tensor's (or a row range's) first read only: each weight
        is read several times in a QNN build."""
        if (name, 0, self.shape(name)[0]) in self._checked or (name, start, stop) in self._checked:
            return
        bad = nonfinite(array)
        if bad:
            raise WeightError(f"tensor {name!r} in {self._where[name].name} holds {bad} NaN or "
                              f"infinite value(s) of {array.size}: the checkpoint is damaged, and "
                              "a model built from it would compute NaN")
        self._checked.add((name, start, stop))

    def read(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Read one float tensor in its stored dtype (bf16, fp16 or fp32), checking its shape;
        marks it consumed. A pre-quantized linear's weight is its dequantized values, float32;
        a weight a merged LoRA adapter adapts is W + s B A, float32."""
        array = self._read(name, shape)
        module = name.removesuffix(".weight")
        for adapter in self.merged:
            if module in adapter.modules:
                delta = adapter.delta(module)
                if delta.shape != array.shape:
                    raise WeightError(f"adapter {adapter.name}: {module}'s LoRA gives "
                                      f"{list(delta.shape)}; the checkpoint's weight is "
                                      f"{list(array.shape)}")
                array = array.astype(np.float32) + delta
        return array

    def _read(self, name: str, shape: tuple[int, ...] | None) -> np.ndarray:
        shard = self._checked_float(name, shape)
        if name in self._virtual:
            return self.codes(name).dequantize()
        try:
            with safe_open(str(shard), framework="numpy") as handle:
                array = handle.get_tensor(name)
        except Exception as e:
            raise WeightError(f"{shard}: cannot read tensor {name!r} ({e})") from None
        self._check_finite(name, array, 0, array.shape[0] if array.ndim else 0)
        self._consumed.add(name)
        logger.debug("read %s %s %s from %s", name, self.dtype(name), list(array.shape),
                     shard.name)
        return array

    def rows(self, name: str, shape: tuple[int, ...] | None = None) -> Rows:
        """A float tensor (checked as ``read`` checks it) whose rows are read on indexing: a
        vocabulary table a slice at a time, never whole in memory."""
        shard = self._checked_float(name, shape)
        if any(name.removesuffix(".weight") in a.modules for a in self.merged):
            raise WeightError(f"a LoRA adapter adapts {name}, a table builder reads a slice at "
                              "a time (embeddings, lm_head): merging it is not supported")
        if name in self._virtual:
            return DequantizedRows(self.codes(name))
        self._consumed.add(name)
        return Rows(self, name, shard)

    def code_rows(self, name: str, shape: tuple[int, ...] | None = None) -> Rows:
        """A pre-quantized checkpoint's U8 tensor (packed codes, exponent scales), shape-checked
        and read a range of rows at a time."""
        shard = self._locate(name)
        if self.dtype(name) != "U8":
            raise WeightError(f"tensor {name!r} in {shard.name} has dtype {self.dtype(name)}; "
                              "expected U8 (packed codes or scales)")
        if shape is not None and self.shape(name) != tuple(shape):
            raise WeightError(f"tensor {name!r} in {shard.name} has shape "
                              f"{list(self.shape(name))}; the config implies {list(shape)}")
        self._consumed.add(name)
        return Rows(self, name, shard)

    def _read_rows(self, name: str, shard: Path, start: int, stop: int) -> np.ndarray:
        shape = self.shape(name)
        dtype = np.dtype(SAFETENSORS_DTYPES[self.dtype(name)])
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        array = np.empty((stop - start, *shape[1:]), dtype)
        try:
            with open(shard, "rb") as f:
                f.seek(self._offsets[name] + start * row)
                got = f.readinto(memoryview(array.reshape(-1).view(np.uint8)))
        except OSError as e:
            if e.errno == errno.ENOMEM:
                raise MemoryError(str(e)) from None
            raise WeightError(f"{shard}: cannot read tensor {name!r} ({e})") from None
        if got != array.nbytes:
            raise WeightError(f"{shard}: tensor {name!r} rows {start}:{stop} cut short")
        if array.dtype != np.uint8:
            self._check_finite(name, array, start, stop)
        logger.debug("read %s rows %d:%d from %s", name, start, stop, shard.name)
        return array

    def unused(self, ignored: tuple[str, ...] = ()) -> list[str]:
        return [n for n in self.names() if n not in self._consumed
                and not any(fnmatch.fnmatchcase(n, pat) for pat in ignored)]

    def check_all_consumed(self, ignored: tuple[str, ...] = ()) -> None:
        for adapter in self.merged:
            adapter.check_all_used()
        unused = self.unused(ignored)
        if unused:
            shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
            raise WeightError(f"{len(unused)} checkpoint tensor(s) not used by the build: {shown}; "
                              "the architecture mapping does not cover them")

    def files(self) -> list[Path]:
        return sorted(self._shard_files)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        pass


class Rows:
    """A checkpoint tensor read a range of rows at a time: ``rows[a:b]`` reads rows a to b of
    the file (``shape``, ``dtype`` and ``len`` as the array's)."""

    def __init__(self, reader: CheckpointReader, name: str, shard: Path) -> None:
        self.reader, self.name, self.shard = reader, name, shard
        self.shape = reader.shape(name)
        self.dtype = np.dtype(SAFETENSORS_DTYPES[reader.dtype(name)])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("Rows reads a contiguous range of rows: rows[start:stop]")
        start, stop, _ = rows.indices(self.shape[0])
        return self.reader._read_rows(self.name, self.shard, start, max(start, stop))


class DequantizedRows:
    """A pre-quantized table (a quantized lm_head) read as ``Rows`` are: ``rows[a:b]``
    dequantizes rows a to b (its codes are in memory, a quarter of the float table at 4 bits)."""

    def __init__(self, weight: QuantizedWeight) -> None:
        self.weight = weight
        self.shape = (weight.n, weight.k)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("DequantizedRows reads a contiguous range of rows: rows[start:stop]")
        start, stop, _ = rows.indices(self.shape[0])
        w = self.weight
        part = QuantizedWeight(w.data[start:stop], w.scales[start:stop], None if
                               w.zero_points is None else w.zero_points[start:stop], w.bits,
                               w.block_size, w.k, w.k_order)
        return part.dequantize()
