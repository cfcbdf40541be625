"""LoRA adapters from PEFT folders: read, checked against the checkpoint, merged or kept apart.

A PEFT folder holds adapter_config.json and adapter_model.safetensors, whose tensors
``base_model.model.<module>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r] adapt the
checkpoint's linear ``<module>.weight`` [out, in] to W + s B A, with s = lora_alpha / r
(lora_alpha / sqrt(r) under ``use_rslora``; ``rank_pattern`` and ``alpha_pattern`` give some
modules their own r and alpha, matched as PEFT matches them: the key, or the key as the end of
the module's name after a dot).

Merged (``lora_merge=true``), the checkpoint reader serves W + s B A in place of W, before any
quantization, on every target. Kept apart (cpu, cuda), each adapted projection gains
x A^T (s B)^T beside its own MatMul, A^T and (s B)^T being graph inputs, and each adapter is
written as an onnxruntime adapter file (``adapters/<name>.onnx_adapter``) that
onnxruntime-genai's Adapters API activates at run time.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

from builder.errors import ConfigError, WeightError
from builder.roles import PACKED_IN
from builder.source import adapter_folder
from builder.roles import TensorRole as R

logger = logging.getLogger(__name__)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# adapter_config.json settings that change the math and that builder does not express: refused
# when set to anything but their neutral value
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
               "modules_to_save": None, "target_parameters": None, "layer_replication": None,
               "trainable_token_indices": None, "use_qalora": False, "use_bdlora": None,
               "megatron_config": None}


@dataclass(frozen=True)
class LoraModule:
    a: str        # the adapter's tensor names
    b: str
    rank: int
    scale: float  # s: lora_alpha / r (or / sqrt(r))


class Adapter:
    """One PEFT LoRA adapter: its modules (the checkpoint linears it adapts), read lazily."""

    def __init__(self, folder: Path, name: str | None = None) -> None:
        self.folder = Path(folder)
        self.name = name or self.folder.name
        self.config = self._config()
        self.modules = self._modules()
        self.used: set[str] = set()
        logger.info("adapter %s: LoRA on %d linear(s), r %s, %s", self.name, len(self.modules),
                    "/".join(str(r) for r in sorted({m.rank for m in self.modules.values()})),
                    "rank-stabilized scaling" if self.config.get("use_rslora") else
                    "scaling lora_alpha / r")

    def _config(self) -> dict:
        path = self.folder / CONFIG
        if not path.is_file():
            raise ConfigError(f"adapter_path {self.folder}: no {CONFIG} (a PEFT LoRA folder "
                              f"holds {CONFIG} and {WEIGHTS})")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not JSON ({e})") from None
        if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
            raise ConfigError(f"{path}: peft_type {config.get('peft_type')!r}: builder reads "
                              "LoRA adapters")
        for key, neutral in UNSUPPORTED.items():
            value = config.get(key, neutral)
            if value != neutral and value not in (None, [], {}, False):
                raise ConfigError(f"{path}: {key}={value!r}: builder reads plain LoRA adapters "
                                  f"({key} changes the math in a way it does not express)")
        return config

    def _modules(self) -> dict[str, LoraModule]:
        path = self.folder / WEIGHTS
        if not path.is_file():
            raise WeightError(f"adapter_path {self.folder}: no {WEIGHTS}")
        with safe_open(str(path), framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        modules: dict[str, LoraModule] = {}
        for name in sorted(shapes):
            match = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])\.weight", name)
            if match is None and name.endswith(".base_layer.weight"):
                raise WeightError(f"{path}: tensor {name!r} replaces a base model's weight "
                                  "(PEFT's save_embedding_layers, for resized embeddings or "
                                  "lm_head): builder adapts the checkpoint's own weights; save "
                                  "the adapter with save_embedding_layers=False")
            if match is None:
                raise WeightError(f"{path}: tensor {name!r} is not a LoRA A or B weight "
                                  f"({PREFIX}<module>.lora_A.weight / lora_B.weight): builder "
                                  "reads plain LoRA adapters")
            module, which = match.groups()
            if which == "B":
                continue
            b = f"{PREFIX}{module}.lora_B.weight"
            if b not in shapes:
                raise WeightError(f"{path}: {name!r} has no {b!r}")
            rank = shapes[name][0]
            if len(shapes[name]) != 2 or shapes[b] != (shapes[b][0], rank):
                raise WeightError(f"{path}: {name!r} {list(shapes[name])} and {b!r} "
                                  f"{list(shapes[b])} are not [r, in] and [out, r]")
            modules[module] = LoraModule(name, b, rank, self._scale(module, rank))
        missing = [n for n in shapes if n.endswith(".lora_B.weight")
                   and n.replace(".lora_B.", ".lora_A.") not in shapes]
        if missing:
            raise WeightError(f"{path}: {missing[0]!r} has no lora_A")
        if not modules:
            raise WeightError(f"{path}: no LoRA weights")
        return modules

    def _scale(self, module: str, rank: int) -> float:
        c = self.config
        r = _pattern(c.get("rank_pattern") or {}, module, c.get("r", 8))
        alpha = _pattern(c.get("alpha_pattern") or {}, module, c.get("lora_alpha", 8))
        if r != rank:
            raise WeightError(f"{self.folder / WEIGHTS}: {module}'s LoRA has rank {rank}; "
                              f"{CONFIG} says r={r}")
        return alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r

    def pair(self, module: str, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(A [r, in], s B [out, r]) of ``module``, in ``dtype``; marks it used."""
        m = self.modules[module]
        with safe_open(str(self.folder / WEIGHTS), framework="numpy") as f:
            a, b = f.get_tensor(m.a), f.get_tensor(m.b)
        if not all(np.isfinite(t.astype(np.float32)).all() for t in (a, b)):
            raise WeightError(f"{self.folder / WEIGHTS}: {module}'s LoRA weights hold NaN or "
                              "infinite values")
        self.used.add(module)
        return a.astype(dtype), (b.astype(np.float32) * m.scale).astype(dtype)

    def delta(self, module: str) -> np.ndarray:
        """s B A [out, in], float32."""
        a, b = self.pair(module)
        return b @ a

    def check(self, has_weight) -> None:
        """Every module the adapter adapts is a linear of the checkpoint."""
        for module in self.modules:
            if not has_weight(f"{module}.weight"):
                raise WeightError(f"adapter {self.name}: {module} is adapted, but the "
                                  f"checkpoint has no {module}.weight")

    def check_all_used(self) -> None:
        unused = sorted(set(self.modules) - self.used)
        if unused:
            raise WeightError(f"adapter {self.name}: {len(unused)} adapted module(s) no role of "
                              f"the architecture reads: {', '.join(unused[:5])}")


def _pattern(patterns: dict, module: str, default):
    """PEFT's per-module override: a key that is the module's name or its end after a dot."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def load_adapters(paths: tuple[str, ...], cache_dir: Path | None = None,
                  token: str | None = None) -> list[Adapter]:
    """adapter_path's adapters: local folders or hub repositories (``source.adapter_folder``),
    each named by its folder (or repository)."""
    adapters = [Adapter(*adapter_folder(p, cache_dir, token)) for p in paths]
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise ConfigError(f"adapter_path: two adapters named {names}: each folder's name "
                          "names its adapter")
    return adapters


class LoraBranches:
    """The adapters kept apart, as a graph builds them: for each projection whose weight is (or
    is part of) an adapted module, the LoRA branch x A^T (s B)^T added to its output.

    Every adapted module gets two graph inputs, ``<module>.lora_A`` [in, r] and
    ``<module>.lora_B`` [r, out] (s B, transposed), each with a default of rank 0 (no adapter
    active: the branch adds zeros); an adapter file holds the modules it adapts. ``rows``
    says which module a projection's weight is, and which of its rows (``builder``: the
    architecture's DecoderBuilder, whose name table and rotary order tell)."""

    def __init__(self, adapters: tuple[Adapter, ...], builder) -> None:
        self.adapters = adapters
        self.modules = {m for a in adapters for m in a.modules}
        self.builder = builder
        self.float_dtype = builder.gb.float_dtype
        self.declared: dict[str, tuple[int, int]] = {}  # module -> (in, out)
        self._roles: dict[str, tuple] | None = None  # checkpoint name -> (role, layer)

    def rows(self, weight_name: str, n: int) -> tuple[str, np.ndarray | None]:
        """The checkpoint module a projection's weight is (``weight_name`` as linear() gets
        it) and, where the projection reorders or takes some of them, the module's rows in the
        projection's output order (interleaved rotary's q and k; a part of a tensor the
        checkpoint stores packed): where the adapter's B rows go."""
        b = self.builder
        if self._roles is None:
            self._roles = {template.format(i=layer): (role, layer)
                           for role, template in b.weight_names.items()
                           if "{i}" in template and "{e}" not in template
                           for layer in range(b.config.num_hidden_layers)}
        base, _, part = weight_name.partition(".weight.")
        found = self._roles.get(f"{base}.weight" if part else weight_name)
        if found is None:
            return weight_name.removesuffix(".weight"), None
        role, layer = found
        packed = None
        if part:  # q of a stored qkv (initializer_name's "<packed>.weight.q")
            packed, role = role, R(part)
        elif weight_name not in b.weights and PACKED_IN.get(role) in b.weight_names:
            packed = PACKED_IN[role]  # a part the table names but the checkpoint stores packed
        if packed is None:
            module, start = weight_name.removesuffix(".weight"), 0
        else:
            module = b.weight_name(packed, layer).removesuffix(".weight")
            parts = [r for r, p in PACKED_IN.items() if p == packed]
            start = sum(b.expected_shape(r)[0] for r in parts[:parts.index(role)])
        rows = start + b.rotary_order(role, layer, np.arange(n))
        same = packed is None and np.array_equal(rows, np.arange(n))
        return module, None if same else rows

    def __call__(self, gb, x: str, y: str, weight_name: str, k: int, n: int) -> str:
        module, rows = self.rows(weight_name, n)
        if module not in self.modules:
            return y
        a, b = self.inputs(gb, module, k, rows)
        out = self.declared[module][1]
        if out != n if rows is None else rows.max(initial=0) >= out:
            raise WeightError(f"adapters: {module}'s lora_B gives {out} features; the "
                              f"projection {weight_name} has {n}")
        with gb.scope("lora"):
            if rows is not None:
                b = gb.node("Gather", [b, gb.constant(rows)], "Gather_rows", axis=1)
            delta = gb.node("MatMul", [gb.node("MatMul", [x, a], "MatMul_A"), b], "MatMul_B")
            return gb.node("Add", [y, delta], "Add")

    def inputs(self, gb, module: str, k: int, rows) -> tuple[str, str]:
        """The module's A and B graph inputs (declared once per graph, with rank-0 defaults)."""
        out = self._out(module, k)
        names = (f"{module}.lora_A", f"{module}.lora_B")
        if module not in self.declared:
            elem = gb.float_type
            rank = f"{module}.lora_r"
            gb.input(names[0], elem, [k, rank])
            gb.input(names[1], elem, [rank, out])
            gb.initializer(names[0], np.zeros((k, 0), self.float_dtype))
            gb.initializer(names[1], np.zeros((0, out), self.float_dtype))
            self.declared[module] = (k, out)
        return names

    def _out(self, module: str, k: int) -> int:
        """The module's output features, every adapter's A and B checked against the
        projection's input features ``k`` and each other."""
        outs = set()
        for adapter in self.adapters:
            if module in adapter.modules:
                m = adapter.modules[module]
                with safe_open(str(adapter.folder / WEIGHTS), framework="numpy") as f:
                    a, b = (f.get_slice(t).get_shape() for t in (m.a, m.b))
                if a[1] != k:
                    raise WeightError(f"adapter {adapter.name}: {module}'s lora_A reads "
                                      f"{a[1]} features; the projection's input has {k}")
                outs.add(b[0])
        if len(outs) != 1:
            raise WeightError(f"adapters: {module}'s lora_B gives {sorted(outs)} features")
        return outs.pop()

    def check_all_used(self) -> None:
        unused = sorted(self.modules - set(self.declared))
        if unused:
            raise WeightError(f"adapters {', '.join(a.name for a in self.adapters)}: "
                              f"{len(unused)} adapted module(s) no projection of the graph "
                              f"reads: {', '.join(unused[:5])}")

    def write(self, folder: Path) -> list[Path]:
        """adapters/<name>.onnx_adapter for each adapter: its modules' A^T and (s B)^T, in the
        graph's float type (onnxruntime's adapter format, which onnxruntime-genai loads)."""
        import onnxruntime as ort

        out = folder / "adapters"
        out.mkdir(exist_ok=True)
        files = []
        for adapter in self.adapters:
            params = {}
            for module in sorted(adapter.modules):
                a, b = adapter.pair(module, self.float_dtype)
                params[f"{module}.lora_A"] = ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(a.T))
                params[f"{module}.lora_B"] = ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(b.T))
            fmt = ort.AdapterFormat()
            fmt.set_adapter_version(1)
            fmt.set_model_version(1)
            fmt.set_parameters(params)
            path = out / f"{adapter.name}.onnx_adapter"
            fmt.export_adapter(str(path))
            files.append(path)
            logger.info("adapter %s: %s (%d parameters)", adapter.name,
                        path.relative_to(folder), len(params))
        return files
