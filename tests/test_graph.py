"""The written model: valid ONNX, deterministic, the onnxruntime-genai I/O contract, names."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from builder import BuildOptions, build
from builder.graph import MS_DOMAIN, GraphBuilder


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_checker_full_check(arch, built):
    onnx.checker.check_model(str(built[arch] / "model.onnx"), full_check=True)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_build_is_byte_identical(arch, built, checkpoints, tmp_path):
    again = build(BuildOptions(model_name=str(checkpoints[arch]), output=tmp_path / "again"))
    for name in ("model.onnx", "model.onnx.data", "genai_config.json"):
        assert (again / name).read_bytes() == (built[arch] / name).read_bytes(), name


def _model(folder):
    return onnx.load(str(folder / "model.onnx"), load_external_data=False)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_io_contract(arch, built, checkpoints):
    cfg = json.loads((checkpoints[arch] / "config.json").read_text())
    layers, kv, hd = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
    g = _model(built[arch]).graph

    def shape(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    ins = {v.name: (v.type.tensor_type.elem_type, shape(v)) for v in g.input}
    outs = {v.name: (v.type.tensor_type.elem_type, shape(v)) for v in g.output}
    F, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    assert ins.pop("input_ids") == (I64, ["batch_size", "sequence_length"])
    assert ins.pop("attention_mask") == (I64, ["batch_size", "total_sequence_length"])
    assert outs.pop("logits") == (F, ["batch_size", "sequence_length", cfg["vocab_size"]])
    for i in range(layers):
        for kind in ("key", "value"):
            assert ins.pop(f"past_key_values.{i}.{kind}") == (
                F, ["batch_size", kv, "past_sequence_length", hd])
            assert outs.pop(f"present.{i}.{kind}") == (
                F, ["batch_size", kv, "total_sequence_length", hd])
    assert not ins and not outs


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_ops_names_and_opsets(arch, built, checkpoints):
    m = _model(built[arch])
    layers = json.loads((checkpoints[arch] / "config.json").read_text())["num_hidden_layers"]
    ops = [n.op_type for n in m.graph.node]
    names = [n.name for n in m.graph.node]
    assert len(set(names)) == len(names)
    assert ops.count("GroupQueryAttention") == layers
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers
    assert "/model/layers.0/attn/o_proj/MatMul" in names
    assert "/model/layers.1/mlp/down_proj/MatMul" in names
    assert "/lm_head/MatMul" in names
    assert {o.domain: o.version for o in m.opset_import} == {"": 23, MS_DOMAIN: 1}
    locations = {e.value for t in m.graph.initializer for e in t.external_data
                 if e.key == "location"}
    assert locations == {"model.onnx.data"}


def test_qwen3_specifics(built):
    """Tied: one embedding table; q/k norm over head_dim before GQA; separate q/k/v inputs."""
    m = _model(built["qwen3"])
    inits = {t.name for t in m.graph.initializer}
    assert "model.embed_tokens.weight" in inits and "lm_head.weight" not in inits
    assert "model.layers.0.self_attn.q_norm.weight" in inits
    gqa = next(n for n in m.graph.node if n.op_type == "GroupQueryAttention")
    assert gqa.input[1] and gqa.input[2]  # unpacked k and v after the norms


def test_llama_packs_qkv(built):
    m = _model(built["llama"])
    gqa = next(n for n in m.graph.node if n.op_type == "GroupQueryAttention")
    assert gqa.input[0].startswith("/model/layers.0/attn/qkv_proj/MatMul")
    assert gqa.input[1] == "" and gqa.input[2] == ""
    assert "lm_head.weight" in {t.name for t in m.graph.initializer}


def test_build_never_imports_torch(tmp_path, llama_checkpoint):
    code = (
        "import sys, builder\n"
        "from builder import BuildOptions, build\n"
        f"build(BuildOptions(model_name={str(llama_checkpoint)!r}, output={str(tmp_path / 'o')!r}))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "model.onnx").is_file()


@pytest.mark.parametrize("bits,block,lpbq", [(4, 32, True), (4, 32, False), (8, None, False)])
def test_dequantized_weights_are_what_dequantize_linear_computes(tmp_path, bits, block, lpbq):
    """Calibration's graphs store a QDQ weight as float values (``dequantized_weights``):
    onnxruntime dequantizes a constant weight at every run, which made the GPTQ stream's rerun
    of each layer 3x slower than its float pass. The values are the ones the shipped graphs'
    DequantizeLinear (LPBQ: of the multipliers' DequantizeLinear) computes, bit for bit."""
    from builder.quant.qdq import QdqQuantizer
    from builder.runner import session

    w = np.random.default_rng(0).normal(size=(48, 64)).astype(np.float32)
    stored = QdqQuantizer(bits, block or 32, False, lpbq).quantize(w)
    got = {}
    for flag in (False, True):
        gb = GraphBuilder("g", tmp_path / f"{flag}.data", dequantized_weights=flag)
        gb.output(gb.weight("w", stored), "w_out", TensorProto.FLOAT, [64, 48])
        gb.save(tmp_path / f"{flag}.onnx")
        ops = {n.op_type for n in onnx.load(str(tmp_path / f"{flag}.onnx")).graph.node}
        assert ("DequantizeLinear" in ops) != flag
        got[flag] = session(tmp_path, f"{flag}.onnx").run(None, {})[0]
    assert np.array_equal(got[True], got[False])
    assert np.abs(got[True] - w.T).max() > 0  # (rounded: not the float weight)


def test_a_graph_saved_for_some_values_computes_those_alone(tmp_path):
    """``save(only=...)`` (gptq_sequential's later passes, which need part of a layer): the
    graph's outputs are the values named, its nodes and weights those they need; the values
    are the whole graph's. With ``given``, it computes them from those values, fed."""
    from builder.runner import session

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 8)).astype(np.float32)
    w1, w2 = (rng.normal(size=(8, 8)).astype(np.float32) for _ in range(2))
    got = {}
    for name, only in (("whole", None), ("part", {"h", "z"})):
        gb = GraphBuilder(name, tmp_path / f"{name}.data")
        gb.input("x", TensorProto.FLOAT, [3, 8])
        h = gb.node("MatMul", ["x", gb.initializer("w1", w1)], outputs=["h"])
        y = gb.node("MatMul", [h, gb.initializer("w2", w2)])
        gb.output(y, "y", TensorProto.FLOAT, [3, 8])
        gb.output(gb.node("Relu", ["x"]), "z", TensorProto.FLOAT, [3, 8])
        gb.save(tmp_path / f"{name}.onnx", expose=only is None, only=only)
        model = onnx.load(str(tmp_path / f"{name}.onnx"), load_external_data=False).graph
        sess = session(tmp_path, f"{name}.onnx")
        got[name] = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))
    assert sorted(got["part"]) == ["h", "z"] and {"h", "y", "z"} <= set(got["whole"])
    assert [n.op_type for n in model.node] == ["MatMul", "Relu", "Identity"]  # (not w2's)
    assert [t.name for t in model.initializer] == ["w1"]
    for value in ("h", "z"):
        assert np.array_equal(got["part"][value], got["whole"][value])
    # given h (an earlier pass computed it): y from h alone; a state's present is an output
    # where the nodes kept read its past
    gb = GraphBuilder("rest", tmp_path / "rest.data")
    gb.input("x", TensorProto.FLOAT, [3, 8])
    gb.input("past", TensorProto.FLOAT, [3, 8])
    h = gb.node("MatMul", ["x", gb.initializer("w1", w1)], outputs=["h"])
    y = gb.node("MatMul", [gb.node("Add", [h, "past"]), gb.initializer("w2", w2)])
    gb.output(y, "y", TensorProto.FLOAT, [3, 8])
    gb.output(gb.node("Mul", ["past", "x"]), "present", TensorProto.FLOAT, [3, 8])
    gb.save(tmp_path / "rest.onnx", only={"y"}, given={"h"}, states={"past": "present"})
    model = onnx.load(str(tmp_path / "rest.onnx"), load_external_data=False).graph
    assert [t.name for t in model.initializer] == ["w2"]
    assert [o.name for o in model.output] == ["y", "present"]
    past = rng.normal(size=(3, 8)).astype(np.float32)
    y, present = session(tmp_path, "rest.onnx").run(None, {"x": x, "past": past,
                                                          "h": got["part"]["h"]})
    np.testing.assert_allclose(y, (x @ w1 + past) @ w2, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(present, past * x)
    with pytest.raises(RuntimeError, match="no float value named"):
        gb = GraphBuilder("bad", tmp_path / "bad.data")
        gb.input("x", TensorProto.FLOAT, [3, 8])
        gb.output(gb.node("Relu", ["x"]), "z", TensorProto.FLOAT, [3, 8])
        gb.save(tmp_path / "bad.onnx", only={"nothing"})


def test_overridable_weights_are_fed_or_stored(tmp_path):
    """``save(overridable=...)`` (mixed precision's probes: one graph, a weight fed per run):
    the initializers named are graph inputs too; a run that feeds one computes with the values
    fed, a run that does not with the stored ones; a name no initializer has is refused."""
    from builder.runner import session

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 8)).astype(np.float32)
    w1, w2, other = (rng.normal(size=(8, 8)).astype(np.float32) for _ in range(3))
    gb = GraphBuilder("g", tmp_path / "g.data")
    gb.input("x", TensorProto.FLOAT, [3, 8])
    h = gb.node("MatMul", ["x", gb.initializer("w1", w1)])
    gb.output(gb.node("MatMul", [h, gb.initializer("w2", w2)]), "y", TensorProto.FLOAT, [3, 8])
    gb.save(tmp_path / "g.onnx", overridable=["w1", "w2"])
    model = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False).graph
    assert [i.name for i in model.input] == ["x", "w1", "w2"]
    sess = session(tmp_path, "g.onnx")
    stored, = sess.run(None, {"x": x})
    fed, = sess.run(None, {"x": x, "w2": other})
    np.testing.assert_allclose(stored, x @ w1 @ w2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fed, x @ w1 @ other, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="no initializer named"):
        gb = GraphBuilder("bad", tmp_path / "bad.data")
        gb.input("x", TensorProto.FLOAT, [3, 8])
        gb.output(gb.node("Relu", ["x"]), "z", TensorProto.FLOAT, [3, 8])
        gb.save(tmp_path / "bad.onnx", overridable=["w1"])


def test_constants_that_begin_alike_are_two_tensors(tmp_path):
    """A constant is named after its first values and, when it has more, a digest of them: an
    identity and a lower triangle of ones (alike in their first row) stay two tensors."""
    gb = GraphBuilder("g", tmp_path / "g.data")
    eye = gb.constant(np.eye(12), np.float32)
    tril = gb.constant(np.tril(np.ones((12, 12))), np.float32)
    assert eye != tril and gb.constant(np.eye(12), np.float32) == eye
    gb.close()


def test_a_range_too_narrow_for_the_float_type_still_quantizes():
    """A calibrated range whose 16-bit step underflows fp16 gets fp16's smallest normal step,
    not a zero scale (a division by zero when the zero point is computed)."""
    from builder.quant.qdq import activation_params

    scale, zero = activation_params(-1e-9, 1e-9, 16, np.float16)
    assert float(scale) == float(np.finfo(np.float16).tiny) and int(zero) == 0
