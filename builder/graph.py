"""GraphBuilder: the only module that calls onnx.helper.

It hands out deterministic hierarchical names (``/model/layers.0/attn/q_proj/MatMul``), streams
initializers into one external data file as they are added (so a weight can be released right
after it is written), and records which operator domains the graph uses so that the model imports
only those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from builder.errors import WeightError
from builder.output import writing
from builder.quant.kv import KV_BUFFER, kv_group, kv_params
from builder.quant.qdq import QdqWeight, activation_params, pack_int4

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
    np.dtype(np.uint16): TensorProto.UINT16,
}


FLOAT_ELEM_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
# ops that only move values: in a QDQ graph their output keeps their input's quantization
# parameters (the HTP's Gather refuses others: "backendValidateOpConfig failed", 3110)
SAME_AS_INPUT = frozenset({"Gather", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Split",
                           "Slice", "Tile", "Expand", "Flatten", "Identity"})


PROJECTION_VALUES = "projection values"  # GraphBuilder.save's expose: those values only
WITH_PROJECTIONS = "with projection values"  # expose=True's values and those


def batch_dim(batch: int | str) -> int:
    """The batch axis in a Reshape's shape: the number, or 0 (copy the input's) for a graph of
    any batch (``batch`` a dimension name)."""
    return batch if isinstance(batch, int) else 0


# ops whose output range is fixed by the op, not by the data: no headroom; at 16 bits they take
# that whole range (a calibrated Softmax maximum below 1 clipped a sharper row of held-out text)
BOUNDED = {"Softmax": (0.0, 1.0), "Sigmoid": (0.0, 1.0), "Tanh": (-1.0, 1.0)}
HEADROOM_SCOPES = ("/mlp/",)  # the values that get headroom (DecoderBuilder.headroom_scopes)


@dataclasses.dataclass
class Qdq:
    """What makes a GraphBuilder write a calibrated QDQ graph: unsigned ``bits``-bit activations
    with the calibrated ``ranges`` ({tensor name: (min, max)}: every float tensor of the graph,
    by its deterministic name), float initializers stored quantized. ``headroom``: the ranges
    of the values under ``scopes`` (the MLP's, ...) are widened by this factor around 0
    (``min * h, max * h``), but those of BOUNDED ops; see ``Calibrated``."""
    bits: int
    ranges: dict[str, tuple[float, float]]
    headroom: float = 1.0
    kv_bits: int = 16  # 8: the KV buffers are uint8 graph inputs and outputs (see Calibrated)
    scopes: tuple[str, ...] = HEADROOM_SCOPES

    def range(self, value: str, op_type: str | None) -> tuple[float, float]:
        """The range ``value`` (computed by an ``op_type`` node; None: a graph input) is
        quantized over."""
        lo, hi = self.ranges[value][:2]
        if op_type in BOUNDED:
            if self.bits < 16:
                return lo, hi
            return min(lo, BOUNDED[op_type][0]), max(hi, BOUNDED[op_type][1])
        if any(scope in value for scope in self.scopes) or (
                self.kv_bits == 16 and kv_group(value) is not None):
            return lo * self.headroom, hi * self.headroom
        return lo, hi


@dataclasses.dataclass(frozen=True)
class Calibrated:
    """A calibrated build's activations: ``bits``, the ranges of each graph kind ({kind:
    {tensor: (min, max)}}: "context", "iterator", "lm_head_context", "lm_head_iterator") and the
    headroom every graph applies to them.

    Headroom: calibration sees a few dozen prompts, and a value beyond its range is clipped.
    The MLP's values follow the token more than any other (a layer-0 MLP product is nearly a
    function of the token's embedding), so a token the calibration text never held can exceed
    their ranges: on a trained tiny Qwen3, one token's layer-0 MLP product clipped took a
    decode step's logit cosine from 0.9999 to 0.994. At 16 bits a range twice as wide costs one
    bit of 65536 steps and removes that (measured on the CPU EP and the HTP; README). Only the
    MLP's, the values an architecture names alike (``scopes``, from
    ``DecoderBuilder.headroom_scopes``: LFM2's short convolutions, Granite 4.0-H's gated norm)
    and, with a 16-bit KV cache, each layer's K and V buffers and their update chains: a key
    beyond the cache's range stays clipped for every later token (a trained tiny Llama at
    w8a16, calibrated on its own data: worst step 0.99673 on the HTP, 0.99999 with them wide).
    Every range widened cost accuracy on the HTP (phi3 w8a16 mean cosine 0.9995 to 0.9982,
    measured before the attention products were split into 8-bit parts), and so did Qwen3.5's
    convolution (min step cosine 0.99984 to 0.99951). At 8 bits the step matters more: w8a8
    and the 8-bit KV cache keep the calibrated ranges."""
    bits: int
    ranges: dict[str, dict[str, tuple[float, float]]]
    headroom: float = 1.0
    kv_bits: int = 16  # 8: each layer's K and V buffers are uint8 graph inputs and outputs,
    # past and present (of every graph kind) over one range: the runtime hands a present's
    # bytes to the next call as its past, so they must mean the same values (tie_kv_ranges)
    scopes: tuple[str, ...] = HEADROOM_SCOPES

    def graph(self, kind: str) -> Qdq:
        return Qdq(self.bits, self.ranges[kind], self.headroom, self.kv_bits, self.scopes)


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
        # float initializers stored as codes (QDQ graphs): their (scale, zero point)
        self.quantized: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.dq_attrs: dict[str, dict] = {}  # QDQ weights: their DequantizeLinear's attributes

    def _named(self):  # a full disk: name the file that could not be written
        return writing(self.data_path)

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
                 store: WeightStore | None = None, qdq: Qdq | None = None,
                 dequantized_weights: bool = False) -> None:
        self.name = name
        self.qdq = qdq
        # QDQ weights stored as the float32 values their DequantizeLinear computes (codes x
        # scale: the same numbers), for graphs that run on the CPU EP only (calibration's):
        # onnxruntime dequantizes a constant weight at every run, not once
        self.dequantized_weights = dequantized_weights and np.dtype(float_dtype) == np.float32
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
        self._dequantized: dict[str, tuple] = {}  # DequantizeLinear output → (scale, zero)
        # values a QDQ graph adds after calibration, with the range and width they take
        # (lo, hi, bits, on the 8-bit KV grid): see ops.attention.activation_matmul
        self.narrow: dict[str, tuple[float, float, int, bool]] = {}
        # LoRA adapters kept apart (builder.lora.LoraBranches): called by every projection
        # with (graph, input, output, weight name, in, out) to add its branch
        self.lora = None

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
    def initializer(self, name: str, array: np.ndarray | None, quantize: bool = True) -> str:
        """Add a tensor; large ones go straight to the external data file.

        Float arrays (bf16, fp16, fp32) are stored as ``float_dtype``, converted a slice at a
        time while written, so a large bf16 table never exists whole in fp32. ``array=None``
        references a tensor another graph already stored in the shared data file. In a QDQ
        graph a float array is stored as activation-type codes over its own range
        (``quantize=False``: as float, for quantization scales) and the name returned is its
        DequantizeLinear's output.
        """
        if self.qdq is not None and quantize and (
                name in self.store.quantized if array is None else _is_float(array.dtype)):
            return self._quantized_initializer(name, array)
        return self._initializer(name, array)

    def _quantized_initializer(self, name: str, array: np.ndarray | None) -> str:
        names = (f"{name}_quantized", f"{name}_scale", f"{name}_zero_point")
        if array is None or name in self.store.quantized:
            for n in names:
                self._initializer(n, None)
        else:
            a = np.asarray(array, np.float32)
            scale, zero = activation_params(a.min(initial=0.0), a.max(initial=0.0),
                                            self.qdq.bits, self.float_dtype)
            qmax = np.iinfo(zero.dtype).max
            codes = np.clip(np.rint(a / scale) + zero, 0, qmax).astype(zero.dtype)
            self._initializer(names[0], codes)
            self._initializer(names[1], scale)
            self._initializer(names[2], zero)
            self.store.quantized[name] = (scale, zero)
        out = self._dequantize(name, *names)
        self._dequantized[out] = self.store.quantized[name]
        return out

    def _dequantize(self, name: str, codes: str, scale: str, zero: str, **attrs) -> str:
        out = f"{name}_DequantizeLinear_Output"
        full = self._node_name("/" + f"{name}_DequantizeLinear".lstrip("/"))
        self._nodes.append(helper.make_node("DequantizeLinear", [codes, scale, zero], [out],
                                            name=full, **attrs))
        return out

    def weight(self, name: str, weight: QdqWeight) -> str:
        """A projection's QDQ weight: codes, scales and zero points stored (referenced when
        another graph of the folder stored them), and the DequantizeLinear that reads them.
        LPBQ: the block scales are themselves a DequantizeLinear of the uint8 multipliers by
        the per-channel scale (axis 1), the pattern the QNN EP fuses."""
        names = (f"{name}_quantized", f"{name}_scale", f"{name}_zero_point")
        lpbq = (f"{name}_scale_multipliers", f"{name}_channel_scale",
                f"{name}_channel_zero_point")
        if self.dequantized_weights:
            return self._initializer(name, None if name in self.store.written else
                                     weight.dequantize().reshape(weight.codes.shape))
        if names[0] in self.store.written:
            stored = lpbq if lpbq[0] in self.store.written else names[1:2]
            for n in (names[0], names[2], *stored):
                self._initializer(n, None)
            if stored is lpbq:
                names = (names[0], self._dequantize(names[1], *lpbq, axis=1), names[2])
            return self._dequantize(name, *names, **self.store.dq_attrs[name])
        if weight.lpbq:
            self._initializer(lpbq[0], weight.multipliers)
            self._initializer(lpbq[1], weight.channel_scales)
            self._initializer(lpbq[2], np.zeros(weight.channel_scales.shape, np.uint8))
            names = (names[0], self._dequantize(names[1], *lpbq, axis=1), names[2])
        if weight.bits == 4:
            self._initializer(names[0], pack_int4(weight.codes), TensorProto.INT4,
                              weight.codes.shape)
            self._initializer(names[2], pack_int4(np.zeros(weight.scales.shape, np.int8)),
                              TensorProto.INT4, weight.scales.shape)
        else:
            self._initializer(names[0], weight.codes)
            self._initializer(names[2], np.zeros(weight.scales.shape, np.int8))
        if not weight.lpbq:
            self._initializer(names[1], weight.scales)
        attrs = {"axis": weight.axis}
        if weight.block_size:
            attrs["block_size"] = weight.block_size
        self.store.dq_attrs[name] = attrs
        return self._dequantize(name, *names, **attrs)

    def _initializer(self, name: str, array: np.ndarray | None, elem_type: int | None = None,
                     dims: Sequence[int] | None = None) -> str:
        """``elem_type`` and ``dims``: ``array`` holds the packed bytes of a tensor of that type
        and shape (INT4)."""
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
            array = np.ascontiguousarray(array, dtype=dtype).reshape(np.shape(array))
            if narrowing:
                _check_range(name, array, array)
            if elem_type is None:
                tensor = numpy_helper.from_array(array, name)
            else:
                tensor = TensorProto(name=name, data_type=elem_type, dims=list(dims),
                                     raw_data=array.tobytes())
            self._initializers.append(tensor)
            self.store.written[name] = tensor  # another graph may reference it by name
            return name
        rows = max(1, CHUNK_BYTES // max(1, nbytes // max(1, array.shape[0])))
        chunks = (array[start:start + rows] for start in range(0, max(1, array.shape[0]), rows))
        return self._external(name, elem_type or DTYPES[dtype], dtype,
                              array.shape if dims is None else list(dims), nbytes, chunks,
                              narrowing, array)

    def stacked_initializer(self, name: str, shape: Sequence[int], dtype,
                            parts: Iterator[np.ndarray]) -> str:
        """A [count, ...] tensor written to the data file one part at a time, as ``parts``
        yields them (each [...] or [k, ...]; float ones stored as ``float_dtype``): a stack of
        expert weights, each read and quantized on demand, never whole in memory."""
        if name in self._initializer_names or name in self.store.written:
            raise ValueError(f"initializer {name!r} added twice")
        source = np.dtype(dtype)
        dtype = self.float_dtype if _is_float(source) else source
        if dtype not in DTYPES:
            raise TypeError(f"initializer {name!r}: unsupported dtype {source}")
        self._initializer_names.add(name)
        narrowing = (_is_float(dtype) and _is_float(source)
                     and ml_dtypes.finfo(dtype).max < ml_dtypes.finfo(source).max)
        nbytes = math.prod(shape) * dtype.itemsize
        return self._external(name, DTYPES[dtype], dtype, list(shape), nbytes, parts, narrowing,
                              None)

    def _external(self, name: str, elem_type: int, dtype: np.dtype, dims: Sequence[int],
                  nbytes: int, chunks, narrowing: bool, source: np.ndarray | None) -> str:
        """Write ``chunks`` (consecutive slices of the tensor) to the data file, aligned, and
        reference them; checks that they add up to ``nbytes``."""
        tensor = TensorProto(name=name, data_type=elem_type, dims=list(dims))
        offset = self._data.tell()
        align = ALLOCATION_GRANULARITY if nbytes >= ALIGN_THRESHOLD else 64
        if offset % align:
            self.store.write(b"\0" * (align - offset % align))
            offset = self._data.tell()
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            if narrowing:
                _check_range(name, chunk, chunk if source is None else source)
            self.store.write(chunk.reshape(-1).view(np.uint8).data)
        if self._data.tell() - offset != nbytes:
            raise ValueError(f"initializer {name!r}: {self._data.tell() - offset} bytes written "
                             f"for a tensor of {nbytes}")
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
            if array.size > 8:  # (two constants may begin alike: an identity, a triangle)
                shown += "_" + hashlib.sha1(array.tobytes()).hexdigest()[:12]
            name = f"/constants/{array.dtype.name}/{list(array.shape)}/{shown}"
            self._constants[key] = self.initializer(name, array)
        return self._constants[key]

    # -- QDQ ----------------------------------------------------------------------------
    def float_tensors(self, only: set[str] | None = None) -> dict[str, int]:
        """{name: element type} of every float value a node computes or the graph takes (not
        initializers, not the DequantizeLinear outputs of stored codes), by type inference;
        ``only``: of those values alone, projections' inputs and outputs: the graph's float
        type where inference leaves them untyped (downstream of a contrib op it does not know:
        a cpu build's rounded MatMulNBits)."""
        inferred = onnx.shape_inference.infer_shapes(self._model(), strict_mode=True).graph
        types = {v.name: v.type.tensor_type.elem_type
                 for v in (*inferred.input, *inferred.value_info, *inferred.output)}
        dequantized = {n.output[0] for n in self._nodes if n.op_type == "DequantizeLinear"}
        names = [i.name for i in self._inputs] + [o for n in self._nodes for o in n.output if o]
        if only is not None:
            names = [n for n in names if n in only]
            types = {n: types.get(n, self.float_type) for n in names}
        unknown = [n for n in names if n not in types]
        if unknown:
            raise RuntimeError(f"{self.name}: no type inferred for {unknown[:3]}")
        return {n: types[n] for n in names
                if types[n] in FLOAT_ELEM_TYPES and n not in dequantized}

    def calibrated_range(self, value: str) -> tuple[float, float]:
        """The range a QDQ graph quantizes ``value`` over: its calibrated one, or that of the
        value an op that only moves values (Reshape, Transpose, ...) took it from."""
        producers = {o: n for n in self._nodes for o in n.output}
        while value not in self.qdq.ranges and value in producers \
                and producers[value].op_type in SAME_AS_INPUT:
            value = producers[value].input[0]
        return self.qdq.range(value, None)

    def _moved(self) -> set[str]:
        """Outputs of ops that only move values: quantized as their input, no range of their
        own."""
        return {o for n in self._nodes if n.op_type in SAME_AS_INPUT for o in n.output}

    def _quantize_activations(self) -> None:
        """A QuantizeLinear → DequantizeLinear pair on every float value the graph computes or
        takes, with its calibrated range: between them the ops form QDQ node units, which an
        HTP runs whole (the pairs on graph inputs and outputs stay on the CPU)."""
        types, ranges, bits = self.float_tensors(), self.qdq.ranges, self.qdq.bits
        moved = self._moved()
        missing = [t for t in types if t not in ranges and t not in moved
                   and t not in self.narrow]
        if missing:
            raise RuntimeError(f"{self.name}: no calibrated range for {len(missing)} tensor(s) "
                               f"such as {missing[:3]}")
        outputs = {v.name for v in self._outputs}
        params = dict(self._dequantized)  # value → (scale, zero point) it is quantized with

        def scale_and_zero(t, scale, zero):  # this graph's own (ranges differ per graph)
            s, z = f"{t}_scale", f"{t}_zero_point"
            self._initializers += [numpy_helper.from_array(scale, s),
                                   numpy_helper.from_array(zero, z)]
            return s, z

        def pair(t, src, dst):
            s, z = scale_and_zero(t, *params[t])
            q = f"{t}_QuantizeLinear_Output"
            return [helper.make_node("QuantizeLinear", [src, s, z], [q], name=f"{t}/Q"),
                    helper.make_node("DequantizeLinear", [q, s, z], [dst], name=f"{t}/DQ")]

        nodes, renamed = [], {}
        def quantize(t, producer=None):
            dtype = helper.tensor_dtype_to_np_dtype(types[t])
            if t in self.narrow:
                lo, hi, width, kv_grid = self.narrow[t]
                params[t] = (kv_params if kv_grid else activation_params)(lo, hi, width, dtype)
            elif producer is not None and producer.op_type in SAME_AS_INPUT \
                    and producer.input[0] in params:  # moves values: its input's parameters
                params[t] = params[producer.input[0]]
            elif kv8 and kv_group(t) is not None:  # the 8-bit KV buffer's grid (kv_params)
                params[t] = kv_params(*self.qdq.range(t, None), bits, dtype)
            else:
                op = None if producer is None else producer.op_type
                params[t] = activation_params(*self.qdq.range(t, op), bits, dtype)

        kv8 = set()  # uint8 KV buffers: the graph takes and gives their codes
        if self.qdq.kv_bits == 8:
            kv8 = {v.name for v in (*self._inputs, *self._outputs) if KV_BUFFER.match(v.name)}

        def kv_codes(t):  # a uint8 KV buffer's own 8-bit parameters
            return kv_params(*self.qdq.range(t, None), 8,
                             helper.tensor_dtype_to_np_dtype(types[t]))

        def dequantize_only(t):  # a uint8 KV input: its DequantizeLinear reads the codes
            params[t] = kv_codes(t)
            s, z = scale_and_zero(t, *params[t])
            return [helper.make_node("DequantizeLinear", [t, s, z], [renamed[t]], name=f"{t}/DQ")]

        def quantize_only(t, src):  # a uint8 KV output: its QuantizeLinear writes the codes
            s, z = scale_and_zero(t, *kv_codes(t))
            return [helper.make_node("QuantizeLinear", [src, s, z], [t], name=f"{t}/Q")]

        for value in self._inputs:
            if value.name in kv8:
                renamed[value.name] = f"{value.name}_DequantizeLinear_Output"
                nodes += dequantize_only(value.name)
                value.type.tensor_type.elem_type = TensorProto.UINT8
            elif value.name in types:
                quantize(value.name)
                renamed[value.name] = f"{value.name}_DequantizeLinear_Output"
                nodes += pair(value.name, value.name, renamed[value.name])
        for node in self._nodes:
            for k, out in enumerate(node.output):
                if out in types:
                    quantize(out, node)
            node.input[:] = [renamed.get(i, i) for i in node.input]
            nodes.append(node)
            for k, out in enumerate(node.output):
                if out not in types:
                    continue
                if out in kv8:
                    node.output[k] = f"{out}_QuantizeLinear_Input"
                    nodes += quantize_only(out, node.output[k])
                elif out in outputs:  # the pair writes the graph output
                    node.output[k] = f"{out}_QuantizeLinear_Input"
                    nodes += pair(out, node.output[k], out)
                else:
                    renamed[out] = f"{out}_DequantizeLinear_Output"
                    nodes += pair(out, out, renamed[out])
        for value in self._outputs:
            if value.name in kv8:
                value.type.tensor_type.elem_type = TensorProto.UINT8
        self._nodes = nodes

    # -- output --------------------------------------------------------------------------
    def _model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self._nodes, self.name, self._inputs, self._outputs,
                                  self._initializers)
        opsets = [helper.make_opsetid(d, OPSETS[d]) for d in sorted(self._domains)]
        return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION,
                                 producer_name="builder")

    def save(self, path: Path, expose: bool | str = False, log: int = logging.INFO,
             only: Collection[str] | None = None, given: Collection[str] = (),
             states: dict[str, str] | None = None, overridable: Collection[str] = ()
             ) -> onnx.ModelProto:
        """Write the model file beside the data file (and close the data file unless shared).
        ``expose``: every float value the graph computes becomes an output too (calibration
        reads them), but those of ops that only move values ("all": those too);
        PROJECTION_VALUES: only the inputs and outputs of MatMuls and Convs with a stored weight
        (data-aware rounding and mixed precision's measurement read them); WITH_PROJECTIONS:
        True's and those (a projection may read a moved value). ``only``: the graph's outputs
        are these values alone (its own outputs or values its nodes compute), its nodes and
        initializers those that compute them: a pass that needs part of a layer runs part;
        ``given``: values the graph then takes as inputs instead of computing them (an earlier
        pass computed them); ``states`` {past input: present output}: the present of every past
        the nodes kept read is an output too. ``overridable``: initializers that are graph
        inputs too, so that a run may feed other values for them (mixed precision's probes: a
        weight rounded)."""
        if self._own_store:
            self.store.close()
        else:
            self.store.flush()
        if self.qdq is not None:
            self._quantize_activations()
        if expose:
            known = {v.name for v in (*self._inputs, *self._outputs)}
            wanted = None
            projections = {v for n in self._nodes if n.op_type in ("MatMul", "Conv")
                           and n.input[1] in self._initializer_names
                           for v in (n.input[0], n.output[0])}  # (a stored weight's)
            if expose == PROJECTION_VALUES:
                wanted = projections
            elif expose == WITH_PROJECTIONS:
                known |= self._moved() - projections
            elif expose != "all":  # (moved values: their input's, no range of their own)
                known |= self._moved()
            self._outputs += [helper.make_tensor_value_info(name, elem, None)
                              for name, elem in self.float_tensors(wanted).items()
                              if name not in known and (wanted is None or name in wanted)]
        if only is not None:
            self._keep_only(set(only), set(given), states or {})
        if overridable:
            stored = {t.name: t for t in self._initializers}
            missing = set(overridable) - set(stored)
            if missing:
                raise RuntimeError(f"{self.name}: no initializer named {sorted(missing)[:3]}")
            self._inputs += [helper.make_tensor_value_info(n, stored[n].data_type,
                                                           list(stored[n].dims))
                             for n in overridable]
        model = self._model()
        with writing(path):
            onnx.save_model(model, str(path))
        logger.log(log, "wrote %s: %d nodes, %d initializers, %.1f MB of weights", path.name,
                    len(self._nodes), len(self._initializers),
                    self.data_path.stat().st_size / 1e6)
        return model

    def _keep_only(self, names: set[str], given: set[str], states: dict[str, str]) -> None:
        """``save``'s ``only``: the outputs named (and the presents of the pasts they read),
        the nodes and initializers they need, the ``given`` values inputs."""
        known = {v.name for v in self._outputs}
        types = self.float_tensors((names | given) - known)
        missing = (names | given) - known - set(types)
        if missing:
            raise RuntimeError(f"{self.name}: no float value named {sorted(missing)[:3]}")
        while True:
            needed, nodes = set(names), []
            for node in reversed(self._nodes):  # (in order: a producer before its readers)
                if needed.intersection(node.output) - given:
                    nodes.append(node)
                    needed.update(node.input)
                    needed.update(i for a in node.attribute
                                  if a.type == onnx.AttributeProto.GRAPH
                                  for n in a.g.node for i in n.input)  # (an If's outer values)
            more = {states[p] for p in needed & states.keys()} - names
            if not more:
                break
            names |= more
        self._outputs = [v for v in self._outputs if v.name in names] + [
            helper.make_tensor_value_info(name, types[name], None)
            for name in sorted(names - known)]
        self._inputs += [helper.make_tensor_value_info(name, types[name], None)
                         for name in sorted(given)]
        self._nodes = nodes[::-1]
        self._initializers = [t for t in self._initializers if t.name in needed]

    def close(self) -> None:
        if self._own_store:
            self.store.close()

