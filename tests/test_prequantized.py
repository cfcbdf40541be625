"""Checkpoints that arrive quantized (GPTQ, AWQ, compressed-tensors): read exactly, built with
their own codes on cpu (MatMulNBits), dequantized and rounded again on qnn, refused by name where
a tensor or option does not fit."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from quantized_checkpoints import quantize_checkpoint
from safetensors.numpy import load_file

from builder import BuildOptions, build
from builder.errors import BuilderError
from builder.options import ExecutionProvider, ExtraOptions, Precision
from builder.quant.base import QuantizedWeight
from builder.quant.prequantized import stored_format
from builder.testing import genai_greedy, max_abs_diff, run_decoder
from checkpoints import hf_greedy, hf_logits, make_checkpoint
from conftest import run_cli

TOL = 1e-4  # fp32, MatMulNBits at accuracy_level 1 (float activations)
EXACT = ["int4_accuracy_level=1", "int4_nodes_to_exclude=/lm_head/MatMul"]  # lm_head: float


@pytest.fixture(scope="module")
def phi3_checkpoint(tmp_path_factory):
    """Phi-3: q, k, v and gate, up stored fused (qkv_proj, gate_up_proj)."""
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "phi3", "phi3")


def _quantized(src, tmp_path, method, **kw):
    return quantize_checkpoint(src, tmp_path / method, method, **kw)


def _reader(folder):
    from builder.weights import CheckpointReader

    config = json.loads((folder / "config.json").read_text())
    return CheckpointReader(folder, stored_format(folder, config["quantization_config"]))


# -- reading -------------------------------------------------------------------------------
READS = [("gptq", dict(group=32, symmetric=True)),
         ("gptq", dict(group=64, symmetric=False, version="gptq_v2")),
         ("gptq", dict(group=128, symmetric=False, desc_act=True)),  # down: 192 = 128 + 64
         ("gptq", dict(group=0, symmetric=True)),
         ("gptq", dict(group=32, bits=8, symmetric=True)),
         ("awq", dict(group=32, symmetric=False)),
         ("awq", dict(group=128, symmetric=False)),
         ("compressed-tensors", dict(group=32, symmetric=True)),
         ("compressed-tensors", dict(group=64, symmetric=False)),
         ("compressed-tensors", dict(group=0, bits=8, symmetric=False))]


@pytest.mark.parametrize("method, kw", READS, ids=[
    f"{m}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for m, kw in READS])
def test_read_gives_the_stored_weights_exactly(method, kw, llama_checkpoint, tmp_path):
    """Every quantized linear reads back as (code - zero) * scale of the codes the test packed,
    bit for bit in float32; compressed-tensors' also against the library's own decompressor."""
    folder, ref = _quantized(llama_checkpoint, tmp_path, method, **kw)
    expected = load_file(ref / "model.safetensors")
    reader = _reader(folder)
    linears = [n for n in reader.names() if n.endswith((".qweight", ".weight_packed"))]
    assert len(linears) == 14
    orders = []
    for name in linears:
        weight = name.rsplit(".", 1)[0] + ".weight"
        assert reader.quantized(weight)
        got = reader.read(weight, expected[weight].shape)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected[weight], err_msg=weight)
        codes = reader.codes(weight)
        assert codes.bits == kw.get("bits", 4)
        orders.append(codes.k_order is not None)
    assert any(orders) == kw.get("desc_act", False)  # (one group a row: any order is its own)
    assert all(n.endswith(".weight") for n in reader.unused())  # every part read: the floats left
    if method == "compressed-tensors":
        _against_the_library(folder, reader, kw)


def _against_the_library(folder, reader, kw):
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        **q["config_groups"]["group_0"]["weights"]))
    stored = {k: torch.from_numpy(np.array(v)) for k, v in
              load_file(folder / "model.safetensors").items() if "float" not in str(v.dtype)}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        part = {k.rsplit(".", 1)[1]: v for k, v in stored.items() if k.startswith(name + ".")}
        part["weight_scale"] = torch.from_numpy(
            load_file(folder / "model.safetensors")[f"{name}.weight_scale"].astype(np.float32))
        theirs = PackedQuantizationCompressor.decompress(part, scheme)["weight"].numpy()
        ours = reader.read(f"{name}.weight")
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6, err_msg=name)


# -- building on cpu -----------------------------------------------------------------------
def _build(folder, out, precision=Precision.INT4, extra=(), ep=ExecutionProvider.CPU):
    return build(BuildOptions(model_name=str(folder), output=out, precision=precision,
                              execution_provider=ep, extra=ExtraOptions.parse(list(extra))))


def _matmul_nbits_rows(model_dir) -> list[np.ndarray]:
    """Every MatMulNBits weight of the graph, dequantized as the kernel reads it ([N, K])."""
    model = onnx.load(model_dir / "model.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        data, scales = inits[node.input[1]], inits[node.input[2]].astype(np.float32)
        zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
        order = None
        producer = {o: n for n in model.graph.node for o in n.output}.get(node.input[0])
        if producer is not None and producer.op_type == "Gather":
            order = inits[producer.input[1]]
        blocks = -(-a["K"] // a["block_size"])
        w = QuantizedWeight(data.reshape(a["N"], blocks, -1), scales.reshape(a["N"], blocks),
                            zp.reshape(a["N"], -1) if zp is not None else None, a["bits"],
                            a["block_size"], a["K"], order)
        weights.append(w.dequantize())
    return weights


def _rows(tensors: dict) -> set[bytes]:
    return {row.tobytes() for name, w in tensors.items() if name.endswith("proj.weight")
            and ".layers." in name for row in np.asarray(w, np.float32)}


BUILDS = [("llama", "gptq", dict(group=32, symmetric=True), ()),
          ("llama", "gptq", dict(group=128, symmetric=False, desc_act=True), ()),
          ("llama", "awq", dict(group=64, symmetric=False), ()),
          ("llama", "compressed-tensors", dict(group=0, symmetric=False), ()),
          ("phi3", "gptq", dict(group=32, symmetric=False), ()),  # fused qkv, gate_up stored
          ("phi3", "awq", dict(group=32, symmetric=False), ("unpack_matmul=true",))]


@pytest.mark.parametrize("arch, method, kw, extra", BUILDS,
                         ids=[f"{a}-{m}-{i}" for i, (a, m, _, _) in enumerate(BUILDS)])
def test_int4_build_keeps_the_checkpoints_codes(arch, method, kw, extra, llama_checkpoint,
                                                phi3_checkpoint, tmp_path):
    """-p int4 on cpu: every layer's MatMulNBits dequantizes to the checkpoint's own rows, bit
    for bit (packed, split or reordered as the architecture builds them; desc_act through a
    Gather of the input's columns); the model matches transformers running the dequantized
    weights, prefill and decode."""
    src = llama_checkpoint if arch == "llama" else phi3_checkpoint
    folder, ref = _quantized(src, tmp_path, method, **kw)
    out = _build(folder, tmp_path / "out", extra=[*EXACT, *extra])
    manifest = json.loads((out / "build_manifest.json").read_text())["checkpoint"]["quantized"]
    assert manifest["method"] == method and manifest["rounded_by_build"] == {}
    stored = _rows(load_file(ref / "model.safetensors"))
    weights = _matmul_nbits_rows(out)
    assert len(weights) == manifest["kept_codes"] >= 4
    for w in weights:
        assert all(row.tobytes() in stored for row in w)
    ids = np.random.default_rng(1).integers(3, 256, (1, 10))
    run = run_decoder(out, ids, steps=4)
    want = hf_logits(ref, run.tokens, run.attention_mask, 10)
    got = np.concatenate([run.prefill_logits, np.stack(run.step_logits, 1)], 1)
    assert max_abs_diff(got, want) <= TOL


def test_compressed_tensors_build_against_transformers_own_loader(llama_checkpoint, tmp_path):
    """transformers loads a compressed-tensors checkpoint itself (the library decompresses it):
    the build matches that model, and generates its greedy tokens through onnxruntime-genai."""
    folder, _ = _quantized(llama_checkpoint, tmp_path, "compressed-tensors", group=32)
    out = _build(folder, tmp_path / "out", extra=EXACT)
    ids = np.random.default_rng(2).integers(3, 256, (1, 9))
    run = run_decoder(out, ids, steps=4)
    want = hf_logits(folder, run.tokens, run.attention_mask, 9)
    got = np.concatenate([run.prefill_logits, np.stack(run.step_logits, 1)], 1)
    assert max_abs_diff(got, want) <= TOL
    prompt = ids[0].tolist()
    assert genai_greedy(out, prompt, 12) == hf_greedy(folder, prompt, 12)


def test_gptq_build_at_the_defaults_runs_through_genai(qwen3_checkpoint, tmp_path):
    """The defaults on a GPTQ Qwen3 (tied embeddings): the layers keep their codes, the tied
    table follows -p int4's default (lm_head 8 bits); onnxruntime-genai generates, and its
    tokens are transformers' on the dequantized model where the logits have clear margins."""
    folder, ref = _quantized(qwen3_checkpoint, tmp_path, "gptq", group=32)
    out = _build(folder, tmp_path / "out")
    manifest = json.loads((out / "build_manifest.json").read_text())
    q = manifest["checkpoint"]["quantized"]
    assert q["kept_codes"] == 3 * 4 and q["rounded_by_build"] == {}
    prompt = [5, 17, 99, 4, 200, 31]
    ours = genai_greedy(out, prompt, 8)
    assert len(ours) == len(prompt) + 8
    ids = np.asarray([ours])
    theirs = hf_logits(ref, ids, np.ones_like(ids), len(ours))[0]
    agree = np.mean(theirs[len(prompt) - 1:-1].argmax(-1) == ids[0, len(prompt):])
    assert agree >= 0.75  # (lm_head at 8 bits; the random tiny model has near ties)


def test_fp32_build_dequantizes(llama_checkpoint, tmp_path, caplog):
    folder, ref = _quantized(llama_checkpoint, tmp_path, "awq", group=32)
    with caplog.at_level(logging.INFO):
        out = _build(folder, tmp_path / "out", precision=Precision.FP32)
    assert "dequantizes its linears to float" in caplog.text
    ids = np.random.default_rng(3).integers(3, 256, (1, 8))
    run = run_decoder(out, ids, steps=2)
    want = hf_logits(ref, run.tokens, run.attention_mask, 8)
    assert max_abs_diff(run.prefill_logits, want[:, :8]) <= TOL


def test_linears_stacked_from_differently_ordered_groups_are_said(llama_checkpoint, tmp_path,
                                                                  caplog):
    """GPTQ desc_act with a column order of its own per linear: packed q/k/v cannot keep one
    Gather, so the build rounds them again and says so (log and manifest); unpack_matmul=true
    keeps every linear's codes."""
    folder, _ = _quantized(llama_checkpoint, tmp_path, "gptq", desc_act=True, shared_order=False)
    with caplog.at_level(logging.WARNING):
        out = _build(folder, tmp_path / "packed", extra=EXACT)
    rounded = json.loads((out / "build_manifest.json").read_text())["checkpoint"]["quantized"][
        "rounded_by_build"]
    assert set(rounded.values()) == {"mixed"} and len(rounded) == 4  # qkv, gate_up x 2 layers
    assert "unpack_matmul=true" in caplog.text
    out = _build(folder, tmp_path / "unpacked", extra=[*EXACT, "unpack_matmul=true"])
    q = json.loads((out / "build_manifest.json").read_text())["checkpoint"]["quantized"]
    assert q["rounded_by_build"] == {} and q["kept_codes"] == 14


# -- qnn -----------------------------------------------------------------------------------
@pytest.mark.xdist_group("qnn_prequantized")
def test_qnn_w4a16_from_gptq_is_dequantized_and_rounded_again(qwen3_checkpoint, tmp_path,
                                                               caplog):
    """On qnn a GPTQ checkpoint's linears become QDQ weights from their dequantized values
    (logged); the graphs are placed whole on the HTP and the accuracy report measures the
    quantized pipeline against the dequantized float model."""
    from qnn_helpers import only_graph_io_on_cpu, qnn_build

    folder, _ = _quantized(qwen3_checkpoint, tmp_path, "gptq", group=32)
    with caplog.at_level(logging.INFO):
        out = qnn_build(folder, tmp_path / "out", "w4a16")
    assert "dequantized and rounded again" in caplog.text
    manifest = json.loads((out / "build_manifest.json").read_text())
    assert manifest["checkpoint"]["quantized"]["kept_codes"] == 0
    assert manifest["accuracy"]["decode"]["mean_cosine"] > 0.9
    only_graph_io_on_cpu(out)


# -- refusals ------------------------------------------------------------------------------
def _config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("change, message", [
    ({"quant_method": "bitsandbytes"}, "quant_method='bitsandbytes'"),
    ({"bits": 3}, "bits=3"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format='marlin'"),
])
def test_formats_builder_does_not_read_are_refused(change, message, llama_checkpoint, tmp_path):
    folder, _ = _quantized(llama_checkpoint, tmp_path, "gptq")
    _config(folder, **change)
    r = run_cli("-m", str(folder), "-o", str(tmp_path / "out"), "-p", "int4")
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.count("error:") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["missing", "misshapen"])
def test_a_missing_or_misshapen_part_is_named(damage, llama_checkpoint, tmp_path):
    from safetensors.numpy import save_file

    folder, _ = _quantized(llama_checkpoint, tmp_path, "gptq")
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.up_proj." + ("qzeros" if damage == "missing" else "scales")
    if damage == "missing":
        del tensors[name]
    else:
        tensors[name] = tensors[name][:, :-8].copy()
    save_file(tensors, folder / "model.safetensors")
    r = run_cli("-m", str(folder), "-o", str(tmp_path / "out"), "-p", "int4")
    assert r.returncode == 2 and r.stderr.count("error:") == 1
    assert name in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_quantized_lm_head_keeps_its_codes(llama_checkpoint, tmp_path):
    """GPTQModel's lm_head=true: lm_head stored quantized keeps its codes on cpu (with the
    layers') and is read a slice at a time on qnn."""
    folder, ref = _quantized(llama_checkpoint, tmp_path, "gptq", lm_head=True)
    out = _build(folder, tmp_path / "out", extra=["int4_accuracy_level=1"])
    q = json.loads((out / "build_manifest.json").read_text())["checkpoint"]["quantized"]
    assert q["linears"] == 15 and q["kept_codes"] == 9 and q["rounded_by_build"] == {}
    ids = np.random.default_rng(8).integers(3, 256, (1, 8))
    run = run_decoder(out, ids, steps=2)
    want = hf_logits(ref, run.tokens, run.attention_mask, 8)
    got = np.concatenate([run.prefill_logits, np.stack(run.step_logits, 1)], 1)
    assert max_abs_diff(got, want) <= TOL


def test_a_data_aware_algorithm_is_refused_on_stored_codes(llama_checkpoint, tmp_path):
    folder, _ = _quantized(llama_checkpoint, tmp_path, "awq")
    with pytest.raises(BuilderError, match="int4_algo_config=gptq rounds every linear"):
        _build(folder, tmp_path / "out", extra=["int4_algo_config=gptq"])


@pytest.mark.parametrize("method, kw", [("gptq", dict(group=32, symmetric=True)),
                                        ("awq", dict(group=64, symmetric=False))])
def test_moe_experts_keep_their_codes(method, kw, tmp_path):
    """Qwen3-MoE: QMoE stacks every expert at int4_block_size (32), with zero points as -p
    int4's default asks: the checkpoint's groups are cut into those blocks (or one scale a row
    repeated over them), its symmetric codes given their implied zero point; nothing rounded."""
    src = make_checkpoint(tmp_path / "moe", "qwen3_moe")
    folder, ref = _quantized(src, tmp_path, method, **kw)
    out = _build(folder, tmp_path / "out", extra=EXACT)
    q = json.loads((out / "build_manifest.json").read_text())["checkpoint"]["quantized"]
    assert q["rounded_by_build"] == {} and q["kept_codes"] > 3 * 8 * 2
    ids = np.random.default_rng(4).integers(3, 256, (1, 10))
    run = run_decoder(out, ids, steps=3)
    want = hf_logits(ref, run.tokens, run.attention_mask, 10)
    got = np.concatenate([run.prefill_logits, np.stack(run.step_logits, 1)], 1)
    assert max_abs_diff(got, want) <= TOL


def test_reblocked_is_exact_or_refused():
    from builder.quant.prequantized import reblocked, to_blocks

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (6, 200)).astype(np.uint8)
    groups = np.arange(200) // 64  # 64, 64, 64 and a short 8
    scales = rng.uniform(0.01, 0.1, (6, 4)).astype(np.float32)
    zeros = rng.integers(0, 16, (6, 4)).astype(np.uint8)
    w = to_blocks("w", 4, codes, scales, zeros, groups)
    assert w.block_size == 64
    expected = (codes.astype(np.float32) - zeros[:, groups]) * scales[:, groups]
    np.testing.assert_array_equal(w.dequantize(), expected)
    small = reblocked(w, 16)
    assert small.block_size == 16 and small.scales.shape == (6, 13)
    np.testing.assert_array_equal(small.dequantize(), expected)
    assert reblocked(w, 128) is None  # would straddle two scales
    one = to_blocks("w", 4, codes, scales[:, :1], zeros[:, :1], np.zeros(200, np.int64))
    np.testing.assert_array_equal(reblocked(one, 32).dequantize(), one.dequantize())


@pytest.mark.xdist_group("qnn_prequantized")
def test_qnn_float_blocks_keep_symmetric_codes(qwen3_checkpoint, tmp_path):
    """qnn_int4_format=float_block: a symmetric 4-bit GPTQ checkpoint's codes and scales are
    the int4 QDQ weights as they are (groups of 64 cut into the blocks of 32), every layer
    projection; the graphs placed whole on the HTP."""
    from qnn_helpers import only_graph_io_on_cpu, qnn_build

    folder, ref = _quantized(qwen3_checkpoint, tmp_path, "gptq", group=64)
    out = qnn_build(folder, tmp_path / "out", "w4a16", "qnn_int4_format=float_block")
    q = json.loads((out / "build_manifest.json").read_text())["checkpoint"]["quantized"]
    assert q["rounded_by_build"] == {} and q["kept_codes"] >= 3 * 4
    stored = _rows(load_file(ref / "model.safetensors"))
    from qnn_helpers import transformer_graphs

    model = onnx.load(out / transformer_graphs(out)[0])
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    found = 0
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "DequantizeLinear" and "block_size" in attrs \
                and node.input[0] in inits:
            codes = inits[node.input[0]].astype(np.float32)  # [K, N]
            scales = inits[node.input[1]].astype(np.float32)  # [K / block, N]
            w = codes * np.repeat(scales, attrs["block_size"], axis=0)[:codes.shape[0]]
            assert all(row.tobytes() in stored for row in np.ascontiguousarray(w.T))
            found += 1
    assert found >= 3 * 4
    only_graph_io_on_cpu(out)


def test_cuda_int4_keeps_the_codes(llama_checkpoint, tmp_path):
    """-e cuda -p int4 (an fp16 graph, which onnxruntime's CPU EP also runs): the same codes,
    the fp16 scales exact, logits within fp16's error of the dequantized model's."""
    folder, ref = _quantized(llama_checkpoint, tmp_path, "gptq", group=64, symmetric=False)
    out = _build(folder, tmp_path / "out", extra=EXACT, ep=ExecutionProvider.CUDA)
    q = json.loads((out / "build_manifest.json").read_text())["checkpoint"]["quantized"]
    assert q["rounded_by_build"] == {} and q["kept_codes"] == 8
    stored = _rows(load_file(ref / "model.safetensors"))
    for w in _matmul_nbits_rows(out):
        assert all(row.tobytes() in stored for row in w)
    ids = np.random.default_rng(9).integers(3, 256, (1, 8))
    run = run_decoder(out, ids, steps=2)
    want = hf_logits(ref, run.tokens, run.attention_mask, 8)
    got = np.concatenate([run.prefill_logits, np.stack(run.step_logits, 1)], 1)
    assert max_abs_diff(got.astype(np.float32), want) <= 3e-2


@pytest.mark.parametrize("arch", ["lfm2", "qwen3_5", "granitemoehybrid_dense"])
def test_hybrids_keep_their_codes(arch, tmp_path):
    """The hybrids' own projections (LFM2's convolution in/out, Qwen3.5's in_proj_qkv/z and
    out_proj, Mamba2's in_proj, taken without its dt rows, and out_proj) keep their codes like
    attention's and the MLP's."""
    src = make_checkpoint(tmp_path / arch, arch)
    folder, ref = _quantized(src, tmp_path, "gptq", group=32, symmetric=False)
    out = _build(folder, tmp_path / "out", extra=EXACT)
    q = json.loads((out / "build_manifest.json").read_text())["checkpoint"]["quantized"]
    assert set(q["rounded_by_build"].values()) <= {"float"}  # (left float: N not 8 codes a word)
    quantized = load_file(folder / "model.safetensors")
    stored = {row.tobytes() for name, w in load_file(ref / "model.safetensors").items()
              if name.removesuffix(".weight") + ".qweight" in quantized
              for row in np.asarray(w, np.float32)}
    exact = [all(row.tobytes() in stored for row in w) for w in _matmul_nbits_rows(out)]
    assert sum(exact) == q["kept_codes"] >= 3 and q["kept_codes"] + len(q["rounded_by_build"]) \
        == len(exact)
    if q["rounded_by_build"]:  # those in float too: the model is then the checkpoint's
        out = _build(folder, tmp_path / "exact", extra=[
            "int4_accuracy_level=1", "int4_nodes_to_exclude=" + ",".join(
                ["/lm_head/MatMul", *q["rounded_by_build"]])])
    ids = np.random.default_rng(11).integers(3, 256, (1, 9))
    run = run_decoder(out, ids, steps=3)
    want = hf_logits(ref, run.tokens, run.attention_mask, 9)
    got = np.concatenate([run.prefill_logits, np.stack(run.step_logits, 1)], 1)
    assert max_abs_diff(got, want) <= 1e-4
