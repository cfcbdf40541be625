"""One build, end to end: source → config → architecture → graph → output folder."""

from __future__ import annotations

import dataclasses
import errno
import logging
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm.contrib.logging import logging_redirect_tqdm

from builder.config import DecoderConfig, check_keys
from builder.errors import OptionError, OutputError, UnsupportedArchitectureError
from builder.folders import folder_for
from builder.lora import load_adapters
from builder.memory import check_memory
from builder.metrics import StageMeter
from builder.options import (
    FOUR_BIT,
    BuildOptions,
    ExecutionProvider,
    Precision,
    not_applicable,
)
from builder.output import StagedOutput
from builder.package import (
    check_model_type,
    check_tokenizer_files,
    write_genai_files,
    write_manifest,
)
from builder.plugins import Plugins, default_plugins
from builder.quant.policy import DATA_AWARE, MEASURED
from builder.quant.prequantized import StoredFormat, stored_format
from builder.quant.report import check_accuracy
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
