"""Mixtures of experts (Qwen3-MoE, Mixtral): quantized experts against transformers running our
own dequantized weights, every expert read and quantized, and the checkpoint errors an expert
can cause. (fp32 and fp16 parity, the left-padded batch and generation through
onnxruntime-genai are in test_parity and test_variants, with the other architectures.)"""

from __future__ import annotations

import json
import shutil

import ml_dtypes  # noqa: F401  (bfloat16 for safetensors.numpy)
import numpy as np
import onnx
import pytest
import torch
from safetensors.numpy import load_file, save_file

from builder.quant.base import QuantizedWeight
from builder.testing import max_abs_diff, run_decoder
from checkpoints import hf_model
from conftest import run_cli

MOE = ["qwen3_moe", "qwen3_moe_step2", "mixtral", "olmoe", "granitemoe"]


def _build(ck, out, precision="int4", *extra, ep="cpu"):
    r = run_cli("-m", str(ck), "-o", str(out), "-p", precision, "-e", ep,
                *(["--extra_options", *extra] if extra else []))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _initializers(folder):
    m = onnx.load(str(folder / "model.onnx"))
    return m, {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}


def _dequantized_checkpoint(ck, folder, dst):
    """The checkpoint with every weight the build quantized replaced, in fp32, by the build's
    own dequantized codes: the experts' from the stacked QMoE tensors (gate and up rows
    de-interleaved), the dense projections' from MatMulNBits."""
    m, inits = _initializers(folder)
    tensors = {k: v.astype(np.float32) for k, v in
               load_file(str(ck / "model.safetensors")).items()}  # bf16 → fp32
    replaced, parts = 0, {}
    for node in m.graph.node:
        if node.op_type == "QMoE":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            bits, block = attrs["expert_weight_bits"], attrs["block_size"]
            prefix = node.input[2].rsplit(".experts.", 1)[0] + ".experts"
            zps = [node.input[i] if len(node.input) > i else "" for i in (11, 12)]
            for codes_name, scales_name, zp, fused in (
                    (node.input[2], node.input[3], zps[0], True),
                    (node.input[5], node.input[6], zps[1], False)):
                codes, scales = inits[codes_name], inits[scales_name]
                for e in range(codes.shape[0]):
                    n, kb = codes[e].shape
                    q = QuantizedWeight(codes[e].reshape(n, -1, block * bits // 8), scales[e],
                                        inits[zp][e] if zp else None, bits, block,
                                        kb * 8 // bits)
                    w = q.dequantize()
                    if f"{prefix}.gate_up_proj" in tensors:  # GPT-OSS: stacked, [K, N]
                        tensors[f"{prefix}.{'gate_up_proj' if fused else 'down_proj'}"][e] = w.T
                        replaced += 1
                        continue
                    granite = prefix.removesuffix(".router.experts")
                    if f"{granite}.input_linear.weight" in tensors:  # stacked, gate then up
                        if fused:
                            tensors[f"{granite}.input_linear.weight"][e] = np.concatenate(
                                [w[0::2], w[1::2]])
                        else:
                            tensors[f"{granite}.output_linear.weight"][e] = w
                        replaced += 1
                        continue
                    names = _expert_names(prefix, e, tensors)
                    if fused:  # (copies: safetensors writes a strided view's buffer as is)
                        tensors[names[0]] = np.ascontiguousarray(w[0::2])
                        tensors[names[1]] = np.ascontiguousarray(w[1::2])
                    else:
                        tensors[names[2]] = w
                    replaced += 1
        elif node.op_type == "MatMulNBits":
            name = node.input[1].removesuffix("_Q4").removesuffix("_Q8")
            data = inits[node.input[1]]
            bits = 4 if node.input[1].endswith("_Q4") else 8
            zp = node.input[3] if len(node.input) > 3 and node.input[3] else None
            q = QuantizedWeight(data, inits[node.input[2]].reshape(data.shape[0], -1),
                                None if zp is None else inits[zp].reshape(data.shape[0], -1),
                                bits, data.shape[2] * 8 // bits,
                                tensors[name.removesuffix(".gate").removesuffix(".up")
                                        ].shape[1])
            parts[name] = np.ascontiguousarray(q.dequantize())  # (K cut from whole blocks)
    for name, w in parts.items():
        if name.endswith(".up"):  # a packed gate/up stored as one tensor: gate's rows first
            base = name.removesuffix(".up")
            tensors[base] = np.concatenate([parts[base + ".gate"], w])
        elif name.endswith(".gate") and name.removesuffix(".gate") + ".up" in parts:
            continue
        elif name.endswith(".gate"):  # Qwen3.5: q_proj's query and gate rows, side by side
            q = parts[name.removesuffix(".gate")]
            config = json.loads((ck / "config.json").read_text())
            n, d = config["num_attention_heads"], config["head_dim"]
            tensors[name.removesuffix(".gate")] = np.stack(
                [q.reshape(n, d, -1), w.reshape(n, d, -1)], 1).reshape(2 * n * d, -1)
        elif name + ".gate" not in parts:  # (Granite 4.0-H: in_proj's rows but dt's, float)
            tensors[name] = np.concatenate([w, tensors[name][w.shape[0]:]])
    dst.mkdir()
    for f in ck.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst, replaced


def _expert_names(prefix, e, tensors):
    """(gate, up, down) names of expert ``e``, Qwen3-MoE's or Mixtral's."""
    for names in ((f"{prefix}.{e}.gate_proj.weight", f"{prefix}.{e}.up_proj.weight",
                   f"{prefix}.{e}.down_proj.weight"),
                  (f"{prefix}.{e}.w1.weight", f"{prefix}.{e}.w3.weight",
                   f"{prefix}.{e}.w2.weight")):
        if names[0] in tensors:
            return names
    raise KeyError(f"{prefix}.{e}")


@pytest.mark.parametrize("arch, algo", [("qwen3_moe", "rtn"), ("qwen3_moe_step2", "rtn"),
                                        ("mixtral", "k_quant"), ("olmoe", "rtn"),
                                        ("gpt_oss", "rtn"), ("qwen3_5_moe", "rtn"),
                                        ("granitemoehybrid", "rtn"), ("granitemoe", "rtn")])
def test_int4_experts_match_transformers_on_our_dequantized_weights(arch, algo, checkpoints,
                                                                     tmp_path):
    """int4 QMoE with fp32 activations (accuracy_level=1) computes exactly what transformers
    computes with the build's own dequantized expert (and dense) weights."""
    ck = checkpoints[arch]
    out = _build(ck, tmp_path / "o", "int4", "int4_accuracy_level=1",
                 f"int4_algo_config={algo}", "unpack_matmul=true")
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx"),
                                        load_external_data=False).graph.node]
    assert "QMoE" in ops and "MoE" not in ops
    ref_ck, replaced = _dequantized_checkpoint(ck, out, tmp_path / "deq")
    config = json.loads((ck / "config.json").read_text())
    experts = config.get("num_experts") or config["num_local_experts"]
    assert replaced == 2 * experts * ops.count("QMoE")
    ids = np.random.default_rng(5).integers(3, 256, (1, 10))
    run = run_decoder(out, ids, steps=6)
    with torch.no_grad():
        ref = hf_model(ref_ck)(torch.from_numpy(run.tokens)).logits.numpy()[0]
    ours = np.concatenate([run.prefill_logits[0]] + run.step_logits)
    diff = max_abs_diff(ours, ref)
    print(f"{arch} int4 {algo}: max abs logit diff {diff:.2e} against our dequantized weights")
    assert diff <= 1e-4


def _copy(ck, dst):
    shutil.copytree(ck, dst)
    return dst


@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_expert_checkpoint_errors_name_the_tensor(case, checkpoints, tmp_path, capsys):
    """A missing expert, a stray extra expert and an expert of the wrong shape: each one
    error line naming the tensor, exit 2, nothing written."""
    from safetensors.torch import load_file as load_torch, save_file as save_torch
    from test_bad_input import refused

    ck = _copy(checkpoints["qwen3_moe"], tmp_path / "ck")
    tensors = load_torch(ck / "model.safetensors")
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    if case == "missing":
        del tensors[name]
        needles = (f"tensor {name!r} not found",)
    elif case == "extra":
        name = "model.layers.1.mlp.experts.8.up_proj.weight"  # experts 0..7
        tensors[name] = tensors["model.layers.1.mlp.experts.5.up_proj.weight"].clone()
        needles = ("not used by the build", name)
    else:
        tensors[name] = tensors[name][:, :32].clone()
        needles = (f"tensor {name!r} has shape [32, 32]", "[32, 64]")
    save_torch(tensors, str(ck / "model.safetensors"), metadata={"format": "pt"})
    refused(capsys, tmp_path, ["-m", ck, "-p", "int4"], *needles)


def test_every_expert_is_read_quantized_and_streamed(checkpoints, tmp_path, monkeypatch):
    """The quantizer sees every expert of every sparse layer; each stacked tensor is written
    while its experts are read (expert e's codes leave before expert e + 1 is read)."""
    from builder import BuildOptions, ExtraOptions, build
    from builder.graph import GraphBuilder
    from builder.options import Precision
    from builder.quant.rtn import RtnQuantizer
    from builder.weights import CheckpointReader

    reads, quantized, lag = [], [], []
    real_read, real_quantize = CheckpointReader.read, RtnQuantizer.quantize
    real_stack = GraphBuilder.stacked_initializer

    def read(self, name, shape=None):
        reads.append(name)
        return real_read(self, name, shape)

    def quantize(self, weight):
        quantized.append(weight.shape)
        return real_quantize(self, weight)

    def stack(self, name, shape, dtype, parts):
        def watched():
            layer = name.rsplit(".experts.", 1)[0] + ".experts."
            role = "gate_proj" if "gate_up" in name else "down_proj"
            for e, part in enumerate(parts):
                experts_read = {n for n in reads if n.startswith(layer) and role in n}
                lag.append(len(experts_read) - (e + 1))  # 0: only the expert being written
                yield part
        return real_stack(self, name, shape, dtype, watched())

    monkeypatch.setattr(CheckpointReader, "read", read)
    monkeypatch.setattr(RtnQuantizer, "quantize", quantize)
    monkeypatch.setattr(GraphBuilder, "stacked_initializer", stack)
    build(BuildOptions(model_name=str(checkpoints["qwen3_moe"]), output=tmp_path / "o",
                       precision=Precision.INT4, extra=ExtraOptions.parse(
                           ["unpack_matmul=true", "int4_algo_config=rtn"])))
    config = json.loads((checkpoints["qwen3_moe"] / "config.json").read_text())
    experts, sparse_layers = config["num_local_experts"], 3  # layer 2 is dense
    i, h = config["moe_intermediate_size"], config["hidden_size"]
    assert quantized.count((2 * i, h)) == experts * sparse_layers  # gate and up, interleaved
    assert quantized.count((h, i)) == experts * sparse_layers      # down
    expert_reads = [n for n in reads if ".experts." in n]
    assert len(expert_reads) == len(set(expert_reads)) == 3 * experts * sparse_layers
    assert len(lag) == 2 * sparse_layers * experts and set(lag) == {0}


def test_moe_refusals_and_exclusions(checkpoints, tmp_path):
    ck = checkpoints["qwen3_moe"]
    r = run_cli("-m", str(ck), "-o", str(tmp_path / "i8"), "-p", "int8")
    assert r.returncode == 2 and "8-bit experts are not supported" in r.stderr, r.stderr
    assert not (tmp_path / "i8").exists()
    # the router may be named (it stays float either way); excluding a layer's experts keeps
    # them in float (MoE), the other layers' quantized (QMoE)
    out = _build(ck, tmp_path / "o", "int4",
                 "int4_nodes_to_exclude=/model/layers.0/mlp/gate/MatMul,"
                 "/model/layers.1/mlp/experts/MoE")
    nodes = {n.name: n.op_type for n in onnx.load(str(out / "model.onnx"),
                                                  load_external_data=False).graph.node}
    assert nodes["/model/layers.0/mlp/gate/MatMul"] == "MatMul"
    assert nodes["/model/layers.1/mlp/experts/MoE"] == "MoE"
    assert nodes["/model/layers.0/mlp/experts/QMoE"] == "QMoE"
    manifest = json.loads((out / "build_manifest.json").read_text())
    assert manifest["requires"] == {"onnxruntime": ">=1.31"}  # QMoE's accuracy_level (4)
