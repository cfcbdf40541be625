"""Hybrid models, whose layers are not all attention (LFM2's short convolutions): each
distinguishing feature moves transformers' logits, -p int4 quantizes the conv layers'
projections too, and what cannot be lowered yet (qnn's static graphs) is refused in one line.
fp32 parity against transformers (prefill, decode with the states carried, a left-padded batch,
onnxruntime-genai's greedy generation through its LFM2 cache) is in test_parity (HYBRIDS)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from builder import BuildOptions, build
from builder.options import Precision
from builder.testing import max_abs_diff, run_decoder
from checkpoints import hf_logits, hf_model
from conftest import run_cli

PROMPT_LEN = 12
IDS = np.random.default_rng(7).integers(3, 256, (1, PROMPT_LEN + 6))


def _logits(ck, model=None):
    return hf_logits(ck, IDS, np.ones_like(IDS), PROMPT_LEN, model=model)


def _conv_layers(model):
    return [layer.conv for layer in model.model.layers if hasattr(layer, "conv")]


def _earlier_taps_off(model):
    """Each channel sees its own token only: the window the state carries is unused."""
    for conv in _conv_layers(model):
        conv.conv.weight[..., :-1] = 0


def _q_k_norms_off(model):
    for layer in model.model.layers:
        if hasattr(layer, "self_attn"):
            layer.self_attn.q_layernorm = torch.nn.Identity()
            layer.self_attn.k_layernorm = torch.nn.Identity()


def _conv_biases_off(model):
    for conv in _conv_layers(model):
        for module in (conv.conv, conv.in_proj, conv.out_proj):
            module.bias.zero_()


FEATURES = {
    ("lfm2", "the conv window (earlier taps)"): _earlier_taps_off,
    ("lfm2", "q/k layernorm"): _q_k_norms_off,
    ("lfm2_bias", "the conv layers' biases"): _conv_biases_off,
    ("lfm2_bias", "the conv window (earlier taps)"): _earlier_taps_off,
}


@pytest.mark.parametrize("arch, feature", list(FEATURES), ids=[f"{a}-{f}" for a, f in FEATURES])
def test_each_feature_moves_transformers_logits(arch, feature, checkpoints):
    ck = checkpoints[arch]
    model = hf_model(ck)
    with torch.no_grad():
        FEATURES[arch, feature](model)
    moved = max_abs_diff(_logits(ck, model), _logits(ck))
    print(f"{arch} without {feature}: logits move by {moved:.3f}")
    assert moved > 1e-2


def test_left_padding_is_zeroed_before_the_convolution(checkpoints, built):
    """transformers zeroes padding positions before a conv layer: a left-padded row starts
    its window from zeros, as it would alone. Without the zeroing the pad token's embedding
    runs through the window (the test of it: the row alone and in the batch agree, and a
    batch whose pad positions hold another token gives the same logits)."""
    rng = np.random.default_rng(5)
    ids = rng.integers(3, 256, (2, PROMPT_LEN))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    runs = []
    for pad in (0, 77):
        ids[1, :5] = pad
        runs.append(run_decoder(built["lfm2"], ids, mask, steps=3))
    alone = run_decoder(built["lfm2"], ids[1:, 5:], steps=3)
    assert max_abs_diff(runs[0].prefill_logits[1, 5:], runs[1].prefill_logits[1, 5:]) < 1e-5
    assert max_abs_diff(runs[0].prefill_logits[1, 5:], alone.prefill_logits[0]) < 1e-4
    assert max_abs_diff(runs[0].step_logits[-1][1], alone.step_logits[-1][0]) < 1e-4


def test_graph_inputs_and_genai_config(checkpoints, built):
    """States by layer kind: KV cache inputs for the attention layers only, a conv window
    past.{i}.conv [batch, hidden, taps - 1] for each conv layer; genai_config.json names them
    and lists layer_types, as onnxruntime-genai's LFM2 cache reads them."""
    graph = onnx.load(str(built["lfm2_bias"] / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in graph.input}
    assert inputs["past.0.conv"] == ["batch_size", 64, 3]
    assert "past.2.conv" in inputs and "past.1.conv" not in inputs
    assert "past_key_values.1.key" in inputs and "past_key_values.0.key" not in inputs
    assert {o.name for o in graph.output} >= {"present.0.conv", "present.2.conv",
                                               "present.1.key", "present.1.value"}
    decoder = json.loads((built["lfm2_bias"] / "genai_config.json").read_text())["model"][
        "decoder"]
    assert decoder["layer_types"] == ["conv", "full_attention", "conv"]
    assert decoder["conv_cache_size"] == 3
    assert decoder["inputs"]["past_conv_names"] == "past.%d.conv"
    assert decoder["outputs"]["present_conv_names"] == "present.%d.conv"


def test_int4_quantizes_the_conv_layers(checkpoints, built, tmp_path):
    """-p int4 at the defaults: every projection of the conv layers (in_proj, out_proj) and of
    the attention and MLPs is MatMulNBits, the convolution's own taps stay float, and the logits
    stay close to the fp32 build's (measured min cosine 0.99; a wrong graph gives < 0.5)."""
    out = build(BuildOptions(model_name=str(checkpoints["lfm2"]), output=tmp_path / "o",
                             precision=Precision.INT4))
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "MatMul" not in ops
    assert ops.count("CausalConvWithState") == 3
    assert sum("/conv/in_proj/" in n.name or "/conv/out_proj/" in n.name
               for n in graph.node if n.op_type == "MatMulNBits") == 6
    ours = run_decoder(out, IDS[:, :PROMPT_LEN], steps=4)
    ref = run_decoder(built["lfm2"], IDS[:, :PROMPT_LEN], steps=4)
    a, b = ours.prefill_logits[0], ref.prefill_logits[0]
    cosine = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    print(f"lfm2 int4 vs fp32: min cosine {cosine.min():.5f}")
    assert cosine.min() >= 0.9


@pytest.mark.parametrize("args, message", [
    (["-e", "qnn"], "Lfm2Builder's conv layers (config.json's layer_types) have no lowering "
                    "for -e qnn's static graphs yet"),
    (["-p", "int4", "--extra_options", "int4_algo_config=gptq"],
     "int4_algo_config=gptq runs the layers as -e qnn's graphs"),
])
def test_what_is_not_lowered_is_refused(args, message, checkpoints, tmp_path):
    r = run_cli("-m", str(checkpoints["lfm2"]), "-o", str(tmp_path / "out"), *args)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_layer_types_and_full_attn_idxs_must_agree(checkpoints, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints["lfm2_bias"], ck)
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, "full_attn_idxs": [0]}))
    r = run_cli("-m", str(ck), "-o", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "layer_types and full_attn_idxs disagree" in r.stderr, r.stderr[-2000:]
