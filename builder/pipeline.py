"""An onnxruntime-genai ``decoder-pipeline`` folder of static graphs, for NPU targets (QNN).

    embeddings.onnx                   input_ids → inputs_embeds            (CPU EP; any length)
    context.onnx / iterator.onnx      transformer, S = P (prefill) / S = 1 (decode), KV buffers
    lm_head_context.onnx / _iterator  hidden_states → logits, S = P / 1
    model.data                        every weight, stored once and shared by all graphs

Split in N parts (``qnn_num_splits``), the transformer is context_<k>.onnx / iterator_<k>.onnx
for k = 0..N-1: consecutive layer ranges, each with the KV buffers of its own layers, chained
by the residual stream (``hidden_states_layer_<first layer of the next part>``); a part's two
graphs share its weights.

The runtime feeds prompts in chunks of P (the last one padded at its end with pad_token_id),
then one token per step; past_seq_len tells each call where its tokens go in the KV buffers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.config import DecoderConfig
from builder.epcontext import compile_contexts, compiled_name
from builder.errors import ConfigError, OptionError
from builder.graph import Calibrated, GraphBuilder, WeightStore
from builder.models.static import (CHUNK_MASK, build_embeddings, build_lm_head,
                                   build_transformer, has_states, kv_names, layer_stream,
                                   state_names)
from builder.options import FOUR_BIT, QDQ_PRECISIONS, BuildOptions, ExtraOptions, Precision
from builder.package import generation, read_genai_config, token_ids, write_genai_config
from builder.quant.policy import LINEAR_ROLES
from builder.roles import TensorRole as R
from builder.targets import TargetCaps

logger = logging.getLogger(__name__)

DATA_FILE = "model.data"
# graph-shape options of the single decoder graph that the pipeline's graphs do not take
UNSUPPORTED_ON_QNN = ("exclude_embeds", "exclude_lm_head", "include_hidden_states",
                      "prune_lm_head", "filename")


def check_options(options: BuildOptions, config: DecoderConfig) -> tuple[int, int]:
    """Refuse what static pipelines cannot do (yet), before anything is written."""
    x = options.extra
    if x.shared_embeddings and options.precision not in QDQ_PRECISIONS:
        raise OptionError("shared_embeddings=true on -e qnn shares lm_head's int8 table, which "
                          "quantized builds have: use -p w8a16 or w4a16 (or int8 / int4)")
    if x.shared_embeddings and not config.tie_word_embeddings:
        raise OptionError("shared_embeddings=true needs a checkpoint that ties its embeddings, "
                          "but config.json has tie_word_embeddings=false")
    for name in UNSUPPORTED_ON_QNN:
        if getattr(x, name) != ExtraOptions.__dataclass_fields__[name].default:
            raise OptionError(f"extra option {name} is not supported yet for -e qnn")
    if x.qnn_epcontext and importlib.util.find_spec("onnxruntime_qnn") is None:
        raise OptionError("qnn_epcontext=true compiles with onnxruntime-qnn, which is not "
                          "installed: pip install onnxruntime-qnn")
    p, c = resolve_lengths(options, config)
    steps = x.qnn_calibration_steps
    if options.precision in QDQ_PRECISIONS and steps > c - p:
        raise OptionError(f"qnn_calibration_steps={steps} does not fit after a prompt's first "
                          f"chunk of {p} in the context of {c}: give at most {c - p}")
    return p, c


DEFAULT_CONTEXT = 2048


def resolve_lengths(options: BuildOptions, config: DecoderConfig) -> tuple[int, int]:
    """(P, C). C defaults to 2048, or max_position_embeddings when that is smaller (logged); the
    resolved C is written back into ``options`` so that every later stage and the manifest see
    it. A length that does not fit names the option to change."""
    x, max_pos = options.extra, config.max_position_embeddings
    p, c = x.qnn_prefill_length, x.qnn_context_length
    if c is None:
        c = min(DEFAULT_CONTEXT, max_pos)
        logger.info("qnn_context_length not given: %d (%s)", c,
                    "the default" if c == DEFAULT_CONTEXT else
                    f"the model's max_position_embeddings, below the default {DEFAULT_CONTEXT}")
        object.__setattr__(options, "extra", dataclasses.replace(x, qnn_context_length=c))
        if c <= p:
            raise OptionError(f"qnn_prefill_length={p} leaves no room in the context: the "
                              f"model's max_position_embeddings is {max_pos}, so set "
                              f"qnn_prefill_length below {c}")
    elif c > max_pos:
        raise OptionError(f"qnn_context_length={c} exceeds the model's max_position_embeddings="
                          f"{max_pos}: set qnn_context_length to at most {max_pos}")
    if c <= p:
        raise OptionError(f"qnn_context_length={c} must be larger than qnn_prefill_length={p}: "
                          f"raise qnn_context_length or lower qnn_prefill_length")
    return p, c


# How large one part may be. A QNN HTP context lives in the NPU's 32-bit address space:
# about 3.75 GB per session, which also holds the KV buffers, the graph's activations and the
# spill-fill buffer (Qualcomm's QNN HTP backend docs, "HTP session & artifact usage
# guidelines", as quoted in github.com/powerserve-project/PowerServe/issues/6), and
# onnxruntime's QNN EP maintainers split models above 3.5 GB in two for that reason ("because
# of QNN PD memory limitation", github.com/microsoft/onnxruntime/pull/20930). What a part holds
# there: its weights once per context binary (twice when its prefill and decode graphs are
# compiled into a context each, once with qnn_weight_sharing) and its layers' KV buffers at C.
# PART_LIMIT keeps that at 2 GiB, about half a session's space, the rest left to activations
# (a few MiB at real shapes: the manifest's device_memory) and spill-fill; an embedded context
# binary also stays inside its .onnx file's 2 GiB protobuf limit. Unshared, that is 1 GiB of
# weights per part: the part counts Qualcomm's AI Hub ships (Llama-3-8B at w4a16 in 5 parts).
PART_LIMIT = 2 << 30


def layer_weight_bytes(shapes: list[tuple[R, tuple[int, ...]]], precision: Precision,
                       block_size: int, conv: bool, linear: frozenset = frozenset()) -> int:
    """What one layer's weights take in model.data: projections at the precision's weight bits
    (plus an fp32 scale and a zero point of the weight's bits per block of ``block_size`` for
    int4 on MatMul, per output channel otherwise), other tensors at 16 bits (QDQ builds store
    them as uint16 codes; fp16) or 32. ``linear``: an architecture's own linear roles."""
    total = 0
    for role, shape in shapes:
        n = math.prod(shape)
        if precision in QDQ_PRECISIONS and (role in LINEAR_ROLES or role in linear):
            bits = 4 if precision in FOUR_BIT else 8
            scales = n // block_size if bits == 4 and not conv else shape[0]
            total += (n + scales) * bits // 8 + 4 * scales
        else:
            total += n * (4 if precision == Precision.FP32 else 2)
    return total


def mib(n: int) -> str:
    return f"{n / 2**20:.{0 if n >= 2**30 else 2}f} MiB"


def layer_ranges(layers: int, splits: int) -> list[range]:
    """``layers`` layers as ``splits`` consecutive ranges, their sizes within one of each
    other (the first ones the larger)."""
    size, more = divmod(layers, splits)
    bounds = [0]
    for k in range(splits):
        bounds.append(bounds[-1] + size + (k < more))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def kv_bits(options: BuildOptions) -> int:
    """The KV buffers' bits: qnn_kv_bits, or its default (8 at the 4-bit QDQ precisions, 16
    otherwise; PipelineFolder.kv_bits says why)."""
    bits = options.extra.qnn_kv_bits
    if bits is None:
        bits = 8 if options.precision in QDQ_PRECISIONS and options.precision in FOUR_BIT \
            else 16
    return bits


def kv_cache_figures(config: DecoderConfig, context: int, bits: int, cls) -> dict:
    """The buffers a static folder's runtime allocates, batch 1: the KV cache's element type,
    bytes per token and at the context length (each attention layer's K and V buffer), and
    the other layers' states (fp16, fixed: ``state_bytes``)."""
    attention = sum(cls.layer_kind(config, i) == "attention"
                    for i in range(config.num_hidden_layers))
    per_token = 2 * attention * config.num_key_value_heads * config.head_dim * bits // 8
    return {"dtype": "uint8" if bits == 8 else "float16", "bytes_per_token": per_token,
            "context_length": context, "bytes": per_token * context,
            "attention_layers": attention,
            "state_bytes": sum(layer_state_bytes(cls, config, i)
                               for i in range(config.num_hidden_layers))}


def layer_state_bytes(cls, config: DecoderConfig, layer: int) -> int:
    """The fp16 bytes of a layer's states (``DecoderBuilder.layer_states``; 0 for attention)."""
    return sum(2 * math.prod(st.shape) for st in cls.layer_states(config, layer))


def part_costs(options: BuildOptions, config: DecoderConfig, cls) -> tuple[list[int], int]:
    """Each layer's bytes in its part's share of the NPU (its weights as built at the
    precision's bits, times the copies its part's contexts hold, plus its K and V buffers at
    C), and those copies (2, a context per graph; 1 with qnn_weight_sharing)."""
    x = options.extra
    copies = 1 if x.qnn_weight_sharing else 2
    figures = kv_cache_figures(config, x.qnn_context_length, kv_bits(options), cls)
    kv = figures["bytes"] // max(1, figures["attention_layers"])

    def buffers(i):  # its K and V buffers, or its states
        return kv if cls.layer_kind(config, i) == "attention" \
            else layer_state_bytes(cls, config, i)
    return [copies * layer_weight_bytes(cls.layer_weight_shapes(config, i), options.precision,
                                        x.int4_block_size, x.qnn_linear == "conv",
                                        cls.linear_roles) + buffers(i)
            for i in range(config.num_hidden_layers)], copies


def resolve_splits(options: BuildOptions, config: DecoderConfig, cls) -> list[range]:
    """The transformer's parts: ``qnn_num_splits`` layer ranges, or for auto the fewest whose
    share of the NPU (``part_costs``) each stays under PART_LIMIT (logged with the sizes). The
    count is written back into ``options`` (the manifest shows what was built)."""
    x, layers = options.extra, config.num_hidden_layers
    per_layer, copies = part_costs(options, config, cls)

    def largest(ranges):
        return max(sum(per_layer[i] for i in r) for r in ranges)

    held = "its weights (once: shared contexts)" if copies == 1 else \
        "its weights twice (a context per graph)"
    if x.qnn_num_splits == "auto":
        splits = next((n for n in range(1, layers + 1)
                       if largest(layer_ranges(layers, n)) <= PART_LIMIT), None)
        if splits is None:
            raise OptionError(f"one layer takes {mib(max(per_layer))} on the NPU at -p "
                              f"{options.precision} ({held} and KV buffers), more than the "
                              f"{mib(PART_LIMIT)} one QNN context is given: set "
                              "qnn_num_splits to the number of parts you want")
        why = (f"auto: the fewest that keep each part's share of the NPU, {held} and its KV "
               f"buffers at C = {x.qnn_context_length}, under {mib(PART_LIMIT)}")
    else:
        splits = int(x.qnn_num_splits)
        if splits > layers:
            raise OptionError(f"qnn_num_splits={splits} is more parts than the model's "
                              f"{layers} layers: give at most {layers}")
        why = "qnn_num_splits"
    ranges = layer_ranges(layers, splits)
    logger.info("transformer in %d part(s) of %s layers, at most %s on the NPU each (%s)",
                splits, "/".join(str(len(r)) for r in ranges), mib(largest(ranges)), why)
    object.__setattr__(options, "extra", dataclasses.replace(x, qnn_num_splits=splits))
    return ranges


def part_room(options: BuildOptions, config: DecoderConfig, cls):
    """``quant.mixed.choose``'s ``fits``: a layer's part takes extra weight bytes while its
    share of the NPU stays under PART_LIMIT (as built at the precision's bits:
    ``resolve_splits`` chose the parts before the measurement)."""
    per_layer, copies = part_costs(options, config, cls)
    ranges = layer_ranges(config.num_hidden_layers, int(options.extra.qnn_num_splits))
    part = {i: k for k, r in enumerate(ranges) for i in r}
    room = [PART_LIMIT - sum(per_layer[i] for i in r) for r in ranges]

    def fits(layer: int, extra: int) -> bool:
        if room[part[layer]] < copies * extra:
            return False
        room[part[layer]] -= copies * extra
        return True
    return fits


@dataclass(frozen=True)
class Stage:
    """One graph of the pipeline: its file, how it is built, and which calibrated ranges it
    takes (its kind: every part's prefill graph takes the "context" ranges, and so on); a
    transformer graph's layers."""
    filename: str
    build: Any
    args: tuple
    kind: str
    layers: range | None = None

    @property
    def stem(self) -> str:
        return self.filename.removesuffix(".onnx")


def stages(prefill: int, context: int, splits: list[range], pad: int | None = None
           ) -> list[Stage]:
    """The graphs in the order the runtime runs them (``pad``: the pad token id, for the
    embeddings graph's chunk mask where layers carry states)."""
    out = [Stage("embeddings.onnx", build_embeddings, (pad,), "embeddings")]
    for k, layers in enumerate(splits):
        tag = "" if len(splits) == 1 else f"_{k}"
        out += [Stage(f"context{tag}.onnx", build_transformer, (prefill, context, layers),
                     "context", layers),
                Stage(f"iterator{tag}.onnx", build_transformer, (1, context, layers),
                     "iterator", layers)]
    return out + [Stage("lm_head_context.onnx", build_lm_head, (prefill,), "lm_head_context"),
                  Stage("lm_head_iterator.onnx", build_lm_head, (1,), "lm_head_iterator")]


def transformer_splits(options: BuildOptions, config: DecoderConfig) -> list[range]:
    """The resolved parts (after ``resolve_splits``)."""
    return layer_ranges(config.num_hidden_layers, int(options.extra.qnn_num_splits))


def write_pipeline(out: Path, builder, float_dtype, pad: int,
                   qdq: Calibrated | None = None) -> None:
    """Build every graph of the pipeline into ``out`` with ``builder`` (one builder, its
    decisions logged once; one graph at a time), weights shared in one data file. ``pad``: the
    pad token id (genai_config.json's); ``qdq``: the calibrated activations: the transformer
    and lm_head graphs are written as QDQ graphs. (``check_options`` and ``check_lowered`` have
    already passed.)"""
    extra, target = builder.options.extra, builder.target
    prefill, context = extra.qnn_prefill_length, extra.qnn_context_length
    logger.info("static pipeline: prefill %d tokens per call, context %d, KV cache %s",
                prefill, context, "uint8" if qdq is not None and qdq.kv_bits == 8 else "fp16")
    store = WeightStore(out / DATA_FILE)
    try:
        for stage in stages(prefill, context, transformer_splits(builder.options, builder.config),
                            pad):
            quantized = qdq is not None and stage.build is not build_embeddings
            builder.gb = GraphBuilder(stage.stem, float_dtype=float_dtype, store=store,
                                      qdq=qdq.graph(stage.kind) if quantized else None)
            stage.build(builder, *stage.args)
            check_ops(builder.gb.save(out / stage.filename), stage.filename, target.name)
    finally:
        store.close()
    builder.weights.check_all_consumed(builder.ignored())
    builder.policy.check_exclusions()


def check_ops(model, filename: str, target: str) -> None:
    """Static graphs take standard ONNX ops only: a contrib op (GroupQueryAttention,
    MatMulNBits, SkipSimplifiedLayerNormalization...) means an architecture method wrote the
    single-graph decoder's lowering into them, which the NPU cannot run as built."""
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise ConfigError(f"{filename}: node {node.name} is {node.domain} {node.op_type}, "
                              f"which -e {target} graphs cannot take: the architecture method "
                              f"that writes it has no lowering for -e {target} yet")


def compile_pipeline(out: Path, options: BuildOptions) -> None:
    """qnn_epcontext=true: compile the QNN graphs (every graph but the embeddings) in their
    final (calibrated) form, each into a context of its own, then point genai_config.json at
    the compiled models."""
    genai = read_genai_config(out)
    graphs = [spec["filename"] for stage in genai["model"]["decoder"]["pipeline"]
              for spec in stage.values() if spec["filename"] != "embeddings.onnx"]
    if options.extra.qnn_weight_sharing:  # a part's prefill and decode graphs: one binary
        compile_contexts(out, [[g, g.replace("context", "iterator")] for g in graphs
                               if "context" in g], qnn_options(options), shared=True)
    else:
        compile_contexts(out, [[g] for g in graphs], qnn_options(options))
    for stage in genai["model"]["decoder"]["pipeline"]:
        for spec in stage.values():
            if spec["filename"] in graphs:
                spec["filename"] = compiled_name(spec["filename"])
    write_genai_config(out, genai)


def qnn_options(options: BuildOptions) -> dict[str, str]:
    x = options.extra
    return {"backend_type": "htp", "soc_model": x.qnn_soc_model, "htp_arch": x.qnn_htp_arch}


def genai_pipeline_config(config: DecoderConfig, options: BuildOptions, target: TargetCaps,
                          source: Path, cls) -> dict[str, Any]:
    """genai_config.json for the pipeline written by write_pipeline. Layers of other kinds
    (LFM2's conv layers) add their states to the transformer graphs' inputs and outputs (the
    runtime keeps them as it keeps the KV cache: ``past_<state>_names``, shared past/present
    buffers) and the chunk mask, from the embeddings graph, to the prefill graphs'."""
    x = options.extra
    decoder_fields = cls.genai_decoder(config)
    stateful = has_states(cls, config)

    def states(layers, end):
        return [state_names(i, s.name)[end] for i in layers for s in cls.layer_states(config, i)]

    def kv(layers, names):
        return [n for i in layers if cls.layer_kind(config, i) == "attention" for n in names(i)]
    prefill, context = x.qnn_prefill_length, x.qnn_context_length
    qnn = {"qnn": qnn_options(options)}

    def stage(filename, inputs, outputs, prompt, token, **more):
        return {"filename": filename, "inputs": inputs, "outputs": outputs,
                "run_on_prompt": prompt, "run_on_token_gen": token, **more}

    def transformer(part: Stage) -> dict:
        layers, last = part.layers, config.num_hidden_layers
        first = "inputs_embeds" if layers.start == 0 else layer_stream(layers.start)
        then = "hidden_states" if layers.stop == last else layer_stream(layers.stop)
        inputs = [first, "past_seq_len", "total_seq_len",
                  *kv(layers, lambda i: kv_names(i)[:2]), *states(layers, 0)]
        if stateful and part.kind == "context" and states(layers, 0):
            inputs.append(CHUNK_MASK)
        outputs = [then, *kv(layers, lambda i: kv_names(i)[2:]), *states(layers, 1)]
        return {part.stem: stage(part.filename, inputs, outputs, part.kind == "context",
                                 part.kind == "iterator")}

    transformers = [transformer(p) for p in stages(prefill, context,
                                                  transformer_splits(options, config))
                    if p.layers is not None]

    bos, eos, pad = token_ids(config, generation(source))
    return {
        "model": {
            "type": "decoder-pipeline",
            "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
            "context_length": context,
            "vocab_size": config.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [qnn]},
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
                "inputs": {"input_ids": "input_ids", "past_sequence_length": "past_seq_len",
                           "total_sequence_length": "total_seq_len",
                           "past_key_names": "past_key_%d", "past_value_names": "past_value_%d",
                           **decoder_fields.get("inputs", {})},
                "outputs": {"logits": "logits", "present_key_names": "present_key_%d",
                            "present_value_names": "present_value_%d",
                            **decoder_fields.get("outputs", {})},
                **{k: v for k, v in decoder_fields.items() if k not in ("inputs", "outputs")},
                "sliding_window": {"window_size": prefill, "pad_value": 0, "alignment": "left",
                                   "slide_inputs": True, "slide_key_value_cache": False},
                "pipeline": [
                    {"embeddings": stage(
                        "embeddings.onnx", ["input_ids"],
                        ["inputs_embeds", *([CHUNK_MASK] if stateful else [])], True, True,
                        session_options={"log_id": "onnxruntime-genai.embeddings",
                                         "provider_options": []})},
                    *transformers,
                    {"lm_head_context": stage("lm_head_context.onnx", ["hidden_states"],
                                              ["logits"], True, False, is_lm_head=True)},
                    {"lm_head_iterator": stage("lm_head_iterator.onnx", ["hidden_states"],
                                               ["logits"], False, True, is_lm_head=True)},
                ],
            },
        },
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def device_memory(out: Path, kv_cache: dict, activation_bytes: int) -> dict:
    """What the folder's graphs hold on the device, per part (a part: its prefill and decode
    graphs; lm_head's two; the embeddings): the weights' bytes once (the two graphs sharing
    one context binary) and once per graph (a context each), its layers' KV buffers at the
    context length (``kv_cache``: ``kv_cache_figures``) and other states, and its largest
    activation: the
    largest value computed inside either graph (shapes inferred; graph inputs, outputs and
    weights excluded), at ``activation_bytes`` per element (what the HTP holds it in: 2 for
    16-bit activations and fp16, 1 for 8-bit)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    decoder = read_genai_config(out)["model"]["decoder"]
    per_layer = kv_cache["bytes"] // max(1, kv_cache["attention_layers"])
    parts: dict[str, dict] = {}
    for spec in (spec for stage in decoder["pipeline"] for spec in stage.values()):
        model = onnx.load(str(out / spec["filename"]), load_external_data=False)
        tensors = set()
        for t in model.graph.initializer:
            if uses_external_data(t):
                info = ExternalDataInfo(t)
                tensors.add((info.location, info.offset, info.length))
            else:
                tensors.add((spec["filename"], t.name, len(t.raw_data) or t.ByteSize()))
        part = parts.setdefault(spec["filename"].replace("iterator", "context"), {
            "graphs": [], "tensors": set(), "per_graph": 0, "activation": None,
            "layers": sum(n.startswith("past_key_") for n in spec["inputs"]),
            "states": sum(2 * math.prod(d.dim_value for d in v.type.tensor_type.shape.dim)
                          for v in model.graph.input if v.name.startswith("past."))})
        part["graphs"].append(spec["filename"])
        part["tensors"] |= tensors
        part["per_graph"] += sum(t[2] for t in tensors)
        found = largest_value(model, spec["filename"])
        if found and (part["activation"] is None or found[0] > part["activation"][0]):
            part["activation"] = found
    return {"context_length": kv_cache["context_length"], "parts": [
        {"graphs": p["graphs"], "weight_bytes_shared": sum(t[2] for t in p["tensors"]),
         "weight_bytes_per_graph": p["per_graph"], "kv_bytes": p["layers"] * per_layer,
         **({"state_bytes": p["states"]} if p["states"] else {}),
         **({"largest_activation": {
             "graph": p["activation"][1], "value": p["activation"][2],
             "shape": p["activation"][3], "bytes": p["activation"][0] * activation_bytes}}
            if p["activation"] else {})}
        for p in parts.values()]}


def largest_value(model, filename: str) -> tuple[int, str, str, list[int]] | None:
    """(elements, graph, name, shape) of the largest value a static graph computes from its
    inputs (shapes inferred without its weights' data; a weight's DequantizeLinear, computed
    from weights alone, is not an activation); None for a graph that computes nothing."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(model).graph
    constant = {t.name for t in graph.initializer}
    for node in graph.node:
        if all(not name or name in constant for name in node.input):
            constant.update(node.output)
    outside = constant | {v.name for v in (*graph.input, *graph.output)}
    best = None
    for v in graph.value_info:
        dims = v.type.tensor_type.shape.dim
        if v.name in outside or not all(d.HasField("dim_value") for d in dims):
            continue
        shape = [d.dim_value for d in dims]
        if best is None or math.prod(shape) > best[0]:
            best = (math.prod(shape), filename, v.name, shape)
    return best
