"""Build options: precision, execution provider and the --extra_options catalogue.

Every extra option is declared exactly once, as a field of ``ExtraOptions`` with its type, default,
allowed values and one line of help. ``ExtraOptions.parse`` is the only place that reads the user's
``KEY=VALUE`` strings; the rest of the builder reads typed attributes.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.errors import OptionError, did_you_mean


class Precision(enum.StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    INT4 = "int4"
    W8A16 = "w8a16"
    W4A16 = "w4a16"
    W8A8 = "w8a8"


# calibrated static QDQ on static-shape targets (qnn): there int8 = w8a16, int4 = w4a16
QDQ_PRECISIONS = (Precision.W8A16, Precision.INT8, Precision.W4A16, Precision.INT4,
                  Precision.W8A8)
FOUR_BIT = (Precision.W4A16, Precision.INT4)


class ExecutionProvider(enum.StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
    QNN = "qnn"


def _opt(default: Any, help: str, *, choices: tuple = (), implemented: bool = True,
         aliases: tuple[str, ...] = (), inverse_aliases: tuple[str, ...] = ()) -> Any:
    """Declare one extra option: its default, one line of help and how it may be spelled."""
    return field(default=default, metadata={
        "help": help, "choices": choices, "implemented": implemented,
        "aliases": aliases, "inverse_aliases": inverse_aliases})


@dataclass(frozen=True)
class PluginOption:
    """An extra option a plugin declares (hook ``register_options``): parsed, validated and
    listed in --help like the built-in ones; an architecture reads its value with
    ``self.extra.plugin(name)``. ``default``'s type (bool, int, float or str) is the option's
    type; an int without ``choices`` must be positive, as the built-in ones."""

    name: str
    default: bool | int | float | str
    help: str
    choices: tuple = ()

    def __post_init__(self) -> None:
        if not isinstance(self.default, (bool, int, float, str)):
            raise TypeError(f"plugin option {self.name!r}: default must be a bool, int, float "
                            f"or str, got {type(self.default).__name__}")
        if self.choices and self.default not in self.choices:
            raise ValueError(f"plugin option {self.name!r}: default {self.default!r} is not "
                             f"one of its choices {self.choices!r}")
        if (type(self.default) is int and not self.choices and self.default < 1):
            raise ValueError(f"plugin option {self.name!r}: an int option without choices is "
                             f"a positive integer, but its default is {self.default}")


@dataclass(frozen=True)
class ExtraOptions:
    """The --extra_options catalogue. Field order is the order of --help and the README table."""

    shared_embeddings: bool | None = _opt(
        None, "One table serves the embedding lookup and lm_head. Default: the checkpoint's "
        "tie_word_embeddings (true for tied models, false otherwise); true on an untied model "
        "is an error.")
    hf_token: str | None = _opt(
        None, "Hugging Face token for gated or private repositories (default: the cached login).")
    int4_algo_config: str = _opt(
        "default", "Weight quantization algorithm and lm_head policy for -p int4/int8: "
        "default: k_quant_last at -p int4, rtn at int8, gptq_mixed at -e qnn -p w4a16, gptq "
        "at w8a16, rtn at w8a8 (chosen by measured accuracy per byte); rtn (round to "
        "nearest, as onnxruntime's quantizer); k_quant (llama.cpp's scale and minimum "
        "search; always with zero points); *_last: lm_head at 8 bits; "
        "k_quant_mixed: also 8-bit qkv/v and down in llama.cpp's sensitive layers (fixed "
        "positions, as onnxruntime-genai's builder); gptq: the layers' projections rounded by "
        "GPTQ on calibration prompts, layer by layer (others rtn); gptq_last: and lm_head at 8 "
        "bits; awq: activation-aware scaling, per input channel of q/k/v, gate/up and down, "
        "searched on the calibration prompts layer by layer and folded into the norms and up "
        "(then rtn); awq_last: and lm_head at 8 bits; awq_gptq, awq_gptq_last: AWQ's scales, "
        "then GPTQ on the scaled weights, from one pass per layer; rtn_mixed, gptq_mixed: "
        "lm_head at 8 bits and the projections whose 4-bit rounding costs their layer's "
        "output most, measured on the calibration prompts, at 8 bits within quant_budget. On "
        "-e qnn: default, rtn, gptq, "
        "awq, awq_gptq, and (w4a16) rtn_mixed, gptq_mixed.",
        aliases=("algo_config",),
        choices=("default", "rtn", "rtn_last", "k_quant", "k_quant_last", "k_quant_mixed",
                 "gptq", "gptq_last", "awq", "awq_last", "awq_gptq", "awq_gptq_last",
                 "rtn_mixed", "gptq_mixed"))
    quant_budget: float = _opt(
        0.2, "int4_algo_config=rtn_mixed or gptq_mixed (the default at -e qnn -p w4a16): the "
        "extra bytes the 8-bit projections may take, as a fraction of every layer's "
        "projections at 4 bits (0.2: 20% more; each promoted weight takes half a byte more).")
    gptq_sequential: bool = _opt(
        False, "int4_algo_config=gptq, gptq_last, gptq_mixed (and -e qnn -p w4a16's and w8a16's "
        "defaults): "
        "true rounds a layer's projections an input at a time (q/k/v, o, gate/up, down), each "
        "on what the layer computes with the ones before it rounded, and towards the float "
        "layer's outputs where that measures closer on the calibration prompts (w4a16 on the "
        "trained tiny checkpoints: closer to float on the HTP for all six, the held-out KL "
        "lower in 11 of 12 figures), for three more passes of the calibration prompts' prefill "
        "per layer, each running only the part of the layer it needs (Qwen3-0.6B's mission "
        "command 1.27x the default's time, 2.0x rtn_mixed's; Qwen3-8B's shape 31-45 s more "
        "a layer in two runs); "
        "false: all from one pass of the layer as it stood, as GPTQ's own.")
    gptq_act_order: bool = _opt(
        True, "int4_algo_config=gptq, gptq_last, gptq_mixed, awq_gptq, awq_gptq_last (and -e "
        "qnn -p w4a16's and w8a16's defaults): true rounds each weight's input columns from "
        "the input of the largest mean square down (GPTQ's act order), every block's scale "
        "from the weight as given (the stored blocks and layout unchanged); false: in the "
        "weight's order, each block's scale from its columns as the earlier errors left them.")
    quant_accuracy_check: bool = _opt(
        True, "Quantized builds with an accuracy report (-e qnn w8a16/w4a16/w8a8; gptq, awq and "
        "*_mixed on cpu/cuda): stop, writing nothing, when the report shows the build broken "
        "(mean logit cosine below 0.5 in prefill or decode); false writes it anyway.")
    int4_block_size: int = _opt(
        32, "Block size (along the input dimension) of int4/int8 weight quantization.",
        choices=(16, 32, 64, 128, 256))
    int4_is_symmetric: bool = _opt(
        True, "Symmetric rtn weights (no zero points); k_quant is always asymmetric.")
    int4_accuracy_level: int | None = _opt(
        None, "MatMulNBits accuracy_level, the type activations are computed in (0 unset, 1 "
        "fp32, 2 fp16, 3 bf16, 4 int8). Default: 4 on cpu, 0 on cuda.", choices=(0, 1, 2, 3, 4))
    int4_nodes_to_exclude: tuple[str, ...] = _opt(
        (), "Comma-separated MatMul node names to keep in float, e.g. /lm_head/MatMul.")
    int4_op_types_to_quantize: tuple[str, ...] = _opt(
        ("MatMul",), "Comma-separated op types to quantize: MatMul, and Gather for the "
        "embedding (GatherBlockQuantized).")
    adapter_path: tuple[str, ...] = _opt(
        (), "LoRA adapters, comma-separated PEFT folders (adapter_config.json, "
        "adapter_model.safetensors) or hub ids. Merged into the weights before quantization "
        "(lora_merge=true: one adapter), or kept apart on cpu/cuda: the adapted projections "
        "gain LoRA MatMuls whose weights are graph inputs, and each adapter is written as "
        "adapters/<folder name>.onnx_adapter for onnxruntime-genai's Adapters API.")
    lora_merge: bool | None = _opt(
        None, "With adapter_path: merge the adapter into the weights (true; the default on -e "
        "qnn, whose static graphs cannot switch adapters) or keep each apart, switched at run "
        "time (false; the default on cpu and cuda).")
    unpack_matmul: bool | None = _opt(
        None, "Separate q/k/v (and gate/up) MatMuls instead of packed ones, keeping the "
        "checkpoint's Llama-style layout (default: packed on cpu and cuda).",
        inverse_aliases=("fuse_qkv",))
    exclude_embeds: bool = _opt(
        False, "Drop the embedding lookup: the model takes inputs_embeds [batch, sequence, "
        "hidden] instead of input_ids.")
    exclude_lm_head: bool = _opt(
        False, "Drop lm_head: the model outputs hidden_states (after the final norm) instead "
        "of logits.")
    include_hidden_states: bool = _opt(
        False, "Also output hidden_states (after the final norm) beside logits.")
    prune_lm_head: bool = _opt(
        False, "Compute logits for the last position only: logits is [batch, 1, vocab].")
    num_hidden_layers: int | None = _opt(
        None, "Build only the first N layers (the others' weights are left unused).")
    config_keys_ignored: tuple[str, ...] = _opt(
        (), "Comma-separated config.json keys the build may leave unread, where you know they "
        "change nothing for this model (any other key the architecture does not read is an "
        "error: it may change the math in transformers).")
    filename: str = _opt(
        "model.onnx", "Name of the ONNX file; its weights go to <filename>.data.")
    config_only: bool = _opt(
        False, "Write genai_config.json and the tokenizer files only, no model.")
    run_check: str = _opt(
        "auto", "The build's last stage: open the folder as its user will (onnxruntime-genai "
        "when installed, else onnxruntime, on the CPU) and generate one token, before the "
        "folder is put in place. auto: when the folder's weights are at most 2 GiB (a larger "
        "model would need its whole size in memory again; the log says it was skipped); "
        "true: always; false: never.", choices=("auto", "true", "false"))
    qnn_prefill_length: int = _opt(
        64, "-e qnn: tokens per prefill call (P); longer prompts are prefilled in chunks of P.")
    qnn_context_length: int | None = _opt(
        None, "-e qnn: fixed context length C (KV cache rows); prompt plus generated tokens "
        "must fit. Must be larger than qnn_prefill_length. Default: 2048, or the model's "
        "max_position_embeddings when that is smaller.")
    qnn_soc_model: str = _opt(
        "60", "-e qnn: QNN soc_model provider option (60: Snapdragon 8 Gen 3 / X Elite).")
    qnn_htp_arch: str = _opt("73", "-e qnn: QNN htp_arch provider option (73: v73).",
                             choices=("68", "69", "73", "75", "79", "81"))
    qnn_linear: str = _opt(
        "matmul", "-e qnn: layer projections as MatMul, or as 1x1 Conv over [1, in, 1, seq].",
        choices=("matmul", "conv"))
    qnn_int4_format: str = _opt(
        "lpbq", "-e qnn -p w4a16: the form of int4 weight blocks on MatMul. lpbq: each block's "
        "scale a multiplier 1..16 of a per-channel scale (the form the HTP runs as w4a16, "
        "HTP v69+); float_block: a float scale per block.", choices=("lpbq", "float_block"))
    qnn_kv_bits: int | None = _opt(
        None, "-e qnn, quantized (w8a16, w4a16, w8a8): the KV cache's bits. 16: float16 "
        "buffers (quantized to 16 bits inside the graphs); 8: uint8 buffers, each layer's K and "
        "V over one calibrated range shared by past and present (half the KV memory). Default: "
        "8 at w4a16, 16 at w8a16 and w8a8.", choices=(16, 8))
    qnn_calibration: str | None = _opt(
        None, "-e qnn, quantized (w8a16, w4a16, w8a8), and the data-aware int4_algo_config "
        "(gptq, awq, *_mixed) on any target: a text file of calibration prompts, one per "
        "line, or a .json file of prompts as token ids ([[1, 2, 3], [4, 5]], or rows whose "
        "input_ids is one), taken as they are (default: the prompts shipped with builder).",
        aliases=("calibration",))
    qnn_calibration_samples: int = _opt(
        24, "-e qnn, quantized (w8a16, w4a16, w8a8), and the data-aware int4_algo_config "
        "(gptq, awq, *_mixed) on any target: at most this many calibration prompts (the "
        "shipped file has 93).",
        aliases=("calibration_samples",))
    qnn_calibration_tokens: int = _opt(
        2400, "-e qnn, quantized (w8a16, w4a16, w8a8), and the data-aware int4_algo_config "
        "(gptq, awq, *_mixed) on any target: the calibration prompts are taken in order while "
        "they hold at most this many tokens of the model's tokenizer (the first one always).",
        aliases=("calibration_tokens",))
    qnn_calibration_steps: int = _opt(
        16, "-e qnn, quantized (w8a16, w4a16, w8a8): each prompt is continued by this many "
        "tokens minus one of the text that follows it, one decode call each (the decode graph "
        "is calibrated on real text with the true, growing KV cache).")
    qnn_calibration_coverage: int | None = _opt(
        None, "-e qnn, quantized (w8a16, w4a16, w8a8): calibration also prefills at most this "
        "many tokens of the vocabulary whose embeddings hold a dimension's largest or smallest "
        "value beyond what the calibration prompts' tokens hold (the farthest first), so that "
        "a prompt's rare token is not clipped; 0: the prompts alone. Default 256 with 16-bit "
        "activations and KV cache (w8a16; w4a16 with qnn_kv_bits=16), 0 with either at 8 bits "
        "(w4a16's default uint8 KV, w8a8).")
    qnn_calibration_method: str = _opt(
        "minmax", "-e qnn, quantized: activation range estimator (percentile: histograms cut "
        "at 99.999% on each side).",
        choices=("minmax", "percentile"))
    qnn_calibration_headroom: float | None = _opt(
        None, "-e qnn, quantized: the calibrated ranges of the MLP's activations (and of the "
        "values an architecture names alike: LFM2's convolutions, Granite 4.0-H's gated norm) "
        "are widened by this factor (at least 1), so that tokens the calibration prompts did not "
        "hold are not clipped; default 2 with 16-bit activations (w8a16, w4a16), 1 with 8-bit "
        "(w8a8).")
    qnn_sensitivity: bool = _opt(
        False, "-e qnn, quantized: also measure the logit error with only the transformer's "
        "weights, only its activations, only lm_head, and each layer alone quantized (one more "
        "pass of the held-out prompts each: the report's time x (3 + layers)); written to "
        "build_manifest.json under sensitivity.kinds.")
    qnn_num_splits: int | str = _opt(
        "auto", "-e qnn: the transformer as N consecutive layer ranges, each a prefill and a "
        "decode graph of its own (its own context on the HTP); auto: the fewest that keep each "
        "part's weights under 1 GiB.")
    qnn_epcontext: bool = _opt(
        False, "-e qnn: precompile each QNN graph into an EPContext model (context binary) at "
        "build time with onnxruntime-qnn; genai_config.json points at the compiled models.")
    qnn_weight_sharing: bool = _opt(
        False, "-e qnn, qnn_epcontext=true: compile each part's prefill and decode graphs (and "
        "lm_head's two) into one context binary holding their weights once (HTP v73+). Not "
        "run here: the x86 HTP simulator cannot load a context of two graphs (README).")

    # the values of the loaded plugins' own options (PluginOption), every one declared: (name,
    # value) pairs; read with ``plugin(name)``
    plugin_values: tuple[tuple[str, Any], ...] = field(default=(), metadata={"plugin": True})
    # the options the user gave (parse; built-in and plugins'), whatever their values: one that
    # does nothing in the build is refused even when given at its default
    given: tuple[str, ...] = field(default=(), metadata={"internal": True})

    @classmethod
    def default(cls, name: str) -> Any:
        """A built-in option's default."""
        return cls.__dataclass_fields__[name].default

    def plugin(self, name: str) -> Any:
        """The value of a plugin's own option ``name`` (its default when not given)."""
        values = dict(self.plugin_values)
        if name not in values:
            raise OptionError(f"extra option {name!r} is not declared by any loaded plugin "
                              "(a plugin declares its options in the register_options hook)")
        return values[name]

    @classmethod
    def catalogue(cls) -> list[dataclasses.Field]:
        """The built-in options (a plugin's are PluginOption)."""
        return [f for f in dataclasses.fields(cls)
                if not f.metadata.get("plugin") and not f.metadata.get("internal")]

    @classmethod
    def parse(cls, items: list[str] | None,
              plugin_options: Iterable[PluginOption] | None = None) -> ExtraOptions:
        """Parse ``["key=value", ...]``; raise OptionError for unknown keys and bad values.
        ``plugin_options``: the options the loaded plugins declare (default: those of the
        entry-point plugins)."""
        if plugin_options is None:
            from builder.plugins import default_plugins

            plugin_options = default_plugins().options.values()
        declared = {o.name: o for o in plugin_options}
        by_name: dict[str, tuple[Option, bool]] = {}
        for f in cls.catalogue():
            option = Option.of(f)
            by_name[f.name] = (option, False)
            by_name.update({a: (option, False) for a in f.metadata["aliases"]})
            by_name.update({a: (option, True) for a in f.metadata["inverse_aliases"]})
        by_name.update({name: (Option.of_plugin(o), False) for name, o in declared.items()})
        values: dict[str, Any] = {}
        for item in items or []:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise OptionError(f"extra option {item!r} is not KEY=VALUE")
            if key not in by_name:
                raise OptionError(f"unknown extra option {key!r}{did_you_mean(key, by_name)}; "
                                  "see --help for the list")
            option, inverse = by_name[key]
            value = _coerce(option, key, raw.strip())
            if inverse:
                value = not value
            if option.name in values and values[option.name] != value:
                raise OptionError(f"extra option {option.name!r} given twice with different "
                                  "values")
            values[option.name] = value
        for name in values:
            if not by_name[name][0].implemented:
                raise OptionError(f"extra option {name!r} is not supported yet")
        given = tuple(sorted(values))
        plugin = tuple((name, values.pop(name, o.default)) for name, o in sorted(declared.items()))
        return cls(**values, plugin_values=plugin, given=given)


@dataclass(frozen=True)
class Option:
    """What parsing needs of an option, built-in (a field of ExtraOptions) or a plugin's."""

    name: str
    kind: str        # the type's name: bool, int, float, str, tuple
    default: Any
    choices: tuple
    implemented: bool = True

    @classmethod
    def of(cls, f: dataclasses.Field) -> Option:
        return cls(f.name, str(f.type), f.default, f.metadata["choices"],
                   f.metadata["implemented"])

    @classmethod
    def of_plugin(cls, o: PluginOption) -> Option:
        return cls(o.name, type(o.default).__name__, o.default, o.choices)


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(f: Option, key: str, raw: str) -> Any:
    kind = f.kind
    if f.default == "auto" and raw == "auto":  # an integer option that the build may choose
        return raw
    try:
        if kind.startswith("bool"):
            if raw.lower() not in _TRUE | _FALSE:
                raise ValueError("expected true or false")
            value: Any = raw.lower() in _TRUE
        elif kind.startswith("int"):
            value = int(raw)
            if f.default == "auto" and value < 1:
                raise ValueError("expected auto or a positive integer")
        elif kind.startswith("float"):
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError("expected a finite number")
        elif kind.startswith("tuple"):
            value = tuple(part.strip() for part in raw.split(",") if part.strip())
        else:
            value = raw
    except ValueError as e:
        raise OptionError(f"extra option {key}={raw!r}: {e}") from None
    choices = f.choices
    if choices and value not in choices:
        shown = ", ".join(str(c) for c in choices)
        hint = did_you_mean(str(value), [str(c) for c in choices])
        raise OptionError(f"extra option {key}={raw!r} is not one of: {shown}{hint}")
    if f.name == "qnn_calibration_coverage" and value < 0:
        raise OptionError(f"extra option {key}={raw!r} must be 0 (the prompts alone) or a "
                          "positive integer")
    if kind.startswith("int") and value < 1 and not choices and \
            f.name != "qnn_calibration_coverage":
        raise OptionError(f"extra option {key}={raw!r} must be a positive integer")
    if f.name == "quant_budget" and value < 0:
        raise OptionError(f"extra option {key}={raw!r} must be at least 0")
    if f.name == "qnn_calibration_headroom" and value < 1:
        raise OptionError(f"extra option {key}={raw!r} must be at least 1 (a range is widened, "
                          "never narrowed: narrower ranges clip)")
    if f.name == "qnn_calibration_steps" and value < 2:
        raise OptionError(f"extra option {key}={raw!r} must be at least 2 (the prompt's last "
                          "token and one decode call: the decode graph is calibrated on them)")
    if f.name == "qnn_soc_model" and not (value.isdigit() and int(value) > 0):
        raise OptionError(f"extra option qnn_soc_model={raw!r} must be a QNN soc model number "
                          "(60: Snapdragon 8 Gen 3 / X Elite; the QNN SDK lists them)")
    if f.name == "filename" and (not value.endswith(".onnx") or "/" in value or "\\" in value):
        raise OptionError(f"extra option filename={raw!r} must be a plain file name ending in "
                          ".onnx")
    return value


QNN_QUANTIZED = ("qnn_kv_bits", "qnn_calibration", "qnn_calibration_samples",
                 "qnn_calibration_tokens", "qnn_calibration_steps", "qnn_calibration_coverage",
                 "qnn_calibration_method", "qnn_calibration_headroom", "qnn_sensitivity")


CALIBRATION_TEXT = ("qnn_calibration", "qnn_calibration_samples",  # also what GPTQ rounds on
                    "qnn_calibration_tokens")
MEASURED_MIXED = ("rtn_mixed", "gptq_mixed")  # promoted to 8 bits by measurement
GPTQ_ALGORITHMS = ("gptq", "gptq_last", "gptq_mixed")  # (gptq_sequential's)
ACT_ORDER_ALGORITHMS = (*GPTQ_ALGORITHMS, "awq_gptq", "awq_gptq_last")  # (gptq_act_order's)
DATA_AWARE_ALGORITHMS = ("gptq", "gptq_last", "awq", "awq_last", "awq_gptq", "awq_gptq_last",
                         *MEASURED_MIXED)  # (they read the calibration text)


def _algorithm(precision: Precision, static_shapes: bool, extra: ExtraOptions | None):
    """int4_algo_config as the build resolves it ("default" on -e qnn: the precision's)."""
    algorithm = None if extra is None else extra.int4_algo_config
    if algorithm == "default" and static_shapes and precision in QDQ_PRECISIONS:
        from builder.quant.policy import static_default

        algorithm = static_default(precision)
    return algorithm


def not_applicable(name: str, precision: Precision, static_shapes: bool,
                   extra: ExtraOptions | None = None) -> str | None:
    """Why extra option ``name``, given, does nothing in this build; None when it applies.
    An option that would be silently ignored is refused instead."""
    if name in CALIBRATION_TEXT and not static_shapes:
        if precision in (Precision.INT4, Precision.INT8) and extra is not None \
                and extra.int4_algo_config in DATA_AWARE_ALGORITHMS:
            return None
        return ("applies to -e qnn and to int4_algo_config=gptq, gptq_last, awq, awq_last, "
                "awq_gptq, awq_gptq_last, rtn_mixed and gptq_mixed (-p int4, int8) only")
    if name == "lora_merge" and (extra is None or not extra.adapter_path):
        return "applies with adapter_path only"
    if name == "quant_budget" and _algorithm(precision, static_shapes, extra) \
            not in MEASURED_MIXED:
        return ("applies to int4_algo_config=rtn_mixed or gptq_mixed (the default at -e qnn "
                "-p w4a16) only")
    if name == "gptq_act_order":
        if _algorithm(precision, static_shapes, extra) not in ACT_ORDER_ALGORITHMS:
            return ("applies to int4_algo_config=gptq, gptq_last, gptq_mixed, awq_gptq and "
                    "awq_gptq_last (and the defaults at -e qnn -p w8a16 and w4a16) only")
    if name == "gptq_sequential":
        if _algorithm(precision, static_shapes, extra) not in GPTQ_ALGORITHMS:
            return ("applies to int4_algo_config=gptq, gptq_last and gptq_mixed (the defaults "
                    "at -e qnn -p w8a16 and w4a16) only")
    if name.startswith("qnn_") and not static_shapes:
        return "applies to -e qnn only"
    if name == "qnn_weight_sharing" and (extra is None or not extra.qnn_epcontext):
        return "applies with qnn_epcontext=true only (it shapes the compiled context binaries)"
    if name == "qnn_int4_format":
        if precision not in FOUR_BIT:
            return f"applies on -e qnn to -p w4a16 (int4) only, not -p {precision}"
        if extra is not None and extra.qnn_linear == "conv":
            return ("applies to MatMul projections only (qnn_linear=conv quantizes its int4 "
                    "weights per channel)")
    if name in QNN_QUANTIZED and precision not in QDQ_PRECISIONS:
        return (f"applies to quantized -e qnn builds only (-p w8a16, w4a16, w8a8), not "
                f"-p {precision}")
    if name.startswith("int4_") and static_shapes:
        if name == "int4_algo_config":
            if precision not in QDQ_PRECISIONS:
                return f"applies on -e qnn to -p w8a16, w4a16 (int8, int4) and w8a8 only"
            return None
        if name == "int4_block_size":
            if precision not in FOUR_BIT:
                return f"applies on -e qnn to -p w4a16 (int4) only, not -p {precision}"
            if extra is not None and extra.qnn_linear == "conv":
                return ("applies on -e qnn to MatMul projections only (qnn_linear=conv "
                        "quantizes its int4 weights per channel)")
            return None
        return "applies to -e cpu and cuda only (on -e qnn, -p int4 means calibrated w4a16)"
    if name.startswith("int4_") and precision not in (Precision.INT4, Precision.INT8):
        return f"applies to -p int4 and int8 only, not -p {precision}"
    if name == "quant_accuracy_check" and not (
            precision in QDQ_PRECISIONS if static_shapes else
            precision in (Precision.INT4, Precision.INT8) and extra is not None
            and extra.int4_algo_config in DATA_AWARE_ALGORITHMS):
        return ("applies to builds with an accuracy report: quantized -e qnn, or -p int4/int8 "
                "with int4_algo_config=gptq, awq or *_mixed")
    if extra is not None and extra.config_only and (
            name.startswith(("int4_", "quant_")) or name in QNN_QUANTIZED
            or name in ("qnn_linear", "qnn_int4_format", "unpack_matmul", "prune_lm_head",
                        "run_check")):
        return "does nothing with config_only=true (no model is written)"
    if name in ("prune_lm_head", "include_hidden_states") and extra is not None \
            and extra.exclude_lm_head:
        return "does nothing with exclude_lm_head=true (the model has no lm_head)"
    if name == "int4_is_symmetric" and extra is not None and (
            extra.int4_algo_config in ("k_quant", "k_quant_last", "k_quant_mixed")
            or extra.int4_algo_config == "default" and precision == Precision.INT4):
        return ("does nothing with k_quant (the default int4_algo_config): k-quant blocks "
                "carry their own offset; choose int4_algo_config=rtn or gptq")
    return None


@dataclass(frozen=True)
class BuildOptions:
    """Everything one build depends on, validated once at the boundary."""

    model_name: str | None
    output: Path
    input: Path | None = None
    precision: Precision | None = Precision.FP32  # None: the target's first precision
    execution_provider: ExecutionProvider = ExecutionProvider.CPU
    cache_dir: Path | None = None
    extra: ExtraOptions = field(default_factory=ExtraOptions)

    def __post_init__(self) -> None:
        if not self.model_name and not self.input:
            raise OptionError("give a model with -m/--model_name (hub id or folder) or -i/--input")

    def to_json(self) -> dict[str, Any]:
        extra = {f.name: getattr(self.extra, f.name) for f in self.extra.catalogue()}
        extra.update(self.extra.plugin_values)
        if extra.get("hf_token"):
            extra["hf_token"] = "***"
        return {
            "model_name": self.model_name,
            "input": str(self.input) if self.input else None,
            "precision": str(self.precision),
            "execution_provider": str(self.execution_provider),
            "extra_options": {k: list(v) if isinstance(v, tuple) else v for k, v in extra.items()},
        }


def options_help(catalogue: type[ExtraOptions] = ExtraOptions,
                 plugin_options: Iterable[tuple[str, PluginOption]] = ()) -> str:
    """The extra options catalogue as text, for --help; ``plugin_options``: (plugin, option)
    pairs, listed after the built-in ones with the plugin that declares each."""
    lines = ["extra options (--extra_options KEY=VALUE ...):"]
    for f in catalogue.catalogue():
        names = ", ".join((f.name, *f.metadata["aliases"]))
        if f.metadata["inverse_aliases"]:
            names += f" (inverse: {', '.join(f.metadata['inverse_aliases'])})"
        default = f.default if not isinstance(f.default, tuple) else ",".join(f.default) or "none"
        lines += _help_entry(names, default, f.metadata["choices"], f.metadata["help"],
                             "" if f.metadata["implemented"] else " (not supported yet)")
    for plugin, o in plugin_options:
        lines += _help_entry(o.name, o.default, o.choices, o.help, f" (plugin {plugin})")
    return "\n".join(lines)


def _help_entry(names: str, default: Any, choices: tuple, text: str, note: str) -> list[str]:
    shown = f" [{' | '.join(str(c) for c in choices)}]" if choices else ""
    return [f"  {names} = {default}{shown}{note}", f"      {text}"]
