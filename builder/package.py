"""The files around the graph: genai_config.json, tokenizer and generation files, the manifest."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import shutil
from pathlib import Path
from typing import Any

from builder.config import DecoderConfig, _number, check_types
from builder.errors import ConfigError, SourceError
from builder.options import BuildOptions, ExtraOptions
from builder.output import MANIFEST, list_outputs, writing
from builder.source import Source, checkpoint_file
from builder.targets import TargetCaps

logger = logging.getLogger(__name__)

COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
# the model types onnxruntime-genai runs as a text decoder (its ModelType::IsLLM, 0.18); any
# other "type" in a decoder folder's genai_config.json fails to load ("Unsupported model_type")
GENAI_MODEL_TYPES = frozenset((
    "chatglm", "decoder", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gpt2", "gptoss",
    "granite", "granitemoehybrid", "internlm2", "lfm2", "llama", "mistral", "nemotron", "olmo",
    "phi", "phimoe", "phi3", "phi3small", "qwen2", "qwen3", "qwen3_5_moe_text", "qwen3_5_text",
    "smollm3"))
VERSIONED_PACKAGES = ("builder", "onnx", "onnxruntime", "numpy", "safetensors",
                      "huggingface-hub", "pluggy", "tqdm", "ml_dtypes")


def generation(source: Path) -> dict[str, Any]:
    """generation_config.json's values, type-checked as onnxruntime-genai reads them (token ids,
    temperature, top_k, top_p); {} without the file."""
    path = source / "generation_config.json"
    if not path.is_file():
        return {}
    gen = read_json_file(source, "generation_config.json")
    check_types({k: v for k, v in gen.items() if k.endswith("_token_id")}, str(path))
    searched = {"temperature": (lambda v: _number(v) and v >= 0, "a number, 0 or more"),
                "top_k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                          "a whole number, 0 or more"),
                "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]")}
    for key, (ok, expected) in searched.items():
        if gen.get(key) is not None and not ok(gen[key]):
            raise SourceError(f"{path}: {key} must be {expected}, got {gen[key]!r}; fix the "
                              "file or remove the key")
    return {k: v for k, v in gen.items() if v is not None}


def read_json_file(source: Path, name: str) -> dict[str, Any]:
    """A JSON object file of the checkpoint; a damaged one is an error, never copied."""
    path = checkpoint_file(source, name)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: not valid JSON ({e}); fix the file or remove it from the "
                          "checkpoint folder") from None
    if not isinstance(value, dict):
        raise SourceError(f"{path}: expected a JSON object, got {type(value).__name__}; fix the "
                          "file or remove it from the checkpoint folder")
    return value


def token_ids(config: DecoderConfig, gen: dict[str, Any]) -> tuple[int, Any, int]:
    """(bos, eos, pad) for genai_config.json; generation_config.json wins over config.json and
    missing ids fall back to the (first) eos id."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = gen.get(key, getattr(config, key))
        ids = value if isinstance(value, list) else [value]
        outside = [i for i in ids if i is not None and i >= config.vocab_size]
        if outside:
            where = "generation_config.json" if key in gen else "config.json"
            raise ConfigError(f"{where}: {key}={value} is outside the vocabulary of "
                              f"{config.vocab_size} tokens (ids 0 to {config.vocab_size - 1}); "
                              "fix the id or remove the key")
    eos = gen.get("eos_token_id", config.eos_token_id)
    eos = eos if eos is not None else 0
    first_eos = eos[0] if isinstance(eos, list) else eos
    bos = gen.get("bos_token_id", config.bos_token_id)
    pad = gen.get("pad_token_id", config.pad_token_id)
    return (bos if bos is not None else first_eos, eos, pad if pad is not None else first_eos)


def check_model_type(config: DecoderConfig, cls, target: TargetCaps) -> None:
    """A decoder folder's genai_config.json names the model type onnxruntime-genai runs it as:
    the architecture's ``genai_model_type``, else config.json's ``model_type``, which must be
    one onnxruntime-genai knows (static targets write a "decoder-pipeline" and need none)."""
    if target.static_shapes or cls.genai_model_type is not None:
        return
    if config.model_type not in GENAI_MODEL_TYPES:
        raise ConfigError(
            f"config.json: model_type {config.model_type!r} is not a model type "
            f"onnxruntime-genai runs (known: {', '.join(sorted(GENAI_MODEL_TYPES))}), so the "
            "folder would not load; fix the field (an architecture whose graph onnxruntime-genai "
            "runs as a known type names it: genai_model_type)")


def genai_config(config: DecoderConfig, target: TargetCaps, source: Path,
                 extra: ExtraOptions | None = None, model_type: str | None = None,
                 decoder: dict[str, Any] | None = None) -> dict[str, Any]:
    """onnxruntime-genai's decoder description of the model we wrote; ``decoder``: the
    architecture's further fields of it (``DecoderBuilder.genai_decoder``), its "inputs" and
    "outputs" added to the attention model's."""
    extra = extra or ExtraOptions()
    decoder = dict(decoder or {})
    more_inputs, more_outputs = decoder.pop("inputs", {}), decoder.pop("outputs", {})
    gen = generation(source)
    bos, eos, pad = token_ids(config, gen)
    provider_options = [{target.genai_provider: {}}] if target.genai_provider else []
    context = config.max_position_embeddings
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai",
                                    "provider_options": provider_options},
                "filename": extra.filename,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {
                    ("inputs_embeds" if extra.exclude_embeds else "input_ids"):
                        "inputs_embeds" if extra.exclude_embeds else "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                    **more_inputs,
                },
                "outputs": {
                    **({} if extra.exclude_lm_head else {"logits": "logits"}),
                    **({"hidden_states": "hidden_states"}
                       if extra.exclude_lm_head or extra.include_hidden_states else {}),
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                    **more_outputs,
                },
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
                **decoder,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": model_type or config.model_type,
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True,
            "length_penalty": 1.0, "max_length": context, "min_length": 0,
            "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
            "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": gen.get("temperature", 1.0), "top_k": gen.get("top_k", 50),
            "top_p": gen.get("top_p", 1.0),
        },
    }


GENAI_CONFIG = "genai_config.json"


def read_genai_config(out: Path) -> dict[str, Any]:
    return json.loads((out / GENAI_CONFIG).read_text(encoding="utf-8"))


def write_genai_config(out: Path, genai: dict[str, Any]) -> None:
    with writing(out / GENAI_CONFIG):
        (out / GENAI_CONFIG).write_text(json.dumps(genai, indent=4) + "\n", encoding="utf-8")


def write_genai_files(out: Path, genai: dict[str, Any], source: Path) -> None:
    """genai_config.json, and the tokenizer and generation files copied from the checkpoint."""
    write_genai_config(out, genai)
    copied = [name for name in COPIED_FILES if (source / name).is_file()]
    for name in copied:
        if name.endswith(".json"):
            read_json_file(source, name)  # a damaged tokenizer or generation file stops here
        if name == "tokenizer.json":
            check_tokenizer(checkpoint_file(source, name))
        with writing(out / name):
            shutil.copyfile(checkpoint_file(source, name), out / name)
    logger.info("genai_config.json written; copied %s", ", ".join(copied) or "no tokenizer files")
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        logger.warning("no tokenizer file in %s: onnxruntime-genai will not be able to "
                       "tokenize text for this model", source)


def check_tokenizer_files(source: Path) -> None:
    """onnxruntime-genai reads a tokenizer from tokenizer.json (or tokenizer.model) together
    with tokenizer_config.json: one without the other loads nothing ("Failed to open a json
    file"), so it is refused before the build starts."""
    present = [n for n in ("tokenizer.json", "tokenizer.model") if (source / n).is_file()]
    if present and not (source / "tokenizer_config.json").is_file():
        raise SourceError(f"{source / present[0]} has no tokenizer_config.json beside it, and "
                          "onnxruntime-genai reads both (the tokenizer's class and special "
                          "tokens are there): copy it from the model's repository, or remove "
                          f"{present[0]} to build a folder without a tokenizer")


def check_tokenizer(path: Path) -> None:
    """tokenizer.json as a tokenizer library loads it (``{}`` is JSON, not a tokenizer): with
    the tokenizers package when it is installed, else its required sections."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        tok = json.loads(path.read_text(encoding="utf-8"))
        missing = [k for k in ("model", "added_tokens") if k not in tok]
        if missing:
            raise SourceError(f"{path}: not a tokenizer (no {', '.join(missing)}); fix the file "
                              "or remove it from the checkpoint folder") from None
        return
    try:
        Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers package raises its own exception type
        raise SourceError(f"{path}: not a tokenizer the tokenizers package can load ({e}); fix "
                          "the file or remove it from the checkpoint folder") from None


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


# The oldest onnxruntime known to run an op (or one of its attributes) as builder writes it;
# ops not listed run on any release the other graphs need. Measured with onnxruntime's CPU
# wheels: 1.23.2 runs MoE with interleaved SwiGLU experts but refuses QMoE's block-wise
# attributes, which 1.24.4 takes; QMoE's accuracy_level is refused up to 1.30.0 and taken by
# 1.31.0 ("Unrecognized attribute").
MIN_ONNXRUNTIME = {("com.microsoft", "MoE", None): "1.23",
                   ("com.microsoft", "QMoE", None): "1.24",
                   ("com.microsoft", "QMoE", "accuracy_level"): "1.31"}


def requirements(out: Path) -> dict[str, str]:
    """{"onnxruntime": ">=X"} when a graph of the folder uses an op of MIN_ONNXRUNTIME."""
    import onnx

    versions = {MIN_ONNXRUNTIME[key]
                for graph in sorted(out.glob("*.onnx"))
                for n in onnx.load(str(graph), load_external_data=False).graph.node
                for key in [(n.domain, n.op_type, None),
                            *((n.domain, n.op_type, a.name) for a in n.attribute)]
                if key in MIN_ONNXRUNTIME}
    if not versions:
        return {}
    return {"onnxruntime": ">=" + max(versions, key=lambda v: tuple(map(int, v.split("."))))}


def write_manifest(out: Path, options: BuildOptions, source: Source, weight_files: list[Path],
                   stages: list[dict], accuracy: dict | None = None,
                   sensitivity: dict | None = None, mixed: dict | None = None,
                   awq: dict | None = None, kv_cache: dict | None = None,
                   device_memory: dict | None = None, run_check: dict | None = None,
                   memory_estimate: dict | None = None,
                   prequantized: dict | None = None) -> None:
    needs = requirements(out)
    manifest = {
        "options": options.to_json(),
        **({"requires": needs} if needs else {}),
        "versions": _versions(),
        "checkpoint": {
            "path": str(source.path),
            "repo_id": source.repo_id,
            "revision": source.revision,
            "files": [{"name": p.name, "bytes": p.stat().st_size} for p in weight_files],
            **({"quantized": prequantized} if prequantized is not None else {}),
        },
        "stages": stages,
        **({"accuracy": accuracy} if accuracy is not None else {}),
        **({"sensitivity": sensitivity} if sensitivity is not None else {}),
        **({"mixed_precision": mixed} if mixed is not None else {}),
        **({"awq": awq} if awq is not None else {}),
        **({"kv_cache": kv_cache} if kv_cache is not None else {}),
        **({"device_memory": device_memory} if device_memory is not None else {}),
        **({"run_check": run_check} if run_check is not None else {}),
        **({"memory_estimate": memory_estimate} if memory_estimate is not None else {}),
        "outputs": list_outputs(out),
    }
    with writing(out / MANIFEST):
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
