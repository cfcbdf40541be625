"""The checkpoint's config.json, parsed once into a typed, frozen DecoderConfig."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from builder.errors import ConfigError

logger = logging.getLogger(__name__)

LAYER_TYPES = ("full_attention", "sliding_attention")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, from either ``rope_parameters`` (transformers 5) or
    ``rope_theta`` + ``rope_scaling`` (older configs)."""

    theta: float = 10000.0
    type: str = "default"
    partial_rotary_factor: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def by_layer_type(cls, d: dict[str, Any], source: str) -> dict[str, RopeConfig]:
        """transformers 5's ``rope_parameters`` keyed by layer type (Gemma 3: local and global
        layers rotate differently): one RopeConfig per type; {} when the config has one for
        every layer."""
        params = d.get("rope_parameters")
        if not isinstance(params, dict) or not any(isinstance(v, dict) for v in params.values()):
            return {}
        kinds = set(LAYER_TYPES)
        if not set(params) <= kinds or not all(isinstance(v, dict) for v in params.values()):
            raise ConfigError(f"{source}: rope_parameters must be one set of parameters or one "
                              f"per layer type ({', '.join(LAYER_TYPES)}), got "
                              f"{_short(params)}")
        if d.get("rope_scaling"):
            raise ConfigError(f"{source}: rope_scaling beside rope_parameters by layer type: "
                              "say which layers it scales inside rope_parameters")
        types = d.get("layer_types") or []
        missing = sorted({t for t in types if t not in params})
        if missing:
            raise ConfigError(f"{source}: rope_parameters has no entry for layer type(s) "
                              f"{', '.join(missing)} that layer_types uses")
        ropes = {}
        for kind, sub in params.items():
            rope = cls.from_hf({**d, "rope_parameters": sub})
            if rope.type in ("longrope", "su"):
                raise ConfigError(f"{source}: rope_parameters.{kind}: LongRoPE per layer type "
                                  "is not supported")
            ropes[kind] = rope
        return ropes

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> RopeConfig:
        params = dict(d.get("rope_parameters") or {})
        params.update(d.get("rope_scaling") or {})
        theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        partial = params.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        if d.get("original_max_position_embeddings"):  # Phi-3 keeps it at the top level
            params.setdefault("original_max_position_embeddings",
                              d["original_max_position_embeddings"])
        return cls(theta=float(theta), type=str(rope_type),
                   partial_rotary_factor=float(partial), params=params)


@dataclass(frozen=True)
class DecoderConfig:
    """What a decoder builder needs from config.json. Unknown keys stay in ``extra``."""

    # layer types beyond attention's that an architecture's config class accepts in
    # layer_types (LFM2: "conv"): each such layer is built by the architecture's own mixer
    # (``DecoderBuilder.mixer``) with its own state (``DecoderBuilder.layer_states``)
    other_layer_types: ClassVar[tuple[str, ...]] = ()
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope: RopeConfig
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    sliding_window: int | None = None   # None: full attention
    # per-layer kinds ("full_attention" | "sliding_attention", or a hybrid's own:
    # ``other_layer_types``); None: every layer is attention and uses sliding_window (Mistral,
    # Phi-3)
    layer_types: tuple[str, ...] | None = None
    # rotary parameters per layer type (transformers 5's rope_parameters keyed by layer type);
    # {}: ``rope`` for every layer
    layer_ropes: dict[str, RopeConfig] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def number(self, key: str, default: float | None = None) -> float | None:
        """A numeric field of config.json that only some architectures have (Gemma's
        ``query_pre_attn_scalar``): its value, or ``default`` when absent or null; anything but
        a finite positive number is refused, naming the field."""
        value = self.extra.get(key)
        if value is None:
            return default
        if not _number(value) or value <= 0:
            raise ConfigError(f"config.json: {key} must be a positive number, got "
                              f"{_short(value)}")
        return float(value)

    def integer(self, key: str, default: int | None = None, minimum: int = 1) -> int | None:
        """An integer field of config.json that only some architectures have (LFM2's
        ``conv_L_cache``): its value, or ``default`` when absent or null; anything but an
        integer of at least ``minimum`` is refused, naming the field."""
        value = self.extra.get(key)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
            raise ConfigError(f"config.json: {key} must be {what}, got {_short(value)}")
        return value

    def flag(self, key: str, default: bool = False) -> bool:
        """A true/false field of config.json that only some architectures have: its value, or
        ``default`` when absent or null; anything but true or false is refused."""
        value = self.extra.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"config.json: {key} must be true or false, got {_short(value)}")
        return value

    def rope_of(self, layer: int) -> RopeConfig:
        """The rotary parameters of ``layer``: its layer type's, or the one set."""
        if self.layer_ropes:
            return self.layer_ropes[self.layer_types[layer]]
        return self.rope

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` as Hugging Face applies it: with ``layer_types``, only
        on "sliding_attention" layers; without, on every layer."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @staticmethod
    def read(path: Path) -> dict[str, Any]:
        """config.json as a dict; a missing file, bad JSON or no object is one error."""
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return d

    @staticmethod
    def architecture_in(path: Path) -> str:
        """The architecture config.json names (its first of ``architectures``)."""
        archs = DecoderConfig.read(path).get("architectures")
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise ConfigError(f"{path}: 'architectures' must be a non-empty list of names")
        return archs[0]

    @classmethod
    def from_file(cls, path: Path, defaults: dict[str, Any] | None = None,
                  aliases: dict[str, str] | None = None) -> DecoderConfig:
        """``defaults``: the values an architecture's transformers config class gives the keys
        that config.json leaves out (Gemma: tie_word_embeddings true); a key given, even as
        null, is the file's. ``aliases``: the family's names of keys builder reads under
        another (GPT-NeoX's ``rotary_pct`` is ``partial_rotary_factor``)."""
        d = cls.read(path)
        for alias, key in (aliases or {}).items():
            if d.get(alias) is None:
                continue
            if d.get(key) is not None and d[key] != d[alias]:
                raise ConfigError(f"{path}: {alias}={_short(d[alias])} and {key}="
                                  f"{_short(d[key])} name the same setting and disagree")
            d = {**{k: v for k, v in d.items() if k != alias}, key: d[alias]}
        return cls.from_hf({**(defaults or {}), **d}, source=str(path))

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> DecoderConfig:
        archs = d.get("architectures")
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise ConfigError(f"{source}: 'architectures' must be a non-empty list of names")
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            null = [k for k in missing if k in d]
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}"
                              + (f" ({', '.join(null)}: null)" if null else ""))
        check_types(d, source)
        model_type = d.get("model_type")
        if not isinstance(model_type, str) or not model_type:
            raise ConfigError(f"{source}: 'model_type' must name the model family (as "
                              "transformers writes it, e.g. \"llama\"); onnxruntime-genai "
                              "needs it to run the model")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")
        head_dim = d.get("head_dim")
        if head_dim is None:
            if d["hidden_size"] % heads:
                raise ConfigError(f"{source}: hidden_size is not a multiple of "
                                  "num_attention_heads and head_dim is not given")
            head_dim = d["hidden_size"] // heads
            logger.debug("head_dim not in config: using hidden_size / num_attention_heads = %d",
                         head_dim)
        max_pos = d.get("max_position_embeddings")
        if max_pos is None:
            max_pos = 4096
            logger.info("max_position_embeddings not in config: falling back to %d", max_pos)
        if max_pos > MAX_POSITIONS:
            raise ConfigError(f"{source}: max_position_embeddings={max_pos} is above "
                              f"{MAX_POSITIONS}, longer than any released model's context; the "
                              "rotary tables alone would need "
                              f"{max_pos * head_dim * 4 / 2**30:.0f} GiB")
        window = d.get("sliding_window")
        if d.get("use_sliding_window") is False or not window or window >= max_pos:
            window = None  # the window never binds: plain causal attention
        layer_types = d.get("layer_types")
        if layer_types is not None:
            kinds = LAYER_TYPES + cls.other_layer_types
            if (not isinstance(layer_types, list) or len(layer_types) < d["num_hidden_layers"]
                    or any(t not in kinds for t in layer_types)):
                raise ConfigError(f"{source}: layer_types must list one of {', '.join(kinds)} "
                                  f"for each of the {d['num_hidden_layers']} layers, got "
                                  f"{_short(layer_types)}")
            layer_types = tuple(layer_types)
        layer_ropes = RopeConfig.by_layer_type(d, source)
        if layer_ropes and layer_types is None:
            raise ConfigError(f"{source}: rope_parameters is given per layer type, but "
                              "layer_types is not given")
        rope = (layer_ropes.get("full_attention") or next(iter(layer_ropes.values()))
                if layer_ropes else RopeConfig.from_hf(d))
        for r in (rope, *layer_ropes.values()):
            rotary = head_dim * r.partial_rotary_factor
            if abs(rotary - round(rotary)) > 1e-6 or round(rotary) % 2:
                raise ConfigError(f"{source}: partial_rotary_factor={r.partial_rotary_factor:g} "
                                  f"of head_dim={head_dim} is {rotary:g} rotary dimensions; "
                                  "rotary embeddings turn pairs of dimensions, so it must be an "
                                  "even whole number")
        known = {f for f in cls.__dataclass_fields__} | {
            "architectures", "rope_theta", "rope_scaling", "rope_parameters",
            "partial_rotary_factor", "use_sliding_window", "hidden_activation",
            "original_max_position_embeddings"}
        return cls(
            architecture=archs[0],
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=_norm_eps(d, source),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            rope=rope,
            layer_ropes=layer_ropes,
            hidden_act=_activation(d, source),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            sliding_window=window,
            layer_types=layer_types,
            extra={k: v for k, v in d.items() if k not in known},
        )


# No released model has a longer context (the longest, 10M tokens, is below 2**24); a larger
# value is a damaged config.json, and the rotary tables are sized by it.
MAX_POSITIONS = 1 << 24

_SIZES = (*_REQUIRED, "num_key_value_heads", "head_dim", "max_position_embeddings",
          "sliding_window")
_POSITIVE = ("rms_norm_eps", "rope_theta")
# what other families call their norm's epsilon: read by none of ours, so a config that gives
# one of them and no rms_norm_eps would silently get 1e-6, a different model
_OTHER_EPS = ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", "norm_eps",
              "rms_norm_epsilon")


def _norm_eps(d: dict[str, Any], source: str) -> float:
    if d.get("rms_norm_eps") is None:
        other = next((k for k in _OTHER_EPS if d.get(k) is not None), None)
        if other is not None:
            raise ConfigError(f"{source}: the norms' epsilon is given as {other}="
                              f"{_short(d[other])}, and builder reads rms_norm_eps (default "
                              "1e-6, a different model): an architecture that uses this key "
                              "maps it in its config_aliases (see plugins/ in the repository)")
    return float(d.get("rms_norm_eps", 1e-6))
# config.json keys that never change a decoder's math: training, generation and bookkeeping
# fields transformers writes (an architecture reads the others it understands: config_keys)
HARMLESS_KEYS = frozenset((
    "_name_or_path", "_attn_implementation", "_attn_implementation_autoset", "_commit_hash",
    "_from_model_config", "initializer_factor", "use_flash_attention_2", "use_flash_attn",
    "transformers_version", "dtype", "torch_dtype", "use_cache",
    "initializer_range", "attention_dropout", "hidden_dropout", "embd_pdrop", "resid_pdrop",
    "embedding_dropout", "residual_dropout", "classifier_dropout", "chunk_size_feed_forward",
    "id2label", "label2id", "is_decoder", "is_encoder_decoder", "output_attentions",
    "output_hidden_states", "return_dict", "use_return_dict", "problem_type",
    "output_router_logits", "router_aux_loss_coef", "pretraining_tp", "attn_pdrop",
    "tokenizer_class", "auto_map", "attn_implementation", "cache_implementation", "torchscript",
    "use_bfloat16", "tie_encoder_decoder", "task_specific_params", "finetuning_task", "prefix",
    "pruned_heads", "add_cross_attention", "cross_attention_hidden_size", "tf_legacy_loss",
    "sep_token_id", "unk_token_id", "decoder_start_token_id", "forced_bos_token_id",
    "forced_eos_token_id", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens"))


def check_keys(config: DecoderConfig, reads: frozenset[str], who: str,
               source: str = "config.json", ignored: tuple[str, ...] = ()) -> None:
    """Every key of config.json is read (DecoderConfig's fields, the architecture's
    ``config_keys``) or known to change nothing (HARMLESS_KEYS, or ``ignored``: the user's
    config_keys_ignored, each of which must be in the file): a key the architecture does not
    read may change the math in transformers, so it is an error naming it, never a setting
    silently dropped. A key given as null is not set."""
    absent = [k for k in ignored if k not in config.extra]
    if absent:
        raise ConfigError(f"config_keys_ignored names {', '.join(absent)}, which {source} does "
                          "not have as a key builder leaves unread")
    unread = sorted(k for k, v in config.extra.items() if k not in reads
                    and k not in HARMLESS_KEYS and k not in ignored and v is not None)
    if unread:
        raise ConfigError(
            f"{source}: {', '.join(f'{k}={_short(config.extra[k])}' for k in unread)}: "
            f"{'a key' if len(unread) == 1 else 'keys'} {who} does not read, which may change "
            "the model's math in transformers. An architecture that reads a key declares it "
            "in config_keys (a family's other name for a key builder reads: config_aliases); a "
            "key you know changes nothing for this model: --extra_options "
            f"config_keys_ignored={','.join(unread)}")


_FRACTION = ("partial_rotary_factor",)
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")
_STRINGS = ("hidden_act", "hidden_activation")


def _activation(d: dict[str, Any], source: str) -> str:
    """The MLP's activation: ``hidden_activation`` where a config has it (Gemma's), else
    ``hidden_act``; both given and different is refused, never one of them dropped."""
    act, activation = d.get("hidden_act"), d.get("hidden_activation")
    if act is not None and activation is not None and act != activation:
        raise ConfigError(f"{source}: hidden_act={act!r} and hidden_activation={activation!r} "
                          "disagree")
    return activation or act or "silu"
_OBJECTS = ("rope_scaling", "rope_parameters")
_TOKEN_IDS = ("bos_token_id", "pad_token_id")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def check_types(d: dict[str, Any], source: str) -> None:
    """Each field the math depends on has the JSON type transformers gives it (a bool is not a
    number), refused otherwise with the field and its value; null means "not set"."""
    def bad(key: str, expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key} must be {expected}, got {_short(d[key])}")

    def given(key: str) -> bool:
        return d.get(key) is not None

    for key in _SIZES:
        if given(key) and (not isinstance(d[key], int) or isinstance(d[key], bool)
                           or d[key] <= 0):
            raise bad(key, "a positive integer")
    for key in _POSITIVE:
        if given(key) and (not _number(d[key]) or d[key] <= 0):
            raise bad(key, "a positive number")
    for key in _FRACTION:
        if given(key) and (not _number(d[key]) or not 0 < d[key] <= 1):
            raise bad(key, "a number in (0, 1]")
    for key in _BOOLS:
        if given(key) and not isinstance(d[key], bool):
            raise bad(key, "true or false")
    for key in _STRINGS:
        if given(key) and not isinstance(d[key], str):
            raise bad(key, "a string")
    for key in _TOKEN_IDS:
        if given(key) and (not isinstance(d[key], int) or isinstance(d[key], bool)
                           or d[key] < 0):
            raise bad(key, "a token id (a non-negative integer)")
    eos = d.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    if given("eos_token_id") and (not ids or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
        raise bad("eos_token_id", "a token id or a list of token ids")
    for key in _OBJECTS:
        if not given(key):
            continue
        if not isinstance(d[key], dict):
            raise bad(key, "an object (or null)")
        nested = [(f"{key}.{kind}", sub) for kind, sub in d[key].items()
                  if kind in LAYER_TYPES and isinstance(sub, dict)]
        for name, params in nested or [(key, d[key])]:
            _check_rope_params(name, params, source)


def _check_rope_params(key: str, params: dict[str, Any], source: str) -> None:
    """Each rotary parameter has the type transformers gives it."""
    for name, value in params.items():
        if name in ("rope_type", "type"):
            ok = isinstance(value, str)
        elif name in _POSITIVE:
            ok = _number(value) and value > 0
        elif isinstance(value, list):
            ok = all(_number(x) for x in value)
        else:
            ok = value is None or isinstance(value, bool) or _number(value)
        if not ok:
            raise ConfigError(f"{source}: {key}.{name} has the wrong type: {_short(value)}")
