"""What each target's folder is, and how it is written: ``DecoderFolder`` (cpu, cuda: one
decoder graph, from the float or data-aware rounded weights) and ``PipelineFolder`` (static-shape
targets, qnn: the decoder-pipeline folder, calibrated at the QDQ precisions, with its accuracy
report and sensitivity figures). ``build_model`` runs a build through one of them."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from builder.config import DecoderConfig
from builder.errors import OptionError
from builder.graph import Calibrated, GraphBuilder
from builder.metrics import StageMeter
from builder.models.static import check_layer_kinds, check_lowered
from builder.options import FOUR_BIT, QDQ_PRECISIONS, BuildOptions, Precision
from builder.package import genai_config, generation, token_ids
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
from builder.plugins import Plugins
from builder.quant import QuantPolicy
from builder.quant.awq import AwqGptq, qdq_smoothing, smooth_layers, summary
from builder.quant.calibration import calibrate, prompts, unite_phases, unite_tokens
from builder.quant.kv import tie_kv_ranges
from builder.quant.mixed import OutputNoise, decide, measure, promote
from builder.quant.policy import DATA_AWARE, MEASURED, STATIC_ALGORITHMS, static_default
from builder.quant.prequantized import StoredFormat
from builder.quant.report import (
    accuracy_report,
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
from builder.quant.ranges import TensorStats
from builder.quant.stream import LayerStream, sequence
from builder.roles import TensorRole as R
from builder.targets import TargetCaps
from builder.weights import CheckpointReader

logger = logging.getLogger(__name__)

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
        riding = held_out or ()  # (through the first such stage only)
        if policy.budget is not None:
            with meter("measure"):
                o = self.options
                packed = self.target.pack_matmuls if o.extra.unpack_matmul is None \
                    else not o.extra.unpack_matmul
                self.mixed = promote(cls, config, o, weights, policy, self.plugins, source,
                                     work, packed, riding)
        ride = riding if policy.budget is None else ()
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
            o.extra.qnn_linear == "conv", o.extra.qnn_int4_format == "lpbq"),
            data_aware=DATA_AWARE.get(algorithm),
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
        self.coverage(bits)
        with meter("calibrate"):
            held_out = evaluation_sequences(source, context, prefill, pad)
            float_rows, held_out_values = StreamProbe(held_out, prefill), TensorStats()
            if policy.data_aware == "awq":
                rounding = qdq_smoothing(builder, work, policy)
            elif policy.data_aware == "awq_gptq":
                rounding = AwqGptq(qdq_smoothing(builder, work, policy),
                                   qdq_rounding(builder, work, out / ".rounded", policy,
                                                ordered=o.extra.gptq_act_order))
            elif policy.data_aware:
                rounding = qdq_rounding(builder, work, out / ".rounded", policy,
                                        o.extra.gptq_sequential, ordered=o.extra.gptq_act_order)
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

    def coverage(self, bits: int) -> int:
        """qnn_calibration_coverage, resolved (after ``kv_bits``): 256 tokens with 16-bit
        activations and KV cache (w8a16), none where either is 8-bit, where the ranges they
        widen cost more than they save (8 prompts on the CPU EP: w8a8 on the trained Granite
        4.0-H, mean cosine 0.99041 against 0.98790 with them; w4a16's uint8 KV on the trained
        Phi-3, the report's prefill KL 3.1e-4 against 1.7e-3, 6.4e-6 with a 16-bit KV cache),
        and written back into the options for the manifest (calibration logs it)."""
        o = self.options
        if o.extra.qnn_calibration_coverage is None:
            object.__setattr__(o, "extra", dataclasses.replace(
                o.extra, qnn_calibration_coverage=256 if bits == 16 and
                o.extra.qnn_kv_bits == 16 else 0))
        return o.extra.qnn_calibration_coverage

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
