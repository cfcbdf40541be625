"""One build, end to end: source → config → architecture → graph → output folder."""

from __future__ import annotations

import dataclasses
import errno
import logging
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm.contrib.logging import logging_redirect_tqdm

from builder.config import DecoderConfig, check_keys
from builder.errors import OptionError, OutputError, UnsupportedArchitectureError
from builder.graph import Calibrated, GraphBuilder
from builder.lora import load_adapters
from builder.memory import check_memory
from builder.metrics import StageMeter
from builder.models.static import check_layer_kinds, check_lowered
from builder.options import (
    FOUR_BIT,
    QDQ_PRECISIONS,
    BuildOptions,
    ExecutionProvider,
    Precision,
    not_applicable,
)
from builder.output import StagedOutput
from builder.package import (
    check_model_type,
    check_tokenizer_files,
    genai_config,
    generation,
    token_ids,
    write_genai_files,
    write_manifest,
)
from builder.pipeline import (
    check_options,
    compile_pipeline,
    device_memory,
    genai_pipeline_config,
    kv_bits,
    kv_cache_figures,
    part_room,
    resolve_splits,
    write_pipeline,
)
from builder.plugins import Plugins, default_plugins
from builder.quant import QuantPolicy
from builder.quant.awq import AwqGptq, qdq_smoothing, smooth_layers, summary
from builder.quant.calibration import calibrate, prompts, unite_phases, unite_tokens
from builder.quant.kv import tie_kv_ranges
from builder.quant.mixed import OutputNoise, decide, measure, promote
from builder.quant.policy import DATA_AWARE, MEASURED, STATIC_ALGORITHMS, static_default
from builder.quant.prequantized import StoredFormat, stored_format
from builder.quant.report import (
    accuracy_report,
    check_accuracy,
    evaluation_sequences,
    float_head,
    held_out_sequences,
    stream_report,
)
from builder.quant.rounding import hybrid_problem, qdq_rounding, round_layers
from builder.quant.sensitivity import (
    StreamProbe,
    kinds_of_error,
    layer_figures,
    overall,
    summarize,
    tensor_figures,
    weight_figures,
)
from builder.quant.stream import LayerStream, TensorStats, sequence
from builder.roles import TensorRole as R
from builder.runcheck import run_check
from builder.source import checkpoint_file, resolve
from builder.targets import TargetCaps
from builder.weights import CheckpointReader

logger = logging.getLogger(__name__)

FLOAT_DTYPES = {Precision.FP32: np.float32, Precision.FP16: np.float16,
                Precision.BF16: ml_dtypes.bfloat16}


def _target(options: BuildOptions, plugins: Plugins) -> TargetCaps:
    """The target, with -p defaulted to its first precision when not given."""
    target = plugins.targets.get(str(options.execution_provider))
    if target is None:
        known = ", ".join(plugins.targets.names())
        raise OptionError(f"execution provider {str(options.execution_provider)!r} is not "
                          f"supported yet; available: {known}")
    if options.precision is None:
        object.__setattr__(options, "precision", target.precisions[0])
        logger.info("-p not given: %s, the first precision of -e %s", options.precision,
                    target.name)
    if options.precision not in target.precisions:
        valid = ", ".join(str(p) for p in target.precisions)
        raise OptionError(f"precision {str(options.precision)!r} is not supported yet for "
                          f"-e {target.name}; valid: {valid}")
    builtin = {f.name for f in options.extra.catalogue()}
    given = set(options.extra.given) & builtin | {
        name for name in builtin if getattr(options.extra, name) != options.extra.default(name)}
    for name in sorted(given):  # (given at its default, too: the user asked for something)
        why = not_applicable(name, options.precision, target.static_shapes, options.extra)
        if why:
            raise OptionError(f"extra option {name} {why}")
    return target


def _architecture(architecture: str, plugins: Plugins):
    cls = plugins.architectures.get(architecture)
    if cls is None:
        known = ", ".join(plugins.architectures.names()) or "none (is the package installed?)"
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported"
            f"{plugins.architectures.suggest(architecture)}; known: {known}. A plugin "
            "can add it (see plugins/ in the builder repository)")
    return cls


def check_plugin_options(options: BuildOptions, plugins: Plugins, architecture: str) -> None:
    """A plugin option given to a build whose architecture comes from another plugin would do
    nothing (the plugin's own architectures read it): refused, naming both."""
    extra = options.extra
    values = dict(extra.plugin_values)
    for name in sorted(set(extra.given) & set(values)):
        owner = plugins.options.owner(name)
        theirs = [a for a in plugins.architectures.names()
                  if plugins.architectures.owner(a) == owner]
        if theirs and architecture not in theirs:
            raise OptionError(
                f"extra option {name} is plugin {owner!r}'s, read by its architectures "
                f"({', '.join(theirs)}); this build's {architecture} does not read it")


def check_shared_table(options: BuildOptions, config: DecoderConfig) -> None:
    """int4_op_types_to_quantize=...,Gather quantizes an unshared embedding; a shared table is
    quantized for lm_head and read by both already, so Gather would do nothing."""
    extra = options.extra
    shared = extra.shared_embeddings if extra.shared_embeddings is not None \
        else config.tie_word_embeddings
    if "Gather" not in extra.int4_op_types_to_quantize:
        return
    if extra.exclude_embeds:
        raise OptionError("extra option int4_op_types_to_quantize=...,Gather does nothing with "
                          "exclude_embeds=true (the model has no embedding lookup)")
    if shared:
        raise OptionError(
            "extra option int4_op_types_to_quantize=...,Gather does nothing with shared "
            "embeddings (the one table is quantized for lm_head and the lookup reads it "
            "quantized already); leave Gather out, or give shared_embeddings=false")


def _fewer_layers(config: DecoderConfig, layers: int | None) -> DecoderConfig:
    """num_hidden_layers=N: keep the first N layers; the others' weights may go unused."""
    if layers is None:
        return config
    if layers > config.num_hidden_layers:
        raise OptionError(f"extra option num_hidden_layers={layers} exceeds the checkpoint's "
                          f"{config.num_hidden_layers} layers")
    logger.info("building the first %d of %d layers", layers, config.num_hidden_layers)
    return dataclasses.replace(config, num_hidden_layers=layers, extra={
        **config.extra, "checkpoint_num_hidden_layers": config.num_hidden_layers})




def check_blocks(config: DecoderConfig, block: int) -> None:
    """int4 blocks on MatMul must tile every projection's input: the HTP computes a block cut
    short at the end of a row wrongly (measured on the simulator: a Phi-3 whose MLP has 160
    inputs, blocks of 64, logit cosine 0.04 against the CPU EP's 0.998, LPBQ or float blocks
    alike), so such a build is refused, not written."""
    inputs = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
              "num_attention_heads x head_dim": config.num_attention_heads * config.head_dim}
    bad = {name: k for name, k in inputs.items() if k % block}
    if bad:
        fits = [b for b in (256, 128, 64, 32, 16) if all(k % b == 0 for k in inputs.values())]
        raise OptionError(
            f"int4_block_size={block} does not divide the projections' input sizes on -e qnn "
            f"({', '.join(f'{n} {k}' for n, k in bad.items())}): the HTP computes a block cut "
            "short at the end of a row wrongly; " + (
                f"choose int4_block_size={fits[0]}" if fits else
                "no block size divides them: use qnn_linear=conv (int4 per channel) or -p w8a16"))

class DecoderFolder:
    """cpu, cuda: one decoder graph, ``<filename>`` + ``<filename>.data``, described by an
    onnxruntime-genai "decoder" genai_config.json."""

    def __init__(self, options: BuildOptions, target: TargetCaps) -> None:
        self.options, self.target = options, target
        self.report: dict | None = None  # quantized QNN builds: the accuracy report
        self.sensitivity: dict | None = None  # and where its error comes from
        self.mixed: dict | None = None  # *_mixed: the projections promoted, by measurement
        self.awq: dict | None = None  # awq: the scales' figures
        self.kv: dict | None = None  # static targets: the KV cache's type and bytes
        self.device: dict | None = None  # and what each part holds on the device
        self.stored: StoredFormat | None = None  # a pre-quantized checkpoint's format

    def check(self, config: DecoderConfig, cls) -> None:
        self.cls = cls

    def policy(self, config: DecoderConfig, plugins: Plugins) -> QuantPolicy:
        o = self.options
        self.plugins = plugins
        return QuantPolicy.from_options(o.precision, o.extra, config.num_hidden_layers,
                                        plugins.quantizers, self.target.nbits_accuracy_level)

    def write(self, out: Path, cls, config: DecoderConfig, weights: CheckpointReader,
              policy: QuantPolicy, float_type, meter: StageMeter, source: Path) -> None:
        filename = self.options.extra.filename
        work = out / ".work"
        # the report's float model: the held-out prompts ride the first data-aware stage's
        # float layers (one pass of the layers less than the report's own)
        held_out = held_out_sequences(config, source) \
            if policy.data_aware or policy.budget is not None else None
        if policy.budget is not None:
            with meter("measure"):
                o = self.options
                packed = self.target.pack_matmuls if o.extra.unpack_matmul is None \
                    else not o.extra.unpack_matmul
                self.mixed = promote(cls, config, o, weights, policy, self.plugins, source,
                                     work, packed, held_out or ())
        ride = (held_out or ()) if policy.budget is None else ()
        if policy.data_aware == "awq":
            with meter("round"):
                self.awq = smooth_layers(cls, config, self.options, weights, policy,
                                         self.plugins, source, work, ride)
        elif policy.data_aware:
            with meter("round"):
                round_layers(cls, config, self.options, weights, policy, self.plugins, source,
                             work, scaled=policy.data_aware == "awq_gptq", held_out=ride)
            if policy.smoothing is not None:
                self.awq = summary(policy.smoothing)
        with meter("graph"):
            gb = GraphBuilder("main_graph", out / f"{filename}.data", float_type)
            try:
                cls(config, self.options, self.target, weights, gb, policy).build()
                gb.save(out / filename)
            finally:
                gb.close()
        if policy.rounded is not None:
            policy.rounded.log()
        if policy.data_aware or policy.budget is not None:
            with meter("report"):
                self.report = stream_report(cls, config, self.options, weights, policy,
                                            self.plugins, source, work / "report", held_out)
        if work.exists():
            shutil.rmtree(work)

    def genai_config(self, config: DecoderConfig, source: Path) -> dict:
        return genai_config(config, self.target, source, self.options.extra,
                            self.cls.genai_model_type, self.cls.genai_decoder(config))

    def finish(self, out: Path, source: Path, meter: StageMeter) -> None:
        pass


class PipelineFolder(DecoderFolder):
    """Static-shape targets (qnn): an onnxruntime-genai decoder-pipeline folder
    (``builder.pipeline``), calibrated when -p is a QDQ precision, compiled to EPContext
    models when asked."""

    def check(self, config: DecoderConfig, cls) -> None:
        super().check(config, cls)
        check_options(self.options, config)
        check_layer_kinds(cls, config, self.target.name)
        resolve_splits(self.options, config, cls)

    def policy(self, config: DecoderConfig, plugins: Plugins) -> QuantPolicy:
        o = self.options
        if o.precision not in QDQ_PRECISIONS:
            return QuantPolicy()
        algorithm = o.extra.int4_algo_config
        kept = self.stored is not None and o.precision in FOUR_BIT and \
            self.stored.fits_qdq_blocks() and o.extra.qnn_int4_format == "float_block"
        if algorithm == "default" and kept:  # (the checkpoint's codes: nothing to search)
            algorithm = "rtn"
        elif algorithm == "default":
            algorithm = static_default(o.precision)
            problem = hybrid_problem(self.cls, config, algorithm)
            if problem:  # (*_mixed measures attention and MLP projections only: gptq alone
                # where it knows the layers', else rtn)
                algorithm = "rtn" if hybrid_problem(self.cls, config, "gptq") else "gptq"
                logger.info("weights: %s (the default at -p %s, as %s)", algorithm,
                            o.precision, problem)
            else:
                logger.info("weights: %s (the default at -p %s)", algorithm, o.precision)
        elif algorithm in DATA_AWARE or algorithm in MEASURED:
            problem = hybrid_problem(self.cls, config, algorithm)
            if problem:
                raise OptionError(f"int4_algo_config={algorithm}: {problem}; use " + (
                    "rtn" if hybrid_problem(self.cls, config, "gptq") else "gptq or rtn"))
        if algorithm not in STATIC_ALGORITHMS:
            raise OptionError(f"int4_algo_config={algorithm} does not apply on -e qnn (lm_head "
                              "is int8 there); choose from "
                              f"{', '.join(STATIC_ALGORITHMS)}")
        if algorithm in MEASURED and o.precision not in FOUR_BIT:
            raise OptionError(f"int4_algo_config={algorithm} promotes 4-bit weights to 8 bits: "
                              f"it applies on -e qnn to -p w4a16 only, not -p {o.precision}")
        if o.precision in FOUR_BIT and o.extra.qnn_linear == "matmul":
            check_blocks(config, o.extra.int4_block_size)
        return dataclasses.replace(QuantPolicy.static_qdq(
            4 if o.precision in FOUR_BIT else 8, o.extra.int4_block_size,
            o.extra.qnn_linear == "conv", o.extra.qnn_int4_format == "lpbq"), data_aware=DATA_AWARE.get(algorithm),
            budget=o.extra.quant_budget if algorithm in MEASURED else None)

    def write(self, out: Path, cls, config: DecoderConfig, weights: CheckpointReader,
              policy: QuantPolicy, float_type, meter: StageMeter, source: Path) -> None:
        """Float graphs: written. QDQ precisions: the float layers calibrated one at a time,
        the QDQ graphs written with those ranges, then the accuracy report (calibrated layers
        against float ones), all in a work folder that is removed."""
        o = self.options
        builder = cls(config, o, self.target, weights, None, QuantPolicy())
        check_lowered(builder, self.target.name)
        self.kv = kv_cache_figures(config, o.extra.qnn_context_length,
                                   self.kv_bits() if o.precision in QDQ_PRECISIONS else 16, cls)
        pad = token_ids(config, generation(source))[2]
        if o.precision not in QDQ_PRECISIONS:
            with meter("graph"):
                write_pipeline(out, builder, float_type, pad)
            return
        bits = 8 if o.precision == Precision.W8A8 else 16
        prefill, context = o.extra.qnn_prefill_length, o.extra.qnn_context_length
        work = out / ".work"
        stream_args = (work, prefill, context, float_type)
        noise = None  # *_mixed: measured in calibration's pass; before it with gptq, whose
        if policy.budget is not None and policy.data_aware:  # rounding needs the choice
            with meter("measure"):
                ids = prompts(o.extra, source, context)
                promoted, self.mixed = measure(
                    LayerStream(builder, *stream_args),
                    [sequence(p, [], prefill, pad, True, False) for p in ids],
                    policy.quantizer(policy.bits), builder.packed, policy.bits, policy.budget,
                    part_room(o, config, cls))
                object.__setattr__(policy, "promoted", promoted)
        elif policy.budget is not None:
            noise = OutputNoise(builder, work, policy.quantizer(policy.bits))
        with meter("calibrate"):
            held_out = evaluation_sequences(source, context, prefill, pad)
            float_rows, held_out_values = StreamProbe(held_out, prefill), TensorStats()
            if policy.data_aware == "awq":
                rounding = qdq_smoothing(builder, work, policy)
            elif policy.data_aware == "awq_gptq":
                rounding = AwqGptq(qdq_smoothing(builder, work, policy),
                                   qdq_rounding(builder, work, out / ".rounded", policy))
            elif policy.data_aware:
                rounding = qdq_rounding(builder, work, out / ".rounded", policy,
                                        o.extra.gptq_sequential)
            else:
                rounding = noise
            calibration = calibrate(LayerStream(builder, *stream_args), o.extra, source, pad,
                                    held_out, empty_cache=self.empty_cache, observe=float_rows,
                                    unrecorded=held_out_values, rounding=rounding)
            unite_tokens(calibration.ranges)
            unite_phases(calibration.ranges)
            if o.extra.qnn_kv_bits == 8:
                tie_kv_ranges(calibration.ranges)
            activations = Calibrated(bits, calibration.ranges, self.headroom(bits, cls),
                                     o.extra.qnn_kv_bits, cls.headroom_scopes)
            if policy.rounded is not None:
                policy.rounded.log_towards()
            held_out_values.close()
            if noise is not None:
                promoted, self.mixed = decide(noise, builder.packed, policy.bits, policy.budget,
                                              part_room(o, config, cls))
                object.__setattr__(policy, "promoted", promoted)
        if policy.smoothing is not None:
            self.awq = summary(policy.smoothing)
        builder.policy = policy
        object.__setattr__(policy, "weight_errors", {})  # (the sensitivity's weights)
        with meter("graph"):
            write_pipeline(out, builder, float_type, pad, activations)
        with meter("report"):
            quantized = evaluation_sequences(source, context, prefill, pad)
            for s, embeddings in zip(quantized, calibration.embeddings):
                s.hidden = list(embeddings)  # the lookup is float: the same inputs_embeds
            stream = LayerStream(builder, *stream_args, qdq=activations)
            quantized_rows = StreamProbe(quantized, prefill)
            stream.run(quantized, desc="accuracy report", observe=quantized_rows)
            label = f"w{4 if o.precision in FOUR_BIT else 8}a{bits}"
            lm_head = weights.rows(
                cls.weight_names[R.EMBED if config.tie_word_embeddings else R.LM_HEAD])
            finish = LayerStream(builder, *stream_args).final_logits
            bias = builder.lm_head_bias()
            self.report = accuracy_report(stream.logit_slices, held_out, quantized, prefill,
                                          lm_head, label, finish, bias=bias)
        with meter("sensitivity"):
            kinds = None
            if o.extra.qnn_sensitivity:
                def evaluate(head, sequences):
                    return overall(accuracy_report(head, held_out, sequences, prefill, lm_head,
                                                   label, finish, log=False, bias=bias))
                kinds = kinds_of_error(builder, policy, activations, stream_args, held_out,
                                       calibration.embeddings,
                                       float_head(lm_head, finish, bias),
                                       evaluate)
            self.sensitivity = summarize(layer_figures(float_rows.rows, quantized_rows.rows),
                                         tensor_figures(held_out_values, activations), kinds,
                                         weight_figures(policy.weight_errors))
        work.rmdir()
        if policy.rounded is not None:
            shutil.rmtree(out / ".rounded")

    empty_cache = False  # calibrate decode on an empty KV cache: for the tests' comparison

    def headroom(self, bits: int, cls) -> float:
        """qnn_calibration_headroom, resolved (2 for 16-bit activations, 1 for 8-bit: see
        ``Calibrated``), logged (with what it widens: ``cls.headroom_scopes``) and written back
        into the options for the manifest."""
        o = self.options
        headroom = o.extra.qnn_calibration_headroom
        if headroom is None:
            headroom = 2.0 if bits == 16 else 1.0
            object.__setattr__(o, "extra", dataclasses.replace(
                o.extra, qnn_calibration_headroom=headroom))
        logger.info("activation ranges: as calibrated, those under %s widened %gx around 0 "
                    "(qnn_calibration_headroom)%s", ", ".join(cls.headroom_scopes), headroom,
                    "; Softmax, Sigmoid and Tanh over their whole range" if bits == 16 else "")
        return headroom

    def kv_bits(self) -> int:
        """qnn_kv_bits, resolved (8 at w4a16, where it measured the same as 16 bits on the
        trained checkpoints; 16 at w8a16 and w8a8, where 8 bits raised the report's prefill KL
        1.4-3x: README), logged and written back into the options for the manifest."""
        o = self.options
        bits = kv_bits(o)
        object.__setattr__(o, "extra", dataclasses.replace(o.extra, qnn_kv_bits=bits))
        logger.info("KV cache: %s", "uint8 buffers, each layer's K and V over one range shared "
                    "by past and present" if bits == 8 else "float16 buffers")
        return bits

    def genai_config(self, config: DecoderConfig, source: Path) -> dict:
        return genai_pipeline_config(config, self.options, self.target, source, self.cls)

    def finish(self, out: Path, source: Path, meter: StageMeter) -> None:
        o = self.options
        self.device = device_memory(out, self.kv, 1 if o.precision == Precision.W8A8 else 2)
        if o.extra.qnn_epcontext:
            with meter("compile"):
                compile_pipeline(out, o)


def folder_for(options: BuildOptions, target: TargetCaps) -> DecoderFolder:
    """The target owns how its folder is written."""
    return (PipelineFolder if target.static_shapes else DecoderFolder)(options, target)


def build(options: BuildOptions, plugins: Plugins | None = None) -> Path:
    """Build the model folder ``options.output``; returns its path."""
    plugins = plugins or default_plugins()
    options = with_plugin_defaults(options, plugins)
    meter = StageMeter()
    target = _target(options, plugins)  # flag errors first: nothing fetched, nothing written
    try:
        _build(options, plugins, target, meter)
    except OSError as e:  # disk full, permissions, a read error: the staging folder is gone
        if e.errno == errno.ENOMEM:
            raise MemoryError(str(e)) from None  # (memory, not the file named: the cli says so)
        where = f"{e.filename}: " if e.filename else ""
        raise OutputError(f"{where}{e.strerror or e} while building "
                          f"{Path(options.output).absolute()}; nothing was written") from None
    logger.info("model folder ready: %s", options.output)
    return Path(options.output)


def with_plugin_defaults(options: BuildOptions, plugins: Plugins) -> BuildOptions:
    """``options`` with the defaults of the options ``plugins`` declare and ``options.extra``
    lacks (parsed against other plugins than those of this build)."""
    given = dict(options.extra.plugin_values)
    missing = tuple((o.name, o.default) for o in plugins.options.values() if o.name not in given)
    if not missing:
        return options
    extra = dataclasses.replace(options.extra,
                                plugin_values=options.extra.plugin_values + missing)
    return dataclasses.replace(options, extra=extra)


def prequantized(folder: Path, config: DecoderConfig, cls, options: BuildOptions,
                 target: TargetCaps) -> StoredFormat | None:
    """The format of a checkpoint that arrives quantized (None: a float one, or an
    architecture that reads its own quantization_config), checked against the options: on
    cpu/cuda its linears keep their codes, so an algorithm that rounds them again is refused;
    on qnn they are dequantized and rounded again as the QDQ format wants (said in the log)."""
    if "quantization_config" in cls.read_keys():
        return None
    stored = stored_format(folder, config.extra.get("quantization_config"))
    if stored is None:
        return None
    algorithm = options.extra.int4_algo_config
    what = f"the checkpoint is quantized by {stored.method} ({stored.bits} bits, " \
           f"{f'groups of {stored.group_size}' if stored.group_size else 'per channel'})"
    if target.static_shapes and options.precision in FOUR_BIT and stored.fits_qdq_blocks() \
            and options.extra.qnn_int4_format == "float_block":
        if algorithm in DATA_AWARE or algorithm in MEASURED:
            raise OptionError(f"int4_algo_config={algorithm} rounds every linear with "
                              f"calibration data, but {what} and qnn_int4_format=float_block "
                              "keeps its symmetric codes; leave int4_algo_config unset")
        logger.info("%s: its symmetric 4-bit codes and scales are kept as the float-scale int4 "
                    "blocks of qnn_int4_format=float_block (rtn for any it left in float)", what)
    elif target.static_shapes:
        logger.info("%s: -e %s stores QDQ weights%s, so its linears are dequantized and "
                    "rounded again (the accuracy report says what that costs)%s", what,
                    target.name, " as LPBQ blocks" if options.precision in FOUR_BIT and
                    options.extra.qnn_int4_format == "lpbq" else "",
                    "; qnn_int4_format=float_block keeps its codes" if
                    options.precision in FOUR_BIT and stored.fits_qdq_blocks() and
                    options.extra.qnn_int4_format == "lpbq" else "")
    elif options.precision not in (Precision.INT4, Precision.INT8):
        logger.info("%s: -p %s dequantizes its linears to float (-p int4 keeps their codes)",
                    what, options.precision.value)
    elif algorithm in DATA_AWARE or algorithm in MEASURED:
        raise OptionError(f"int4_algo_config={algorithm} rounds every linear with calibration "
                          f"data, but {what} and -p {options.precision.value} keeps its codes; "
                          "leave int4_algo_config unset (it applies to what the checkpoint "
                          "left in float, lm_head)")
    else:
        logger.info("%s: its linears keep their codes (MatMulNBits, the checkpoint's "
                    "groups); what it left in float follows -p %s", what,
                    options.precision.value)
    return stored


def adapters_of(options: BuildOptions, target: TargetCaps) -> tuple[tuple, tuple]:
    """The LoRA adapters (adapter_path): (merged into the weights, kept apart)."""
    paths = options.extra.adapter_path
    if not paths:
        return (), ()
    merge = options.extra.lora_merge
    if merge is None:
        merge = target.static_shapes
    if not merge and target.static_shapes:
        raise OptionError(f"lora_merge=false: -e {target.name}'s static graphs cannot switch "
                          "adapters at run time; merge one (lora_merge=true)")
    if merge and len(paths) > 1:
        raise OptionError(f"adapter_path names {len(paths)} adapters and lora_merge=true "
                          "merges one; keep them apart (lora_merge=false, cpu/cuda) or build "
                          "one folder per adapter")
    adapters = tuple(load_adapters(paths, options.cache_dir, options.extra.hf_token))
    if merge:
        logger.info("adapter %s: merged into the weights before quantization", adapters[0].name)
        return adapters, ()
    return (), adapters


ROUNDED_WHY = {"changed": "the architecture changed their values",
               "mixed": "they stack linears stored with different bits, blocks or column "
                        "orders (GPTQ's desc_act: --extra_options unpack_matmul=true keeps "
                        "each its own)",
               "layout": "the node stores them in one layout that theirs is not (QMoE's "
                         "experts: int4_block_size, zero points as -p int4 chooses)"}


def warn_rounded(rounded: dict[str, str]) -> None:
    """Say which of a pre-quantized checkpoint's linears the build rounded again, and why (the
    ones it stored in float are rounded as any float weight: not a loss)."""
    for why, text in ROUNDED_WHY.items():
        nodes = [node for node, w in rounded.items() if w == why]
        if nodes:
            logger.warning("%d MatMul(s) could not keep the checkpoint's codes and were rounded "
                           "again, because %s: %s", len(nodes), text, ", ".join(nodes))


def _build(options: BuildOptions, plugins: Plugins, target: TargetCaps,
           meter: StageMeter) -> None:
    # the output folder is checked, locked and staged before anything is fetched
    with StagedOutput(options.output) as tmp, logging_redirect_tqdm():
        with meter("source"):
            source = resolve(options.model_name, options.input, options.cache_dir,
                             options.extra.hf_token, weights=not options.extra.config_only)
        config_file = checkpoint_file(source.path, "config.json")
        cls = _architecture(DecoderConfig.architecture_in(config_file), plugins)
        config = cls.config_class.from_file(config_file, cls.config_defaults,
                                            cls.config_aliases)
        stored = prequantized(source.path, config, cls, options, target)
        merged, apart = adapters_of(options, target)
        check_keys(config, cls.read_keys() | ({"quantization_config"} if stored else set()),
                   cls.__name__, ignored=options.extra.config_keys_ignored)
        check_tokenizer_files(source.path)
        logger.info("%s → %s (%s), -p %s -e %s", source.repo_id or source.path, cls.__name__,
                    plugins.architectures.owner(config.architecture), options.precision,
                    target.name)
        config = _fewer_layers(config, options.extra.num_hidden_layers)
        check_plugin_options(options, plugins, config.architecture)
        if options.precision in (Precision.INT4, Precision.INT8) and not target.static_shapes:
            check_shared_table(options, config)
        folder = folder_for(options, target)
        folder.stored = stored
        folder.check(config, cls)
        check_model_type(config, cls, target)
        policy = folder.policy(config, plugins)
        peak = check_memory(options, config, cls, target.static_shapes)
        logger.info("memory: about %.0f MiB at the peak, estimated from the shapes (largest: "
                    "%s)", peak["total"] / 2**20,
                    max((k for k in peak if k != "total"), key=peak.get))

        weight_files: list[Path] = []
        kept = None
        if options.extra.config_only:
            logger.info("config_only: writing genai_config.json and tokenizer files, no model")
        else:
            float_type = FLOAT_DTYPES.get(options.precision,
                                          FLOAT_DTYPES[target.quantized_float])
            with CheckpointReader(source.path, stored, merged, apart) as weights:
                folder.write(tmp, cls, config, weights, policy, float_type, meter, source.path)
                weight_files = weights.files()
                kept = weights.summary()
            if kept is not None:
                warn_rounded(kept["rounded_by_build"])
            if folder.report is not None and options.extra.quant_accuracy_check:
                check_accuracy(folder.report)
        with meter("package"):
            write_genai_files(tmp, folder.genai_config(config, source.path), source.path)
        checked = None
        if not options.extra.config_only:
            with meter("run check"):  # (before EPContext compiles: the graphs run on the CPU)
                checked = run_check(tmp, options)
            folder.finish(tmp, source.path, meter)
        write_manifest(tmp, options, source, weight_files, meter.stages, folder.report,
                       folder.sensitivity, folder.mixed, folder.awq, folder.kv, folder.device,
                       checked, peak, kept)


__all__ = ["build", "BuildOptions", "ExecutionProvider", "Precision"]
