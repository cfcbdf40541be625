"""An onnxruntime-genai ``decoder-pipeline`` folder of static graphs, for NPU targets (QNN).

    embeddings.onnx                   input_ids → inputs_embeds            (CPU EP; any length)
    context.onnx / iterator.onnx      transformer, S = P (prefill) / S = 1 (decode), KV buffers
    lm_head_context.onnx / _iterator  hidden_states → logits, S = P / 1
    model.data                        every weight, stored once and shared by all graphs

The runtime feeds prompts in chunks of P (the last one padded at its end with pad_token_id),
then one token per step; past_seq_len tells each call where its tokens go in the KV buffers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import Any

from builder.config import DecoderConfig
from builder.epcontext import compile_contexts, compiled_name
from builder.errors import ConfigError, OptionError
from builder.graph import GraphBuilder, Qdq, WeightStore
from builder.models.static import build_embeddings, build_lm_head, build_transformer, kv_names
from builder.options import QDQ_PRECISIONS, BuildOptions, ExtraOptions
from builder.package import generation, read_genai_config, token_ids, write_genai_config
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
    return resolve_lengths(options, config)


DEFAULT_CONTEXT = 512


def resolve_lengths(options: BuildOptions, config: DecoderConfig) -> tuple[int, int]:
    """(P, C). C defaults to 512, or max_position_embeddings when that is smaller (logged); the
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


def parts(prefill: int, context: int) -> list[tuple[str, Any, tuple]]:
    return [("embeddings.onnx", build_embeddings, ()),
            ("context.onnx", build_transformer, (prefill, context)),
            ("iterator.onnx", build_transformer, (1, context)),
            ("lm_head_context.onnx", build_lm_head, (prefill,)),
            ("lm_head_iterator.onnx", build_lm_head, (1,))]


def write_pipeline(out: Path, builder, float_dtype, qdq: tuple[int, dict] | None = None) -> None:
    """Build every graph of the pipeline into ``out`` with ``builder`` (one builder, its
    decisions logged once; one graph at a time), weights shared in one data file. ``qdq``:
    (activation bits, {graph: calibrated ranges}) writes the transformer and lm_head graphs as
    QDQ graphs. (``check_options`` and ``check_lowered`` have already passed.)"""
    extra, target = builder.options.extra, builder.target
    prefill, context = extra.qnn_prefill_length, extra.qnn_context_length
    logger.info("static pipeline: prefill %d tokens per call, context %d, KV cache fp16",
                prefill, context)
    store = WeightStore(out / DATA_FILE)
    try:
        for filename, build_part, args in parts(prefill, context):
            stem = filename.removesuffix(".onnx")
            quantized = qdq is not None and build_part is not build_embeddings
            builder.gb = GraphBuilder(stem, float_dtype=float_dtype, store=store,
                                      qdq=Qdq(qdq[0], qdq[1][stem]) if quantized else None)
            build_part(builder, *args)
            check_ops(builder.gb.save(out / filename), filename, target.name)
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
    """qnn_epcontext=true: compile the QNN graphs in their final (calibrated) form, then point
    genai_config.json at the compiled models."""
    compile_contexts(out, list(QNN_GRAPHS), qnn_options(options))
    genai = read_genai_config(out)
    for stage in genai["model"]["decoder"]["pipeline"]:
        for spec in stage.values():
            if spec["filename"] in QNN_GRAPHS:
                spec["filename"] = compiled_name(spec["filename"])
    write_genai_config(out, genai)


QNN_GRAPHS = ("context.onnx", "iterator.onnx", "lm_head_context.onnx", "lm_head_iterator.onnx")


def qnn_options(options: BuildOptions) -> dict[str, str]:
    x = options.extra
    return {"backend_type": "htp", "soc_model": x.qnn_soc_model, "htp_arch": x.qnn_htp_arch}


def genai_pipeline_config(config: DecoderConfig, options: BuildOptions, target: TargetCaps,
                          source: Path) -> dict[str, Any]:
    """genai_config.json for the pipeline written by write_pipeline."""
    x = options.extra
    prefill, context = x.qnn_prefill_length, x.qnn_context_length
    layers = range(config.num_hidden_layers)
    kv_in = [n for i in layers for n in kv_names(i)[:2]]
    kv_out = [n for i in layers for n in kv_names(i)[2:]]
    qnn = {"qnn": qnn_options(options)}
    transformer_inputs = ["inputs_embeds", "past_seq_len", "total_seq_len", *kv_in]
    transformer_outputs = ["hidden_states", *kv_out]

    def stage(filename, inputs, outputs, prompt, token, **more):
        return {"filename": filename, "inputs": inputs, "outputs": outputs,
                "run_on_prompt": prompt, "run_on_token_gen": token, **more}

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
                           "past_key_names": "past_key_%d", "past_value_names": "past_value_%d"},
                "outputs": {"logits": "logits", "present_key_names": "present_key_%d",
                            "present_value_names": "present_value_%d"},
                "sliding_window": {"window_size": prefill, "pad_value": 0, "alignment": "left",
                                   "slide_inputs": True, "slide_key_value_cache": False},
                "pipeline": [
                    {"embeddings": stage(
                        "embeddings.onnx", ["input_ids"], ["inputs_embeds"], True, True,
                        session_options={"log_id": "onnxruntime-genai.embeddings",
                                         "provider_options": []})},
                    {"context": stage("context.onnx", transformer_inputs, transformer_outputs,
                                      True, False)},
                    {"iterator": stage("iterator.onnx", transformer_inputs, transformer_outputs,
                                       False, True)},
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
