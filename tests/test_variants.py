"""Packed and unpacked projections, fp16/bf16 builds, and the graph-shape options."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from safetensors import safe_open

from builder import BuildOptions, ExtraOptions, build
from builder.options import ExecutionProvider, Precision
from builder.testing import genai_greedy, max_abs_diff, run_decoder, session
from checkpoints import hf_greedy, hf_logits, hf_model

PROMPT, STEPS = 10, 6
IDS = np.random.default_rng(7).integers(3, 256, (1, PROMPT))


def _build(ck, out, *extra, precision="fp32", ep="cpu"):
    return build(BuildOptions(model_name=str(ck), output=out, precision=Precision(precision),
                              execution_provider=ExecutionProvider(ep),
                              extra=ExtraOptions.parse(list(extra))))


def _ops(folder, filename="model.onnx"):
    return [n.op_type for n in onnx.load(str(folder / filename), load_external_data=False).graph.node]


def _all_logits(run):
    return np.concatenate([run.prefill_logits[0]] + [s for s in run.step_logits])


# -- packed / unpacked ------------------------------------------------------------------------
@pytest.mark.parametrize("arch, matmuls_per_layer", [
    ("qwen3", (4, 7)), ("llama", (4, 7)), ("phi3", (4, 7))])
def test_packed_and_unpacked_projections_agree(arch, matmuls_per_layer, checkpoints, built,
                                               tmp_path):
    layers = json.loads((checkpoints[arch] / "config.json").read_text())["num_hidden_layers"]
    packed = _build(checkpoints[arch], tmp_path / "packed", "unpack_matmul=false")
    unpacked = _build(checkpoints[arch], tmp_path / "unpacked", "fuse_qkv=false")
    assert (packed / "model.onnx").read_bytes() == (built[arch] / "model.onnx").read_bytes()
    for folder, per_layer in zip((packed, unpacked), matmuls_per_layer):
        assert _ops(folder).count("MatMul") == per_layer * layers + (arch != "qwen3")
    a = run_decoder(packed, IDS, steps=STEPS)
    b = run_decoder(unpacked, IDS, steps=STEPS, forced=a.tokens[:, PROMPT:])
    assert max_abs_diff(_all_logits(a), _all_logits(b)) <= 1e-5


def test_phi3_unpacked_splits_the_fused_checkpoint_tensor(checkpoints, tmp_path):
    out = _build(checkpoints["phi3"], tmp_path / "o", "unpack_matmul=true")
    m = onnx.load(str(out / "model.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    with safe_open(str(checkpoints["phi3"] / "model.safetensors"), "numpy") as f:
        qkv = f.get_tensor("model.layers.0.self_attn.qkv_proj.weight").astype(np.float32)
    q = inits["model.layers.0.self_attn.q_proj.weight"]  # stored [in, out] for MatMul
    np.testing.assert_array_equal(q.T, qkv[: q.shape[1]])


# -- precisions -------------------------------------------------------------------------------
FP16_TOL = 3e-2  # logits of scale ~3; fp16 weights, activations and KV cache


@pytest.mark.parametrize("arch", ["qwen3", "llama", "phi3", "phi4mini", "qwen3_moe", "mixtral",
                                  "qwen2", "gemma2", "gemma3", "smollm3", "granite", "olmo2"])
@pytest.mark.parametrize("ep", ["cpu", "cuda"])
def test_fp16_runs_on_cpu_close_to_transformers(arch, ep, checkpoints, tmp_path):
    """fp16 graphs (the cpu one, and the cuda one, which onnxruntime's CPU EP also runs)
    against transformers fp32."""
    out = _build(checkpoints[arch], tmp_path / "o", precision="fp16", ep=ep)
    sess = session(out)
    assert {i.type for i in sess.get_inputs() if i.name.startswith("past")} == {"tensor(float16)"}
    assert sess.get_outputs()[0].type == "tensor(float16)"
    run = run_decoder(out, IDS, steps=STEPS)
    ref = hf_logits(checkpoints[arch], run.tokens, run.attention_mask, PROMPT)
    ours = _all_logits(run).astype(np.float32)
    theirs = ref[0]
    diff = max_abs_diff(ours, theirs)
    agree = ours.argmax(-1) == theirs.argmax(-1)
    top2 = np.sort(theirs, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * diff  # fp16 error cannot flip these
    print(f"{arch} fp16 -e {ep}: max abs diff {diff:.2e}, top-1 {agree.mean():.0%} "
          f"({agree[clear].mean():.0%} of {clear.sum()} positions with a clear winner)")
    assert diff <= FP16_TOL
    assert agree[clear].all() and clear.sum() >= len(clear) // 2


def test_bf16_cuda_build_keeps_checkpoint_weights_exactly(checkpoints, tmp_path):
    """bf16 has no CPU kernels to run here; check the graph and that weights are the
    checkpoint's bf16 values, bit for bit."""
    out = _build(checkpoints["llama"], tmp_path / "o", precision="bf16", ep="cuda")
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    BF16 = onnx.TensorProto.BFLOAT16
    assert {v.type.tensor_type.elem_type for v in m.graph.output} == {BF16}
    down = next(t for t in m.graph.initializer if t.name == "model.layers.1.mlp.down_proj.weight")
    assert down.data_type == BF16
    stored = np.frombuffer((out / "model.onnx.data").read_bytes(), np.uint16,
                           count=int(np.prod(down.dims)),
                           offset=int(next(e.value for e in down.external_data
                                           if e.key == "offset")))
    with safe_open(str(checkpoints["llama"] / "model.safetensors"), "numpy") as f:
        original = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert original.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(stored.reshape(down.dims), original.T.view(np.uint16))
    g = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert g["session_options"]["provider_options"] == [{"cuda": {}}]


# -- graph-shape options ----------------------------------------------------------------------
def test_exclude_embeds(checkpoints, tmp_path):
    ck = checkpoints["qwen3"]
    out = _build(ck, tmp_path / "o", "exclude_embeds=true")
    sess = session(out)
    names = [i.name for i in sess.get_inputs()]
    assert "inputs_embeds" in names and "input_ids" not in names
    hf = hf_model(ck)
    with torch.no_grad():
        embeds = hf.model.embed_tokens(torch.from_numpy(IDS)).numpy()
        ref = hf(torch.from_numpy(IDS)).logits.numpy()
    feeds = {"inputs_embeds": embeds, "attention_mask": np.ones_like(IDS)}
    feeds.update({i.name: np.zeros((1, 2, 0, 32), np.float32) for i in sess.get_inputs()
                  if i.name.startswith("past")})
    logits = sess.run(["logits"], feeds)[0]
    assert max_abs_diff(logits, ref) <= 1e-4
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    readers = [n.op_type for n in m.graph.node if "model.embed_tokens.weight" in n.input]
    assert readers == ["FusedMatMul"]  # no lookup; the tied table stays, for lm_head
    inputs = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["inputs"]
    assert inputs.get("inputs_embeds") == "inputs_embeds" and "input_ids" not in inputs


@pytest.mark.parametrize("option", ["exclude_lm_head=true", "include_hidden_states=true"])
def test_hidden_states_outputs(option, checkpoints, tmp_path):
    ck = checkpoints["llama"]
    out = _build(ck, tmp_path / "o", option)
    sess = session(out)
    outputs = [o.name for o in sess.get_outputs()]
    assert "hidden_states" in outputs
    assert ("logits" in outputs) == option.startswith("include")
    hf = hf_model(ck)
    with torch.no_grad():
        hidden = hf.model(torch.from_numpy(IDS)).last_hidden_state.numpy()
    feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS)}
    feeds.update({i.name: np.zeros((1, 2, 0, 16), np.float32) for i in sess.get_inputs()
                  if i.name.startswith("past")})
    got = dict(zip(outputs, sess.run(None, feeds)))
    assert got["hidden_states"].shape == hidden.shape
    declared = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["outputs"]
    assert declared.get("hidden_states") == "hidden_states"
    assert ("logits" in declared) == option.startswith("include")
    assert max_abs_diff(got["hidden_states"], hidden) <= 1e-4


def test_prune_lm_head(checkpoints, built, tmp_path):
    ck = checkpoints["qwen3"]
    out = _build(ck, tmp_path / "o", "prune_lm_head=true")
    shape = [d.dim_param or d.dim_value for d in onnx.load(
        str(out / "model.onnx"), load_external_data=False).graph.output[0].type.tensor_type.shape.dim]
    assert shape == ["batch_size", 1, 256]
    full = run_decoder(built["qwen3"], IDS, steps=STEPS)
    pruned = run_decoder(out, IDS, steps=STEPS)
    assert pruned.prefill_logits.shape == (1, 1, 256)
    assert max_abs_diff(pruned.prefill_logits[:, 0], full.prefill_logits[:, -1]) <= 1e-5
    assert (pruned.tokens == full.tokens).all()
    prompt = [int(t) for t in IDS[0]]
    assert genai_greedy(out, prompt, 8) == hf_greedy(ck, prompt, 8)


def test_num_hidden_layers(checkpoints, tmp_path):
    ck = checkpoints["qwen3"]
    out = _build(ck, tmp_path / "o", "num_hidden_layers=1")
    assert _ops(out).count("GroupQueryAttention") == 1
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"][
        "num_hidden_layers"] == 1
    run = run_decoder(out, IDS, steps=STEPS)
    ref = hf_logits(ck, run.tokens, run.attention_mask, PROMPT, num_hidden_layers=1)
    assert max_abs_diff(_all_logits(run), ref[0]) <= 1e-4


def test_filename(checkpoints, tmp_path):
    ck = checkpoints["llama"]
    out = _build(ck, tmp_path / "o", "filename=decoder.onnx")
    assert {"decoder.onnx", "decoder.onnx.data"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.onnx").exists()
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"][
        "filename"] == "decoder.onnx"
    prompt = [int(t) for t in IDS[0]]
    assert genai_greedy(out, prompt, 4) == hf_greedy(ck, prompt, 4)


def test_config_only(checkpoints, tmp_path):
    out = _build(checkpoints["qwen3"], tmp_path / "o", "config_only=true")
    assert sorted(p.name for p in out.iterdir()) == [
        "build_manifest.json", "genai_config.json", "generation_config.json", "tokenizer.json",
        "tokenizer_config.json"]


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_gelu_mlps_match_transformers(act, tmp_path):
    """GeGLU MLPs (hidden_act gelu, erf; gelu_pytorch_tanh, the tanh approximation), fp32
    against transformers eager; the activation matters (the silu build of the same weights is
    far off)."""
    from checkpoints import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck", "llama", hidden_act=act)
    run = run_decoder(_build(ck, tmp_path / act), IDS, steps=STEPS)
    ref = hf_logits(ck, run.tokens, run.attention_mask, PROMPT)[0]
    diff = max_abs_diff(_all_logits(run), ref)
    print(f"llama hidden_act={act}: max abs diff {diff:.2e}")
    assert diff <= 1e-4
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, "hidden_act": "silu"}))
    silu = run_decoder(_build(ck, tmp_path / "silu"), IDS, steps=STEPS,
                       forced=run.tokens[:, PROMPT:])
    assert max_abs_diff(_all_logits(silu), ref) > 1e-2
