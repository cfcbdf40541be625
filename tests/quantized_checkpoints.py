"""Pre-quantized checkpoints made in the test from each format's documented layout (GPTQ, AWQ),
or packed by the format's own library (compressed-tensors), from a float tiny checkpoint; and the
same model with the dequantized weights stored in float32, transformers' reference.

The codes come from a plain round-to-nearest grid per (row, group); which grid does not matter,
only that the checkpoint's codes, scales and zero points reach the built model unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's gemm packing: position i holds 8c + order[i]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "qkv_proj", "gate_up_proj",
           "in_proj", "out_proj", "w1", "w2", "w3",  # LFM2's convolution and MLP; Mamba2's
           "in_proj_qkv", "in_proj_z",  # Qwen3.5's Gated DeltaNet (a and b: 4 rows, left float)
           "input_linear", "output_linear")  # Granite 4.0-H's MLP


def grid(w: np.ndarray, bits: int, groups: np.ndarray, num_groups: int, symmetric: bool,
         scale_dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Round [N, K] to nearest on a grid per (row, group of columns): codes [N, K] (unsigned),
    scales [N, G] (in ``scale_dtype``), zero points [N, G], and the dequantized weight [N, K]
    in float32 ((code - zero) * scale, exact)."""
    n, k = w.shape
    top = (1 << bits) - 1
    scales = np.zeros((n, num_groups), np.float32)
    zeros = np.zeros((n, num_groups), np.int64)
    for g in range(num_groups):
        cols = w[:, groups == g]
        if symmetric:
            s = np.abs(cols).max(1) / ((top + 1) // 2 - 1)
            z = np.full(n, (top + 1) // 2)
        else:
            lo, hi = np.minimum(cols.min(1), 0), np.maximum(cols.max(1), 0)
            s = (hi - lo) / top
            z = np.clip(np.round(-lo / np.where(s > 0, s, 1)), 0, top).astype(np.int64)
        scales[:, g] = np.where(s > 0, s, 1e-3)
        zeros[:, g] = z
    scales = scales.astype(scale_dtype).astype(np.float32)
    s_k, z_k = scales[:, groups], zeros[:, groups]
    codes = np.clip(np.round(w / s_k) + z_k, 0, top).astype(np.int64)
    return codes, scales.astype(scale_dtype), zeros, (codes - z_k) * s_k


def pack_k(codes_kn: np.ndarray, bits: int) -> np.ndarray:
    """[K, N] codes → int32 [K * bits / 32, N], packed along K, the lowest bits first."""
    per = 32 // bits
    k, n = codes_kn.shape
    words = codes_kn.astype(np.uint32).reshape(k // per, per, n)
    out = np.zeros((k // per, n), np.uint32)
    for j in range(per):
        out |= words[:, j] << np.uint32(bits * j)
    return out.view(np.int32)


def pack_awq(codes_kn: np.ndarray) -> np.ndarray:
    """[rows, N] 4-bit codes → int32 [rows, N / 8] in AutoAWQ's gemm order."""
    rows, n = codes_kn.shape
    cols = codes_kn.astype(np.uint32).reshape(rows, n // 8, 8)
    out = np.zeros((rows, n // 8), np.uint32)
    for i, c in enumerate(AWQ_ORDER):
        out |= cols[:, :, c] << np.uint32(4 * i)
    return out.view(np.int32)


def quantize_checkpoint(src: Path, dst: Path, method: str, *, bits: int = 4, group: int = 32,
                        symmetric: bool = True, desc_act: bool = False, version: str = "gptq",
                        seed: int = 0, shared_order: bool = True,
                        lm_head: bool = False) -> tuple[Path, Path]:
    """``src`` (a float checkpoint) with every layer linear quantized in ``method``'s layout
    (gptq, awq, compressed-tensors), into ``dst``; and ``dst``.ref: the dequantized weights in
    float32, for transformers. ``group`` 0: one group per row. ``desc_act``: GPTQ's groups
    in a random column order (g_idx), the same for the linears that read one input (as GPTQ's
    one Hessian gives them) unless not ``shared_order``; ``lm_head`` quantized too (GPTQModel's
    lm_head=true). Returns (dst, reference)."""
    ref = dst.with_name(dst.name + ".ref")
    for folder in (dst, ref):
        shutil.copytree(src, folder)
        for f in folder.glob("model*.safetensors*"):
            f.unlink()
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    rng = np.random.default_rng(seed)
    out, dequantized, orders = {}, {}, {}
    scale_dtype = np.float16 if method != "compressed-tensors" else ml_dtypes.bfloat16
    for name, value in tensors.items():
        base = name.removesuffix(".weight")
        if not (name.endswith(".weight") and (base.split(".")[-1] in LINEARS
                                              and ".layers." in name
                                              or lm_head and base == "lm_head")):
            out[name] = value
            dequantized[name] = value.astype(np.float32)
            continue
        w = value.astype(np.float32)
        n, k = w.shape
        if n % 8 or k % 32:  # (packs 8 codes of a column in a word: quantizers leave these)
            out[name] = value
            dequantized[name] = w
            continue
        size = group or k
        num_groups = -(-k // size)
        reads = base.rsplit(".", 1)[0] + {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "in",
                                         "up": "in"}.get(base.split(".")[-1][:-5], base)
        if reads not in orders:  # linears that read one input share its order (one Hessian)
            orders[reads] = rng.permutation(k) if desc_act else np.arange(k)
        order = orders[reads] if shared_order else (
            rng.permutation(k) if desc_act else np.arange(k))
        groups = np.empty(k, np.int64)
        groups[order] = np.arange(k) // size  # column order[j] is the j-th of the groups
        codes, scales, zeros, deq = grid(w, bits, groups, num_groups, symmetric, scale_dtype)
        dequantized[name] = deq
        if method == "gptq":
            stored_zeros = (zeros - (1 if version == "gptq" else 0)) & ((1 << bits) - 1)
            out[f"{base}.qweight"] = pack_k(codes.T, bits)
            out[f"{base}.qzeros"] = pack_k(stored_zeros, bits).T.copy()  # along N
            out[f"{base}.scales"] = scales.T.copy()
            out[f"{base}.g_idx"] = groups.astype(np.int32)
        elif method == "awq":
            out[f"{base}.qweight"] = pack_awq(codes.T)
            out[f"{base}.qzeros"] = pack_awq(zeros.T)
            out[f"{base}.scales"] = scales.T.copy()
        else:
            import torch
            from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

            offset = 1 << (bits - 1)
            signed = torch.from_numpy((codes - offset).astype(np.int8))
            out[f"{base}.weight_packed"] = pack_to_int32(signed, bits).numpy()
            out[f"{base}.weight_scale"] = scales
            out[f"{base}.weight_shape"] = np.array([n, k], np.int64)
            if not symmetric:
                zp = torch.from_numpy((zeros - offset).astype(np.int8))
                out[f"{base}.weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0).numpy()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    save_file(dequantized, ref / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    if method == "gptq":
        config["quantization_config"] = {
            "quant_method": "gptq", "bits": bits, "group_size": group or -1,
            "desc_act": desc_act, "sym": symmetric, "checkpoint_format": version,
            "damp_percent": 0.01, "true_sequential": True, "static_groups": False}
    elif method == "awq":
        config["quantization_config"] = {"quant_method": "awq", "bits": bits,
                                         "group_size": group, "zero_point": True,
                                         "version": "gemm"}
    else:
        strategy = {"strategy": "group", "group_size": group} if group else \
            {"strategy": "channel"}
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {"group_0": {
                "targets": ["Linear"], "input_activations": None, "output_activations": None,
                "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric,
                            "dynamic": False, "actorder": None, **strategy}}}}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    ref_config = json.loads((ref / "config.json").read_text())
    ref_config["torch_dtype"] = ref_config["dtype"] = "float32"
    (ref / "config.json").write_text(json.dumps(ref_config, indent=2))
    return dst, ref
