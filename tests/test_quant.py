"""Weight-only int4/int8: quantizers against onnxruntime's, policies, and built models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits
from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu
from safetensors import safe_open

from builder import BuildOptions, ExtraOptions, build
from builder.errors import OptionError
from builder.options import Precision
from builder.quant import KQuantQuantizer, RtnQuantizer
from builder.quant.base import QuantizedWeight
from builder.quant.policy import mixed_layers
from builder.testing import max_abs_diff, run_decoder
from checkpoints import hf_model

RNG = np.random.default_rng(0)


def _ort_rtn(w: np.ndarray, bits: int, block: int, symmetric: bool):
    n, k = w.shape
    blocks = -(-k // block)
    data = np.zeros((n, blocks, block * bits // 8), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zp = np.zeros((n, -(-blocks * bits // 8)), np.uint8)
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(data, np.ascontiguousarray(w.T), scales, zp, block, n, k, symmetric)
    return data, scales, zp


def _weights_with_outliers(shape):
    w = RNG.standard_normal(shape).astype(np.float32) * 0.02
    w[RNG.random(shape) < 0.002] *= 30
    return w


# -- quantizers -------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("n, k, block", [(64, 128, 32), (48, 192, 128), (32, 256, 16),
                                         (8, 512, 256), (40, 96, 64)])
def test_rtn_is_bit_identical_to_onnxruntime(bits, symmetric, n, k, block):
    w = _weights_with_outliers((n, k))
    w[0, :7] = 0.0
    w[1] = 0.3  # a constant row: min == max
    data, scales, zp = _ort_rtn(w, bits, block, symmetric)
    q = RtnQuantizer(bits, block, symmetric).quantize(w)
    np.testing.assert_array_equal(q.data, data)
    np.testing.assert_array_equal(q.scales, scales)
    if symmetric:
        assert q.zero_points is None
    else:
        np.testing.assert_array_equal(q.zero_points, zp)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape, block", [((1024, 1024), 32), ((3072, 1024), 32),
                                          ((1024, 3072), 64), ((512, 2048), 128)])
def test_k_quant_error_no_worse_than_onnxruntime(bits, shape, block):
    w = _weights_with_outliers(shape)
    q, s, zp = quant_tensor_k_quant_cpu(w.copy(), bits, block)
    theirs = float(((((q - zp) * s).reshape(shape) - w) ** 2).mean())
    ours = float(((KQuantQuantizer(bits, block, False).quantize(w).dequantize() - w) ** 2).mean())
    print(f"k_quant int{bits} {shape} block {block}: mse ours {ours:.3e}, onnxruntime "
          f"{theirs:.3e} ({ours / theirs:.3f}x)")
    assert ours <= theirs


def test_k_quant_handles_blocks_of_one_sign():
    """The stored zero point is an integer code, so the grid must span 0: a block in [1, 2]
    must not be clipped (onnxruntime's k-quant clips it)."""
    w = np.random.default_rng(1).uniform(1, 2, (64, 256)).astype(np.float32)
    mse = {cls.name: float(((cls(4, 32, False).quantize(w).dequantize() - w) ** 2).mean())
           for cls in (KQuantQuantizer, RtnQuantizer)}
    assert mse["k_quant"] <= mse["rtn"]


def test_dequantize_roundtrip_is_close():
    w = _weights_with_outliers((64, 256))
    for cls in (RtnQuantizer, KQuantQuantizer):
        q = cls(8, 32, cls is RtnQuantizer).quantize(w)
        assert max_abs_diff(q.dequantize(), w) < np.abs(w).max() / 100


# -- policies ---------------------------------------------------------------------------------
def test_mixed_layers_follow_llama_cpp():
    assert sorted(mixed_layers(3)) == [0, 2]
    # 28 layers: i < 3.5, i >= 24.5, and (i - 4) % 3 == 2
    assert sorted(mixed_layers(28)) == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 25, 26, 27]


def _build(ck, out, precision, *extra):
    return build(BuildOptions(model_name=str(ck), output=out, precision=Precision(precision),
                              extra=ExtraOptions.parse(list(extra))))


def _nbits(folder):
    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return {n.name: {a.name: a.i for a in n.attribute}["bits"] for n in m.graph.node
            if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}


@pytest.mark.parametrize("algo, eight_bit", [
    ("default", {"/lm_head/MatMul_Q8"}),  # k_quant_last (measured best per byte)
    ("rtn", set()),
    ("k_quant", set()),
    ("rtn_last", {"/lm_head/MatMul_Q8"}),
    ("k_quant_last", {"/lm_head/MatMul_Q8"}),
    ("k_quant_mixed", {"/lm_head/MatMul_Q8", "/model/layers.0/attn/qkv_proj/MatMul_Q8",
                       "/model/layers.0/mlp/down_proj/MatMul_Q8"}),
])
def test_policy_puts_exactly_the_documented_tensors_at_8_bits(algo, eight_bit, checkpoints,
                                                              tmp_path):
    out = _build(checkpoints["llama"], tmp_path / "o", "int4", f"int4_algo_config={algo}")
    bits = _nbits(out)
    layers = 2  # llama-tiny: mixed layers of 2 are {0} (0 < 2/8; 1 < 7*2/8 and (1-0) % 3 != 2)
    assert len(bits) == 4 * layers + 1  # qkv, o, gate_up, down per layer + lm_head
    assert {name for name, b in bits.items() if b == 8} == eight_bit
    assert all(b == 4 for name, b in bits.items() if name not in eight_bit)


def test_mixed_unpacked_promotes_v_only(checkpoints, tmp_path):
    out = _build(checkpoints["qwen3"], tmp_path / "o", "int4", "int4_algo_config=k_quant_mixed",
                 "unpack_matmul=true")
    eight = {n for n, b in _nbits(out).items() if b == 8}
    # qwen3-tiny has 3 layers → layers 0 and 2; the tied, shared table is lm_head's (8 bits)
    assert eight == {"/lm_head/MatMul_Q8", "/model/embed_tokens/GatherBlockQuantized"} | {
        f"/model/layers.{i}/{p}/MatMul_Q8" for i in (0, 2)
        for p in ("attn/v_proj", "mlp/down_proj")}


def test_exclusion_names_must_exist(checkpoints, tmp_path):
    with pytest.raises(OptionError, match="no quantizable node named "
                                          "/model/layers.0/attn/q_proj/MatMul"):
        _build(checkpoints["llama"], tmp_path / "o", "int4",
               "int4_nodes_to_exclude=/model/layers.0/attn/q_proj/MatMul")  # packed: qkv_proj
    assert not (tmp_path / "o").exists()


def test_gather_only_leaves_matmuls_in_float(checkpoints, tmp_path):
    out = _build(checkpoints["llama"], tmp_path / "o", "int4", "int4_op_types_to_quantize=Gather")
    assert set(_nbits(out)) == {"/model/embed_tokens/GatherBlockQuantized"}


def test_int8_and_exclusions(checkpoints, tmp_path):
    out = _build(checkpoints["llama"], tmp_path / "o", "int8",
                 "int4_nodes_to_exclude=/lm_head/MatMul,/model/layers.1/mlp/down_proj/MatMul")
    bits = _nbits(out)
    assert set(bits.values()) == {8} and len(bits) == 4 * 2 - 1
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    plain = {n.name for n in m.graph.node if n.op_type == "MatMul"}
    assert plain == {"/lm_head/MatMul", "/model/layers.1/mlp/down_proj/MatMul"}


# -- built models -----------------------------------------------------------------------------
def test_every_rtn_tensor_matches_onnxruntime(checkpoints, tmp_path):
    """Quantize each checkpoint weight with onnxruntime's quantizer: same bytes as ours."""
    ck = checkpoints["llama"]
    out = _build(ck, tmp_path / "o", "int4", "unpack_matmul=true", "int4_algo_config=rtn")
    m = onnx.load(str(out / "model.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    checked = 0
    with safe_open(str(ck / "model.safetensors"), "numpy") as f:
        for name in f.keys():
            if f"{name}_Q4" not in inits:
                continue
            data, scales, _ = _ort_rtn(f.get_tensor(name).astype(np.float32), 4, 32, True)
            np.testing.assert_array_equal(inits[f"{name}_Q4"], data, err_msg=name)
            np.testing.assert_array_equal(inits[f"{name}_scales"], scales, err_msg=name)
            checked += 1
    assert checked == 7 * 2 + 1  # q, k, v, o, gate, up, down per layer, lm_head


def _dequantized_reference(ck, onnx_folder):
    """transformers with each quantized weight replaced by our dequantized one."""
    model = hf_model(ck)
    m = onnx.load(str(onnx_folder / "model.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for codes in [n for n in inits if n.rsplit("_", 1)[-1] in ("Q4", "Q8")]:
            name, bits = codes[:-3], int(codes[-1])
            data = inits[codes]
            q = QuantizedWeight(data, inits[f"{name}_scales"], inits.get(f"{name}_zp"), bits,
                                data.shape[2] * 8 // bits, params[name].shape[1])
            # A shared table is the tied parameter: lookup and lm_head read the same codes.
            params[name].copy_(torch.from_numpy(q.dequantize()))
    return model


@pytest.mark.parametrize("arch, precision, algo, ops", [
    ("qwen3", "int4", "rtn_last", "MatMul"), ("llama", "int4", "k_quant", "MatMul"),
    ("qwen3", "int8", "default", "MatMul"), ("mistral", "int4", "rtn", "MatMul,Gather"),
    ("llama", "int8", "k_quant_mixed", "MatMul,Gather"), ("qwen2", "int4", "rtn", "MatMul"),
    ("gemma2", "int4", "rtn", "MatMul"), ("gemma3", "int4", "k_quant", "MatMul"),
    ("smollm3", "int4", "rtn", "MatMul"), ("granite", "int4", "rtn", "MatMul"),
    ("olmo2", "int4", "rtn", "MatMul,Gather")])
def test_quantized_graph_matches_dequantized_reference(arch, precision, algo, ops, checkpoints,
                                                       tmp_path):
    """accuracy_level=1 (fp32 activations): the graph must compute exactly transformers with our
    dequantized weights; this isolates graph bugs from quantization error."""
    ck = checkpoints[arch]
    out = _build(ck, tmp_path / "o", precision, f"int4_algo_config={algo}",
                 "int4_accuracy_level=1", "unpack_matmul=true", f"int4_op_types_to_quantize={ops}")
    if "Gather" in ops:  # an unshared embedding, quantized on its own
        assert "GatherBlockQuantized" in [n.op_type for n in onnx.load(
            str(out / "model.onnx"), load_external_data=False).graph.node]
    ids = np.random.default_rng(5).integers(3, 256, (1, 10))
    run = run_decoder(out, ids, steps=6)
    model = _dequantized_reference(ck, out)
    tokens = torch.from_numpy(run.tokens)
    with torch.no_grad():
        ref = model(tokens).logits.numpy()[0]
    ours = np.concatenate([run.prefill_logits[0]] + run.step_logits)
    assert max_abs_diff(ours, ref) <= 1e-4


def test_shared_embeddings_true_false(checkpoints, tmp_path):
    ck = checkpoints["qwen3"]
    cfg = json.loads((ck / "config.json").read_text())
    table_bytes = cfg["vocab_size"] * cfg["hidden_size"]
    ids = np.random.default_rng(6).integers(3, 256, (1, 10))
    sizes = {}
    for precision in ("fp32", "int4"):
        runs = {}
        for shared in ("true", "false"):
            out = _build(ck, tmp_path / f"{precision}-{shared}", precision,
                         f"shared_embeddings={shared}")
            sizes[precision, shared] = (out / "model.onnx.data").stat().st_size
            runs[shared] = run_decoder(out, ids, steps=4)
        a, b = runs["true"], runs["false"]
        saved = sizes[precision, "false"] - sizes[precision, "true"]
        print(f"{precision}: shared saves {saved} bytes; a float table is {table_bytes * 4}")
        # Unshared, the lookup gets its own float table (the default op types quantize MatMul).
        assert table_bytes * 4 * 0.95 <= saved <= table_bytes * 4 * 1.05
        if precision == "fp32":  # the same table, read two ways: identical logits
            assert max_abs_diff(a.prefill_logits, b.prefill_logits) <= 1e-5
        else:  # shared int4: the lookup reads lm_head's codes, unshared the float table
            assert (a.prefill_logits.argmax(-1) == b.prefill_logits.argmax(-1)).mean() >= 0.8


@pytest.mark.parametrize("shape, bits, block, conv", [
    ((40, 96), 4, 32, False),
    ((24, 80), 4, 32, False),    # K not a multiple of the block
    ((7, 33), 4, 16, False),     # an odd count of codes
    ((48, 64), 8, None, False),  # int8 per channel (w8a16)
    ((40, 96), 4, None, True),   # int4 per channel on a 1x1 Conv
    ((48, 64), 8, None, True),
])
def test_qdq_weights_identical_to_onnxruntime(shape, bits, block, conv):
    """The static QDQ graphs' weights (builder.quant.qdq) against onnxruntime's quantizer for
    symmetric signed weights: the same scales and, stored, the same bytes."""
    from onnx import numpy_helper
    from onnxruntime.quantization import quant_utils

    from builder.quant.qdq import pack_int4, quantize_weight

    qtype = onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8
    w = (np.random.default_rng(7).standard_normal(shape) * 0.2).astype(np.float32)  # [N, K]
    w[0, :3] = 0.0
    if bits == 4 and not conv:
        w[1] = 0.0  # an all-zero block
    ours = quantize_weight(w, bits, block, conv)
    if conv:
        layout, axis = w.reshape(*shape, 1, 1), 0
    else:
        layout, axis = np.ascontiguousarray(w.T), 0 if block else 1
    if block:
        zero, scale = quant_utils.compute_scale_zp_blocked(layout, qtype, axis, block, True)
    else:
        pairs = [quant_utils.compute_data_quant_params(np.take(layout, c, axis=axis), qtype, True)
                 for c in range(layout.shape[axis])]
        zero = np.array([z for z, _ in pairs])
        scale = np.array([s for _, s in pairs], np.float32)
    assert not np.any(zero)
    np.testing.assert_array_equal(ours.scales, scale.astype(np.float32).reshape(ours.scales.shape))
    theirs = quant_utils.quantize_onnx_initializer(numpy_helper.from_array(layout, "w"), qtype,
                                                   zero, scale, axis, None, block or 0)
    codes = ours.codes
    stored = pack_int4(codes) if bits == 4 else codes.astype(np.int8)
    expected = theirs.raw_data or numpy_helper.to_array(theirs).astype(np.int8).tobytes()
    assert stored.tobytes() == expected
    np.testing.assert_allclose(ours.dequantize().reshape(layout.shape), layout,
                               atol=float(scale.max()) / 2 + 1e-7)


def test_lpbq_weights():
    """LPBQ int4 blocks (the -e qnn w4a16 default): each block's scale is a multiplier 1..16
    of its channel's scale (the largest float block scale / 16); the multipliers leave within 1%
    of the least squared error any of the 16 could (checked exhaustively), and never more than
    rounding the float block scale to a multiplier would; and onnxruntime's CPU EP reads the
    stored pattern (uint8 multipliers x channel scale → the int4 block DequantizeLinear) as the
    values the builder holds."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from builder.quant.qdq import pack_int4, quantize_weight

    n, k, block = 96, 256, 32
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.1, 2, (n, 1))).astype(np.float32)
    w[:, 40] *= 6  # an outlier input channel
    w[3] = 0.0     # an all-zero channel
    w[5, :block] = 0.0  # an all-zero block
    q = quantize_weight(w, 4, block, lpbq=True)
    m = q.multipliers
    assert m.shape == (k // block, n) and m.min() >= 1 and m.max() <= 16
    np.testing.assert_array_equal(m.astype(np.float32) * q.channel_scales, q.scales)
    blocks = w.T.reshape(k // block, block, n)
    top = np.abs(blocks).max(axis=(0, 1)) / np.float32(7.5 * 16)
    np.testing.assert_allclose(q.channel_scales, np.where(top > 0, top, 1), rtol=1e-6)
    codes = q.codes.reshape(blocks.shape).astype(np.float32)
    ours = np.square(blocks - codes * q.scales[:, None]).sum(axis=1)
    every = np.array([np.square(blocks - np.clip(np.rint(blocks / (c * q.channel_scales)), -8, 7)
                                * (c * q.channel_scales)).sum(axis=1) for c in range(1, 17)])
    naive = np.clip(np.rint(np.abs(blocks).max(axis=1) / 7.5 / q.channel_scales), 1, 16)
    naive_error = np.take_along_axis(every, naive.astype(int)[None] - 1, 0)[0]
    print(f"LPBQ block error: ours / exhaustive best {ours.sum() / every.min(0).sum():.4f}, "
          f"/ rounded multipliers {ours.sum() / naive_error.sum():.4f}")
    assert ours.sum() <= 1.01 * every.min(axis=0).sum()
    assert (ours <= naive_error * (1 + 1e-6)).all()
    floats = quantize_weight(w, 4, block)
    float_error = np.square(floats.dequantize() - w.T).sum()
    assert np.square(q.dequantize() - w.T).sum() <= 1.05 * float_error

    graph = helper.make_graph([
        helper.make_node("DequantizeLinear", ["m", "pc", "mz"], ["scale"], axis=1),
        helper.make_node("DequantizeLinear", ["codes", "scale", "cz"], ["w"], axis=0,
                         block_size=block)], "lpbq", [],
        [helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [k, n])],
        [numpy_helper.from_array(m, "m"), numpy_helper.from_array(q.channel_scales, "pc"),
         numpy_helper.from_array(np.zeros(n, np.uint8), "mz"),
         helper.make_tensor("codes", onnx.TensorProto.INT4, [k, n],
                            pack_int4(q.codes).tobytes(), raw=True),
         helper.make_tensor("cz", onnx.TensorProto.INT4, [k // block, n],
                            pack_int4(np.zeros((k // block, n), np.int8)).tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    got = ort.InferenceSession(model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {})[0]
    np.testing.assert_array_equal(got, q.dequantize())
