"""GraphBuilder: the only module that calls onnx.helper.

It hands out deterministic hierarchical names (``/model/layers.0/attn/q_proj/MatMul``), streams
initializers into one external data file as they are added (so a weight can be released right
after it is written), and records which operator domains the graph uses so that the model imports
only those.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from builder.errors import WeightError

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
OPSETS = {"": 23, MS_DOMAIN: 1}
IR_VERSION = 10

INLINE_LIMIT = 1024            # bytes; smaller tensors are stored inside model.onnx
ALIGN_THRESHOLD = 1 << 20      # tensors from 1 MiB up start on an allocation-granularity boundary
ALLOCATION_GRANULARITY = 1 << 16

CHUNK_BYTES = 16 << 20         # a large float weight is converted and written in slices of this

DTYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(ml_dtypes.bfloat16): TensorProto.BFLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
}


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype == ml_dtypes.bfloat16


def _check_range(name: str, converted: np.ndarray, source: np.ndarray) -> None:
    """A float weight stored in a narrower type (fp16) must not overflow to inf."""
    if np.isfinite(converted).all():
        return
    flat = source.reshape(-1)
    largest = max(float(np.abs(flat[i:i + (1 << 22)].astype(np.float32)).max())
                  for i in range(0, flat.size, 1 << 22))  # slices: no full-size temporary
    kind = np.dtype(converted.dtype)
    raise WeightError(f"weight {name!r}: its largest magnitude, {largest:g}, is above {kind}'s "
                      f"maximum {float(ml_dtypes.finfo(kind).max):g}, so it would be stored as "
                      "inf; "
                      "build this model with -p fp32 or bf16")


class WeightStore:
    """One external data file shared by several graphs: a tensor written for one graph is
    referenced, not written again, by the next graph that adds the same name."""

    def __init__(self, data_path: Path) -> None:
        self.data_path = data_path
        self.file = open(data_path, "wb")
        self.written: dict[str, TensorProto] = {}

    @contextlib.contextmanager
    def _named(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:  # a full disk: name the file that could not be written
            raise OSError(e.errno, e.strerror, str(self.data_path)) from None

    def write(self, data) -> None:
        with self._named():
            self.file.write(data)

    def flush(self) -> None:
        with self._named():
            self.file.flush()

    def close(self) -> None:
        if not self.file.closed:
            with self._named():
                self.file.close()


class GraphBuilder:
    """Collects nodes, I/O and initializers of one graph; writes weights as they come."""

    def __init__(self, name: str, data_path: Path | None = None, float_dtype=np.float32,
                 store: WeightStore | None = None) -> None:
        self.name = name
        self.float_dtype = np.dtype(float_dtype)  # every float weight is stored as this
        self._own_store = store is None
        self.store = store or WeightStore(data_path)
        self.data_path = self.store.data_path
        self._data = self.store.file
        self._scope: list[str] = []
        self._nodes: list[onnx.NodeProto] = []
        self._node_names: set[str] = set()
        self._inputs: list[onnx.ValueInfoProto] = []
        self._outputs: list[onnx.ValueInfoProto] = []
        self._initializers: list[TensorProto] = []
        self._initializer_names: set[str] = set()
        self._constants: dict[tuple, str] = {}
        self._domains: set[str] = set()

    # -- names ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Nest node names: ``with gb.scope("/model/layers.0"): ...`` ('' adds no level)."""
        self._scope.append(name if not name or name.startswith("/") else "/" + name)
        try:
            yield
        finally:
            self._scope.pop()

    def path(self, name: str) -> str:
        """The name a node called ``name`` would get here (before de-duplication)."""
        return "".join(self._scope) + (name if name.startswith("/") else "/" + name)

    def _node_name(self, name: str) -> str:
        full = self.path(name)
        base, i = full, 1
        while full in self._node_names:
            full = f"{base}_{i}"
            i += 1
        self._node_names.add(full)
        return full

    # -- nodes ---------------------------------------------------------------------------
    def node(self, op_type: str, inputs: Sequence[str], name: str | None = None, *,
             outputs: int | Sequence[str | None] = 1, domain: str = "",
             **attrs) -> str | list[str]:
        """Add a node; returns its output name (or list of names when outputs != 1).

        ``outputs`` may list names: None for an automatic name, '' for an unused optional output.
        """
        full = self._node_name(name or op_type)
        if isinstance(outputs, int):
            outputs = [None] * outputs
        out_names = [f"{full}/output_{i}" if o is None else o for i, o in enumerate(outputs)]
        self._nodes.append(helper.make_node(op_type, list(inputs), out_names, name=full,
                                            domain=domain or None, **attrs))
        self._domains.add(domain)
        return out_names[0] if len(out_names) == 1 else out_names

    def if_(self, name: str, cond: str, then_values: Sequence[str], else_values: Sequence[str],
            elem_type: int, shapes: Sequence[Sequence[int | str]]) -> list[str]:
        """An If node whose branches just forward outer-scope values (e.g. pick one of two
        constant tables at run time)."""
        full = self.path(name)
        branches = {}
        for tag, values in (("then", then_values), ("else", else_values)):
            outs = [f"{full}/{tag}/output_{i}" for i in range(len(values))]
            nodes = [helper.make_node("Identity", [v], [o], name=f"{full}/{tag}/Identity_{i}")
                     for i, (v, o) in enumerate(zip(values, outs))]
            branches[f"{tag}_branch"] = helper.make_graph(
                nodes, f"{name}_{tag}", [],
                [helper.make_tensor_value_info(o, elem_type, list(shape))
                 for o, shape in zip(outs, shapes)])
        return self.node("If", [cond], name, outputs=len(then_values), **branches)

    @property
    def float_type(self) -> int:
        """The ONNX element type of float weights and float graph I/O."""
        return DTYPES[self.float_dtype]

    # -- graph I/O -----------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self._inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Sequence[int | str]) -> None:
        """Expose ``value`` as graph output ``name`` (through an Identity when they differ)."""
        if value != name:
            self.node("Identity", [value], name.replace(".", "/") + "/Identity", outputs=[name])
        self._outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    # -- initializers --------------------------------------------------------------------
    def initializer(self, name: str, array: np.ndarray | None) -> str:
        """Add a tensor; large ones go straight to the external data file.

        Float arrays (bf16, fp16, fp32) are stored as ``float_dtype``, converted a slice at a
        time while written, so a large bf16 table never exists whole in fp32. ``array=None``
        references a tensor another graph already stored in the shared data file.
        """
        if name in self._initializer_names:
            raise ValueError(f"initializer {name!r} added twice")
        if name in self.store.written:  # already in the shared data file, from another graph
            self._initializer_names.add(name)
            self._initializers.append(self.store.written[name])
            return name
        if array is None:
            raise ValueError(f"initializer {name!r} is not stored yet")
        dtype = self.float_dtype if _is_float(array.dtype) else array.dtype
        if dtype not in DTYPES:
            raise TypeError(f"initializer {name!r}: unsupported dtype {array.dtype}")
        self._initializer_names.add(name)
        nbytes = array.size * dtype.itemsize
        narrowing = (_is_float(dtype) and _is_float(array.dtype)
                     and ml_dtypes.finfo(dtype).max < ml_dtypes.finfo(array.dtype).max)
        if nbytes < INLINE_LIMIT:
            array = np.ascontiguousarray(array, dtype=dtype)
            if narrowing:
                _check_range(name, array, array)
            tensor = numpy_helper.from_array(array, name)
            self._initializers.append(tensor)
            self.store.written[name] = tensor  # another graph may reference it by name
            return name
        tensor = TensorProto(name=name, data_type=DTYPES[dtype], dims=array.shape)
        offset = self._data.tell()
        align = ALLOCATION_GRANULARITY if nbytes >= ALIGN_THRESHOLD else 64
        if offset % align:
            self.store.write(b"\0" * (align - offset % align))
            offset = self._data.tell()
        rows = max(1, CHUNK_BYTES // max(1, nbytes // max(1, array.shape[0])))
        for start in range(0, max(1, array.shape[0]), rows):
            chunk = np.ascontiguousarray(array[start:start + rows], dtype=dtype)
            if narrowing:
                _check_range(name, chunk, array)
            self.store.write(chunk.reshape(-1).view(np.uint8).data)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(offset)),
                           ("length", str(nbytes))):
            tensor.external_data.add(key=key, value=value)
        self._initializers.append(tensor)
        self.store.written[name] = tensor
        return name

    def constant(self, values, dtype=np.int64) -> str:
        """A small constant tensor, shared by value and named after it (float ones are stored as
        ``float_dtype``)."""
        array = np.asarray(values, dtype=dtype)
        if _is_float(array.dtype):
            array = array.astype(self.float_dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            shown = "_".join(str(v) for v in array.ravel()[:8]) or "empty"
            name = f"/constants/{array.dtype.name}/{list(array.shape)}/{shown}"
            self._constants[key] = self.initializer(name, array)
        return self._constants[key]

    # -- output --------------------------------------------------------------------------
    def save(self, path: Path) -> onnx.ModelProto:
        """Write the model file beside the data file (and close the data file unless shared)."""
        if self._own_store:
            self.store.close()
        else:
            self.store.flush()
        graph = helper.make_graph(self._nodes, self.name, self._inputs, self._outputs,
                                  self._initializers)
        opsets = [helper.make_opsetid(d, OPSETS[d]) for d in sorted(self._domains)]
        model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION,
                                  producer_name="builder")
        onnx.save_model(model, str(path))
        logger.info("wrote %s: %d nodes, %d initializers, %.1f MB of weights", path.name,
                    len(self._nodes), len(self._initializers),
                    self.data_path.stat().st_size / 1e6)
        return model

    def close(self) -> None:
        if self._own_store:
            self.store.close()


def quantize_io(path: Path, ranges: dict[str, tuple[float, float]]) -> None:
    """Wrap the named graph inputs and outputs of a saved model in uint16 QuantizeLinear /
    DequantizeLinear pairs with the given (min, max) ranges, so that the ops between them form
    QDQ node units (an HTP runs those whole; the pairs at the graph's edge stay on the CPU)."""
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    before, after, new_inits = [], [], []  # Q/DQ pairs for inputs (first) and outputs (last)
    for name, (lo, hi) in sorted(ranges.items()):
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        scale = np.float32(max(hi - lo, 1e-8) / 65535)
        zero = np.uint16(np.clip(np.rint(-lo / scale), 0, 65535))
        s, z = f"{name}/qdq/scale", f"{name}/qdq/zero_point"
        new_inits += [numpy_helper.from_array(np.array(scale), s),
                      numpy_helper.from_array(np.array(zero), z)]
        is_input = any(v.name == name for v in g.input)
        raw, q, dq = (name, f"{name}/qdq/q", f"{name}/qdq/dq") if is_input else \
            (f"{name}/qdq/float", f"{name}/qdq/q", name)
        if is_input:  # consumers read the dequantized value
            for node in g.node:
                node.input[:] = [dq if i == name else i for i in node.input]
        else:  # the producer writes the float value, the pair writes the output
            for node in g.node:
                node.output[:] = [raw if o == name else o for o in node.output]
        (before if is_input else after).extend([
            helper.make_node("QuantizeLinear", [raw, s, z], [q], name=f"{name}/Q"),
            helper.make_node("DequantizeLinear", [q, s, z], [dq], name=f"{name}/DQ")])
    nodes = before + list(g.node) + after
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    onnx.save_model(model, str(path))
