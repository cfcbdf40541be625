"""Put a folder's graphs back on one shared external-data file.

onnxruntime's quantizer writes each graph it quantizes with a data file of its own, and the
float weights it replaced stay behind in the shared file. ``repack`` rewrites the folder so that
every graph reads one file again: each external (or large inline) tensor is copied once, a
tensor that several graphs hold with the same name and bytes is stored once, and bytes no graph
references are gone. Tensors are streamed one at a time.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import onnx
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from builder.graph import ALIGN_THRESHOLD, ALLOCATION_GRANULARITY, INLINE_LIMIT

logger = logging.getLogger(__name__)


def _tensors(graph: onnx.GraphProto):
    """Initializers of a graph and of its subgraphs (If branches)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _tensors(g)


def _clear_values(tensor: onnx.TensorProto) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                  "uint64_data", "string_data"):
        tensor.ClearField(field)


def _read(folder: Path, tensor: onnx.TensorProto) -> bytes:
    info = ExternalDataInfo(tensor)
    with open(folder / info.location, "rb") as f:
        f.seek(info.offset or 0)
        return f.read(info.length) if info.length else f.read()


def repack(folder: Path, data_file: str) -> None:
    """Rewrite every ``*.onnx`` in ``folder`` to keep its large tensors in ``data_file`` only;
    data files no graph needs any more are removed."""
    graphs = sorted(folder.glob("*.onnx"))
    models = {path: onnx.load(str(path), load_external_data=False) for path in graphs}
    staged = folder / f"{data_file}.repack"
    stored: dict[tuple[str, bytes], tuple[int, int]] = {}
    sources: set[str] = set()
    with open(staged, "wb") as out:
        for model in models.values():
            for tensor in _tensors(model.graph):
                if uses_external_data(tensor):
                    sources.add(ExternalDataInfo(tensor).location)
                    data = _read(folder, tensor)
                elif tensor.ByteSize() >= INLINE_LIMIT:  # raw bytes, or typed fields
                    data = tensor.raw_data or numpy_helper.from_array(
                        numpy_helper.to_array(tensor)).raw_data
                    _clear_values(tensor)
                else:
                    continue
                key = (tensor.name, hashlib.sha256(data).digest())
                if key not in stored:
                    align = ALLOCATION_GRANULARITY if len(data) >= ALIGN_THRESHOLD else 64
                    out.write(b"\0" * (-out.tell() % align))
                    stored[key] = (out.tell(), len(data))
                    out.write(data)
                offset, length = stored[key]
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", data_file), ("offset", offset), ("length", length)):
                    tensor.external_data.add(key=k, value=str(v))
    for path, model in models.items():
        onnx.save_model(model, str(path))
    os.replace(staged, folder / data_file)
    for name in sources - {data_file}:
        (folder / name).unlink()
    logger.info("%s: %d tensors, %.1f MB, shared by %d graphs", data_file, len(stored),
                (folder / data_file).stat().st_size / 1e6, len(graphs))
