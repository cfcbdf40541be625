"""The new small models: hybrids, whose layers are not all attention (LFM2's short
convolutions, Qwen3.5's Gated DeltaNet), and GPT-OSS (attention sinks, clamped experts): each
distinguishing feature moves transformers' logits, -p int4 quantizes the conv layers'
projections too, and what cannot be lowered yet (qnn's static graphs of the recurrences) is
refused in one line. LFM2 on qnn: test_qnn_hybrids.
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
from builder.errors import ConfigError
from builder.options import ExecutionProvider, ExtraOptions, Precision
from builder.testing import max_abs_diff, run_decoder, run_pipeline
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


def _norms_minus_one(model):
    """Qwen3.5's (1 + w) RMSNorms read as w."""
    norms = [m for m in model.modules() if type(m).__name__ == "Qwen3_5RMSNorm"]
    assert norms
    for n in norms:
        n.weight -= 1


def _attention_gate_off(model):
    """The gate rows of each head's q_proj at 0: sigmoid 0.5 on every head."""
    c = model.config
    for layer in model.model.layers:
        if hasattr(layer, "self_attn"):
            w = layer.self_attn.q_proj.weight
            w.view(c.num_attention_heads, 2, c.head_dim, -1)[:, 1] = 0


def _delta_net(model):
    return [layer.linear_attn for layer in model.model.layers if hasattr(layer, "linear_attn")]


def _delta_conv_window_off(model):
    for net in _delta_net(model):
        net.conv1d.weight[..., :-1] = 0


def _decay_off(model):
    """A_log very negative: g = 0, the state never decays."""
    for net in _delta_net(model):
        net.A_log.fill_(-30.0)


def _value_heads_share_keys_wrongly(model):
    """Value head h reading key head h % key heads instead of h // (value / key heads): the
    in_proj_qkv rows of the key heads swapped."""
    for net in _delta_net(model):
        kd, d = net.key_dim, net.head_k_dim
        w = net.in_proj_qkv.weight
        for start in (0, kd):  # q's heads, then k's
            heads = w[start:start + kd].clone().view(-1, d, w.shape[1])
            w[start:start + kd] = heads.flip(0).reshape(kd, -1)


def _sinks_off(model):
    for layer in model.model.layers:
        layer.self_attn.sinks.fill_(-1e4)


def _router_bias_off(model):
    for layer in model.model.layers:
        layer.mlp.router.bias.zero_()


def _expert_biases_off(model):
    for layer in model.model.layers:
        layer.mlp.experts.gate_up_proj_bias.zero_()
        layer.mlp.experts.down_proj_bias.zero_()


def _clamp_off(model):
    for layer in model.model.layers:
        layer.mlp.experts.limit = 1e4


def _alpha_one(model):
    for layer in model.model.layers:
        layer.mlp.experts.alpha = 1.0


def _shared_expert_gate_off(model):
    """The shared expert's gate at 0: sigmoid 0.5 everywhere."""
    for layer in model.model.layers:
        layer.mlp.shared_expert_gate.weight.zero_()


def _mamba(model):
    return [layer.mamba for layer in model.model.layers if layer.mamba is not None]


def _d_skip_off(model):
    for m in _mamba(model):
        m.D.zero_()


def _mamba_conv_window_off(model):
    for m in _mamba(model):
        m.conv1d.weight[..., :-1] = 0


def _dt_bias_off(model):
    for m in _mamba(model):
        m.dt_bias.zero_()


def _gated_norm_gate_off(model):
    """z's rows of in_proj at 0: silu(0) = 0 would zero the output, so at a large bias
    instead: silu(z) ~ z ~ 10, a constant gate."""
    for m in _mamba(model):
        m.in_proj.weight[:m.intermediate_size] = 0
        if m.in_proj.bias is not None:
            m.in_proj.bias[:m.intermediate_size] = 10.0


FEATURES = {
    ("granitemoehybrid", "Mamba's D skip"): _d_skip_off,
    ("granitemoehybrid", "Mamba's conv window"): _mamba_conv_window_off,
    ("granitemoehybrid", "dt_bias"): _dt_bias_off,
    ("granitemoehybrid", "rotary (position_embedding_type)"): {"position_embedding_type": None},
    ("granitemoehybrid_dense", "the norm's gate z"): _gated_norm_gate_off,
    ("qwen3_5_moe", "the shared expert's gate"): _shared_expert_gate_off,
    ("gpt_oss", "attention sinks"): _sinks_off,
    ("gpt_oss", "the router's bias"): _router_bias_off,
    ("gpt_oss", "the experts' biases"): _expert_biases_off,
    ("gpt_oss", "the SwiGLU clamp"): _clamp_off,
    ("gpt_oss", "the SwiGLU alpha"): _alpha_one,
    ("gpt_oss", "the sliding window"): {"sliding_window": 1000},
    ("gpt_oss", "YaRN"): {"rope_parameters": {"rope_type": "default", "rope_theta": 150000.0}},
    ("qwen3_5", "(1 + w) norms"): _norms_minus_one,
    ("qwen3_5", "the attention output gate"): _attention_gate_off,
    ("qwen3_5", "the DeltaNet's conv window"): _delta_conv_window_off,
    ("qwen3_5", "the decay"): _decay_off,
    ("qwen3_5", "which key head a value head reads"): _value_heads_share_keys_wrongly,
    ("lfm2", "the conv window (earlier taps)"): _earlier_taps_off,
    ("lfm2", "q/k layernorm"): _q_k_norms_off,
    ("lfm2_bias", "the conv layers' biases"): _conv_biases_off,
    ("lfm2_bias", "the conv window (earlier taps)"): _earlier_taps_off,
}


@pytest.mark.parametrize("arch, feature", list(FEATURES), ids=[f"{a}-{f}" for a, f in FEATURES])
def test_each_feature_moves_transformers_logits(arch, feature, checkpoints):
    ck, off = checkpoints[arch], FEATURES[arch, feature]
    model = hf_model(ck, **(off if isinstance(off, dict) else {}))
    with torch.no_grad():
        if callable(off):
            off(model)
    moved = max_abs_diff(_logits(ck, model), _logits(ck))
    print(f"{arch} without {feature}: logits move by {moved:.3f}")
    assert moved > 1e-2


def test_every_hybrid_has_its_features_listed():
    from checkpoints import HYBRIDS

    assert {a for a, _ in FEATURES} == set(HYBRIDS)


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
    # Qwen3.5: a conv window over [q | k | v] (2 * 32 + 64 channels, 3 earlier inputs) and the
    # delta rule's state [value heads, dk, dv] per DeltaNet layer
    graph = onnx.load(str(built["qwen3_5"] / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in graph.input}
    assert inputs["past.0.conv"] == ["batch_size", 128, 3]
    assert inputs["past.2.recurrent"] == ["batch_size", 4, 16, 16]
    assert "past_key_values.1.key" in inputs and "past.1.conv" not in inputs
    genai = json.loads((built["qwen3_5"] / "genai_config.json").read_text())["model"]
    assert genai["type"] == "qwen3_5_text"
    assert genai["decoder"]["inputs"]["past_recurrent_names"] == "past.%d.recurrent"


# the layers' own projections at -p int4, and those left float on purpose (Qwen3.5's decay
# and rate rows, a row per value head)
INT4 = {"lfm2": (["/conv/in_proj/", "/conv/out_proj/"], []),
        "granitemoehybrid": (["/mamba/in_proj/", "/mamba/out_proj/"],
                             ["/mamba/dt_proj/", "/mlp/gate/"]),  # (and the routers)
        "qwen3_5": (["/linear_attn/in_proj_qkv/", "/linear_attn/in_proj_z/",
                     "/linear_attn/out_proj/", "/attn/gate_proj/"],
                    ["/linear_attn/in_proj_a/", "/linear_attn/in_proj_b/"])}


@pytest.mark.parametrize("arch", list(INT4))
def test_int4_quantizes_the_layers_of_every_kind(arch, checkpoints, tmp_path):
    """-p int4 at the defaults: every projection of the conv / DeltaNet layers, the attention
    (Qwen3.5's gate rows of q_proj included) and the MLPs is MatMulNBits but the decay's (float
    by design), and the convolutions' taps stay float."""
    out = build(BuildOptions(model_name=str(checkpoints[arch]), output=tmp_path / "o",
                             precision=Precision.INT4))
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    quantized, floats = INT4[arch]
    names = {op: [n.name for n in graph.node if n.op_type == op]
             for op in ("MatMulNBits", "MatMul", "CausalConvWithState")}
    layers = len(names["CausalConvWithState"])  # (the tiny ones: 4 layers)
    assert layers >= 2
    for part in quantized:  # (Qwen3.5's attention gate: in the other layers)
        assert sum(part in n for n in names["MatMulNBits"]) in (layers, 4 - layers), part
    assert all(any(f in n for f in floats) for n in names["MatMul"])
    assert all(sum(f in n for n in names["MatMul"]) >= layers for f in floats)


@pytest.mark.parametrize("arch", ["lfm2", "qwen3_5"])  # (with experts: test_moe)
def test_int4_graph_matches_dequantized_reference(arch, checkpoints, tmp_path):
    """fp32 activations (accuracy_level 1): the int4 graph computes exactly transformers with
    our dequantized weights, prefill and decode, which isolates the graph from the rounding
    error (on these random tiny hybrids large: transformers with its own int4 round to nearest
    gives Qwen3.5 a min logit cosine of 0.48 against float, as the build does)."""
    from builder.quant import QuantizedWeight

    ck = checkpoints[arch]
    out = build(BuildOptions(
        model_name=str(ck), output=tmp_path / "o", precision=Precision.INT4,
        extra=ExtraOptions(int4_algo_config="rtn", int4_accuracy_level=1, unpack_matmul=True)))
    model = hf_model(ck)
    m = onnx.load(str(out / "model.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    params = dict(model.named_parameters())
    weights = {}
    for codes in [n for n in inits if n.endswith("_Q4")]:
        name, data = codes[:-3], inits[codes]
        block = data.shape[2] * 2
        k = params[name.removesuffix(".gate")].shape[1]
        weights[name] = QuantizedWeight(data, inits[f"{name}_scales"], inits.get(f"{name}_zp"),
                                        4, block, k).dequantize()
    with torch.no_grad():
        for name, w in weights.items():
            if name.endswith(".gate"):  # Qwen3.5: q and gate rows back, side by side per head
                c, q = model.config, weights[name.removesuffix(".gate")]
                heads = c.num_attention_heads
                both = np.stack([q.reshape(heads, c.head_dim, -1),
                                 w.reshape(heads, c.head_dim, -1)], 1)
                params[name.removesuffix(".gate")].copy_(torch.from_numpy(
                    both.reshape(2 * heads * c.head_dim, -1)))
            elif name + ".gate" not in weights:
                params[name].copy_(torch.from_numpy(w))
    assert len(weights) >= 8
    run = run_decoder(out, IDS[:, :PROMPT_LEN], steps=6)
    with torch.no_grad():
        ref = model(torch.from_numpy(run.tokens)).logits.numpy()[0]
    ours = np.concatenate([run.prefill_logits[0]] + [s[0][None] for s in run.step_logits])
    assert max_abs_diff(ours, ref) <= 1e-4


@pytest.mark.parametrize("arch, args, message", [
    ("qwen3_5_moe", ["-e", "qnn", "-p", "w4a16", "--extra_options", "int4_algo_config=gptq"],
     "int4_algo_config=gptq: gptq rounds, scales or measures attention and dense MLP "
     "projections, and this model's MLPs are experts; use rtn"),
    ("lfm2", ["-p", "int4", "--extra_options", "int4_algo_config=awq"],
     "int4_algo_config=awq runs the layers as -e qnn's graphs, and awq scales attention and "
     "MLP projections only, and this model has conv layers (gptq and the *_mixed methods take "
     "them)"),
    ("qwen3_5", ["-p", "int4", "--extra_options", "int4_algo_config=awq_last"],
     "int4_algo_config=awq_last runs the layers as -e qnn's graphs"),
    ("lfm2", ["-e", "qnn", "-p", "w4a16", "--extra_options", "int4_algo_config=awq_gptq"],
     "int4_algo_config=awq_gptq: awq_gptq scales attention and MLP projections only, and this "
     "model has conv layers (gptq and the *_mixed methods take them); use gptq or rtn"),
])
def test_what_is_not_lowered_is_refused(arch, args, message, checkpoints, tmp_path):
    r = run_cli("-m", str(checkpoints[arch]), "-o", str(tmp_path / "out"), *args)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_mamba_projection_biases(tmp_path):
    """mamba_proj_bias (in_proj's and out_proj's biases), fp32 against transformers over a
    prompt and decode steps. (Not left-padded: with an in_proj bias the padding positions
    reach the conv window in transformers too, so a padded row differs from itself alone.)"""
    from checkpoints import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck", "granitemoehybrid_dense", mamba_proj_bias=True)
    out = build(BuildOptions(model_name=str(ck), output=tmp_path / "o"))
    run = run_decoder(out, IDS[:, :PROMPT_LEN], steps=6)
    ref = hf_logits(ck, run.tokens, run.attention_mask, PROMPT_LEN)
    ours = np.concatenate([run.prefill_logits] + [s[:, None] for s in run.step_logits], 1)
    assert max_abs_diff(ours, ref) <= 1e-4
    unbiased = hf_model(ck)
    with torch.no_grad():
        for layer in unbiased.model.layers:
            if layer.mamba is not None:
                layer.mamba.in_proj.bias.zero_()
                layer.mamba.out_proj.bias.zero_()
    assert max_abs_diff(_logits(ck, unbiased), _logits(ck)) > 1e-2  # the biases matter


def test_a_binding_time_step_limit_is_refused(checkpoints, tmp_path):
    """transformers clamps Mamba2's time step to time_step_limit in a prompt's scan and not in
    a decode step (measured on the tiny model: prompt logits exact, decode 0.14 off with the
    clamp in both): no one model, so the build refuses it."""
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints["granitemoehybrid_dense"], ck)
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, "time_step_limit": [0.0, 0.5]}))
    r = run_cli("-m", str(ck), "-o", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "time_step_limit=[0.0, 0.5] binds" in r.stderr, r.stderr[-2000:]


def test_layer_types_and_full_attn_idxs_must_agree(checkpoints, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints["lfm2_bias"], ck)
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, "full_attn_idxs": [0]}))
    r = run_cli("-m", str(ck), "-o", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "layer_types and full_attn_idxs disagree" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("arch, prefix", [("qwen3_5", "Qwen3_5"), ("qwen3_5_moe", "Qwen3_5Moe")])
def test_qwen3_5_multimodal_checkpoint_builds_its_text_model(arch, prefix, tmp_path):
    """Qwen3.5's small models are released as Qwen3_5ForConditionalGeneration: config.json
    nests the text model's fields in text_config and the weights sit under
    model.language_model. beside the vision tower's. The build is the text model (the vision
    weights unused), with the top-level tie_word_embeddings, and matches transformers' text
    model on the same weights."""
    import transformers

    from checkpoints import TINY, make_tokenizer

    text = {k: v for k, v in TINY[arch].items() if k not in ("arch", "config", "vectors")}
    config = getattr(transformers, f"{prefix}Config")(
        text_config={**text, "tie_word_embeddings": False, "bos_token_id": 1,
                     "eos_token_id": 2, "pad_token_id": 0},
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=64, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, num_position_embeddings=16),
        tie_word_embeddings=True)
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08) if p.dim() >= 2 else p.add_(torch.randn_like(p) * 0.3)
    ck = tmp_path / "vl"
    model.to(torch.bfloat16).save_pretrained(ck)
    make_tokenizer(ck)
    text_model = getattr(transformers, f"{prefix}ForCausalLM")(
        getattr(transformers, f"{prefix}TextConfig")(
            **{**config.text_config.to_dict(), "tie_word_embeddings": True}))
    text_model.model.load_state_dict(model.model.language_model.state_dict())
    text_model.tie_weights()
    out = build(BuildOptions(model_name=str(ck), output=tmp_path / "o"))
    run = run_decoder(out, IDS[:, :PROMPT_LEN], steps=4)
    ref = hf_logits(None, run.tokens, run.attention_mask, PROMPT_LEN,
                    model=text_model.float().eval())
    ours = np.concatenate([run.prefill_logits] + [s[:, None] for s in run.step_logits], 1)
    assert max_abs_diff(ours, ref) <= 1e-4
    genai = json.loads((out / "genai_config.json").read_text())["model"]
    assert genai["type"] == f"{arch}_text"


def test_a_plugin_declares_a_layer_kind_with_its_own_state(checkpoints, tmp_path):
    """A layer kind of a plugin's own, through the public API alone: a config class naming it
    in layer_types, a mixer that builds it (each channel averaged with its previous token's,
    through ``builder.ops.causal_conv``) and the state it carries (the previous token). The
    graph gets past.0.window / present.0.window and genai_config.json names them; a prompt
    then decode steps with the state carried give the logits of one prefill of the whole
    sequence (the state is really carried: with it zeroed each step they differ)."""
    from builder import DecoderConfig
    from builder.models import LlamaBuilder
    from builder.models.base import LayerState
    from builder.ops import causal_conv
    from test_plugins import _replacing

    class ShiftConfig(DecoderConfig):
        other_layer_types = ("shift",)

    class Shift(LlamaBuilder):
        architectures = ("LlamaForCausalLM",)
        config_class = ShiftConfig
        ignored_weights = (*LlamaBuilder.ignored_weights, "model.layers.0.self_attn.*")

        @classmethod
        def layer_states(cls, c, layer):
            return ((LayerState("window", (c.hidden_size, 1)),)
                    if cls.layer_kind(c, layer) == "shift" else ())

        def mixer(self, layer, x):
            if self.layer_kind(self.config, layer) != "shift":
                return super().mixer(layer, x)
            past, present = self.lowering.state(layer, "window")
            taps = self.gb.initializer(f"shift.{layer}", np.full(
                (self.config.hidden_size, 1, 2), 0.5, np.float32))
            return causal_conv(self.gb, "shift", x, taps, None, past, present)

    ck = tmp_path / "ck"
    shutil.copytree(checkpoints["llama"], ck)
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, "layer_types": [
        "shift", "full_attention"]}))
    out = build(BuildOptions(model_name=str(ck), output=tmp_path / "o",
                             extra=ExtraOptions(run_check="false")), _replacing(Shift))
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["inputs"]["past_window_names"] == "past.%d.window"
    assert decoder["layer_types"] == ["shift", "full_attention"]
    ids = IDS[:, :PROMPT_LEN + 4]
    whole = run_decoder(out, ids, steps=0).prefill_logits[0, PROMPT_LEN - 1:]
    stepped = run_decoder(out, ids[:, :PROMPT_LEN], steps=4, forced=ids[:, PROMPT_LEN:])
    ours = np.concatenate([stepped.prefill_logits[0, -1:]] + [s for s in stepped.step_logits])
    assert max_abs_diff(ours, whole) < 1e-4
    # the first decode step again, its window state zeroed: another result
    from builder.testing import session

    sess = session(out)
    names = [o.name for o in sess.get_outputs()]
    feeds = {i.name: np.zeros([1 if d == "batch_size" else 0 if isinstance(d, str) else d
                               for d in i.shape], np.float32)
             for i in sess.get_inputs() if i.name.startswith("past")}
    prompt = dict(zip(names, sess.run(None, {"input_ids": ids[:, :PROMPT_LEN],
                                             "attention_mask": np.ones((1, PROMPT_LEN),
                                                                       np.int64), **feeds})))
    feeds = {k: prompt["present." + k.removeprefix("past_key_values.").removeprefix("past.")]
             for k in feeds}
    feeds["past.0.window"] = np.zeros_like(feeds["past.0.window"])
    step = dict(zip(names, sess.run(None, {"input_ids": ids[:, PROMPT_LEN:PROMPT_LEN + 1],
                                           "attention_mask": np.ones((1, PROMPT_LEN + 1),
                                                                     np.int64), **feeds})))
    assert max_abs_diff(step["logits"][0, -1], whole[1]) > 1e-2

    # on qnn: a kind whose mixer calls an op of its own is refused, naming it; written with
    # lowering.conv and listed in static_layer_kinds, it builds, and its static pipeline
    # computes what the cpu graph does
    qnn = dict(execution_provider=ExecutionProvider.QNN, precision=Precision.FP32)
    with pytest.raises(ConfigError, match="Shift's shift layers .* have no lowering for -e qnn"):
        build(BuildOptions(model_name=str(ck), output=tmp_path / "q", **qnn), _replacing(Shift))

    class Listed(Shift):  # listed, but its mixer still calls an op of its own
        static_layer_kinds = ("shift",)

    with pytest.raises(ConfigError, match="layer 0 reads its state 'window' for an op of its "
                                          "own, which the static graphs cannot lower"):
        build(BuildOptions(model_name=str(ck), output=tmp_path / "q", **qnn),
              _replacing(Listed))
    assert not (tmp_path / "q").exists()

    class StaticShift(Shift):
        static_layer_kinds = ("shift",)

        def mixer(self, layer, x):
            if self.layer_kind(self.config, layer) != "shift":
                return LlamaBuilder.mixer(self, layer, x)
            return self.lowering.conv("shift", layer, "window", x, np.full(
                (self.config.hidden_size, 1, 2), 0.5, np.float32), f"shift.{layer}", None, None)

    folder = build(BuildOptions(model_name=str(ck), output=tmp_path / "q", **qnn,
                                extra=ExtraOptions.parse(["run_check=false",
                                                          "qnn_prefill_length=8"])),
                   _replacing(StaticShift))
    prompt = [int(t) for t in IDS[0, :PROMPT_LEN]]  # two chunks of 8, the second padded
    static = run_pipeline(folder, prompt, 5, forced=[int(t) for t in ids[0, PROMPT_LEN:]] + [0])
    assert max_abs_diff(np.stack(static.step_logits), ours) < 1e-3


def test_qwen3_5_moe_stacked_experts_as_released(checkpoints, built, tmp_path):
    """The released Qwen3.5-MoE checkpoints store each layer's experts stacked
    (``experts.gate_up_proj`` [experts, 2I, hidden], gate's rows then up's, and
    ``experts.down_proj``); transformers saves them one tensor per expert. The same weights in
    the stacked layout build the same model, float and int4."""
    from safetensors.numpy import load_file, save_file

    src = checkpoints["qwen3_5_moe"]
    ck = tmp_path / "stacked"
    shutil.copytree(src, ck)
    tensors = load_file(str(ck / "model.safetensors"))
    config = json.loads((ck / "config.json").read_text())
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.mlp.experts"
        experts = range(config["num_experts"])
        parts = {p: [tensors.pop(f"{prefix}.{e}.{p}.weight") for e in experts]
                 for p in ("gate_proj", "up_proj", "down_proj")}
        tensors[f"{prefix}.gate_up_proj"] = np.stack([
            np.concatenate([g, u]) for g, u in zip(parts["gate_proj"], parts["up_proj"])])
        tensors[f"{prefix}.down_proj"] = np.stack(parts["down_proj"])
    save_file(tensors, str(ck / "model.safetensors"))
    ids = IDS[:, :PROMPT_LEN]
    out = build(BuildOptions(model_name=str(ck), output=tmp_path / "o"))
    assert max_abs_diff(run_decoder(out, ids, steps=4).prefill_logits,
                        run_decoder(built["qwen3_5_moe"], ids, steps=4).prefill_logits) == 0
    quantized = [build(BuildOptions(model_name=str(c), output=tmp_path / f"q{i}",
                                    precision=Precision.INT4)) for i, c in enumerate((ck, src))]
    assert max_abs_diff(*(run_decoder(q, ids, steps=0).prefill_logits for q in quantized)) == 0


RELEASED_KEYS = {
    # LFM2's released configs: block_ff_dim and tie_embedding win over intermediate_size and
    # tie_word_embeddings in transformers; the rest it does not read
    "lfm2": {"intermediate_size": 999, "block_ff_dim": 192, "tie_embedding": True,
             "tie_word_embeddings": False, "block_dim": 64, "block_norm_eps": 1e-5,
             "block_use_swiglu": True, "block_mlp_init_scale": 1.0, "block_out_init_scale": 1.0,
             "block_use_xavier_init": True, "conv_dim": 64, "conv_dim_out": 64,
             "conv_use_xavier_init": True, "num_heads": 4, "use_pos_enc": True,
             "model_name": "tiny"},
    "qwen3_5": {"attn_output_gate": True, "mtp_num_hidden_layers": 1,
                "mtp_use_dedicated_embeddings": False, "mamba_ssm_dtype": "float32",
                "output_gate_type": "swish"},
    "gpt_oss": {"layer_types": None},  # (transformers alternates sliding and full layers)
}


@pytest.mark.parametrize("arch", list(RELEASED_KEYS))
def test_released_config_keys(arch, checkpoints, built, tmp_path):
    """The keys the released config.json files carry build the same model."""
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints[arch], ck)
    config = {**json.loads((ck / "config.json").read_text()), **RELEASED_KEYS[arch]}
    (ck / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                if v is not None}))
    out = build(BuildOptions(model_name=str(ck), output=tmp_path / "o"))
    ids = IDS[:, :PROMPT_LEN]
    assert max_abs_diff(run_decoder(out, ids, steps=2).prefill_logits,
                        run_decoder(built[arch], ids, steps=2).prefill_logits) == 0


@pytest.mark.parametrize("arch, changes, message", [
    ("qwen3_5", {"attn_output_gate": False}, "attn_output_gate=false"),
    ("qwen3_5", {"hidden_act": "gelu"}, "hidden_act 'gelu': the DeltaNet's convolution"),
    ("granitemoehybrid_dense", {"hidden_act": "gelu"}, "hidden_act 'gelu': the Mamba layers'"),
    ("granitemoehybrid", {"mamba_d_head": 8.0}, "mamba_d_head must be \"auto\" or an integer"),
    ("gpt_oss", {"quantization_config": {"quant_method": "awq"}},
     "of GPT-OSS's pre-quantized checkpoints only MXFP4 experts are read"),
])
def test_hybrid_config_fields_are_refused(arch, changes, message, checkpoints, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints[arch], ck)
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, **changes}))
    r = run_cli("-m", str(ck), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]


def test_gpt_oss_default_rotary(checkpoints, tmp_path):
    """config.json without rope_parameters: GPT-OSS's YaRN (factor 32 over 4096 positions), as
    transformers fills it, against transformers on the same folder."""
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints["gpt_oss"], ck)
    config = json.loads((ck / "config.json").read_text())
    del config["rope_parameters"]
    (ck / "config.json").write_text(json.dumps(config))
    out = build(BuildOptions(model_name=str(ck), output=tmp_path / "o"))
    run = run_decoder(out, IDS[:, :PROMPT_LEN], steps=3)
    ref = hf_logits(ck, run.tokens, run.attention_mask, PROMPT_LEN)
    ours = np.concatenate([run.prefill_logits] + [s[:, None] for s in run.step_logits], 1)
    assert max_abs_diff(ours, ref) <= 1e-4
    assert hf_model(ck).config.rope_parameters["factor"] == 32.0


def _mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., N, K] float → MXFP4 blocks [..., N, K / 32, 16] and E8M0 scales [..., N, K / 32]:
    each block of 32 over the power of two that brings its largest value to at most 6, each
    value to the nearest e2m1 code (the released checkpoints' format)."""
    from builder.models.gpt_oss import FP4

    blocks = w.reshape(*w.shape[:-1], -1, 32).astype(np.float32)
    top = np.abs(blocks).max(-1, keepdims=True)
    exponent = np.ceil(np.log2(np.maximum(top, 1e-30) / 6.0)).astype(np.int32)
    scaled = blocks / np.exp2(exponent)
    codes = np.abs(scaled[..., None] - FP4).argmin(-1).astype(np.uint8)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    # (contiguous: safetensors writes a strided array's buffer as is)
    return (np.ascontiguousarray(packed),
            np.ascontiguousarray((exponent[..., 0] + 127).astype(np.uint8)))


def test_gpt_oss_mxfp4_checkpoint(checkpoints, tmp_path):
    """GPT-OSS as released: MXFP4 experts (``*_blocks``, ``*_scales``, quantization_config
    mxfp4). The build decodes them as transformers does (its own decoder, on the same bytes,
    makes the float reference) and matches that model, float and through QMoE's int4."""
    from safetensors.numpy import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    ck = tmp_path / "mxfp4"
    shutil.copytree(checkpoints["gpt_oss"], ck)
    tensors = load_file(str(ck / "model.safetensors"))
    decoded = {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = _mxfp4(np.swapaxes(tensors.pop(name).astype(np.float32), 1, 2))
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        decoded[name] = convert_moe_packed_tensors(torch.from_numpy(blocks),
                                                   torch.from_numpy(scales), dtype=torch.float32)
    save_file(tensors, str(ck / "model.safetensors"))
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, "quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}}))
    reference = hf_model(checkpoints["gpt_oss"])
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, w in decoded.items():
            params[name].copy_(w)
    out = build(BuildOptions(model_name=str(ck), output=tmp_path / "o"))
    run = run_decoder(out, IDS[:, :PROMPT_LEN], steps=4)
    ref = hf_logits(None, run.tokens, run.attention_mask, PROMPT_LEN, model=reference)
    ours = np.concatenate([run.prefill_logits] + [s[:, None] for s in run.step_logits], 1)
    assert max_abs_diff(ours, ref) <= 1e-4
    unquantized = hf_logits(checkpoints["gpt_oss"], run.tokens, run.attention_mask, PROMPT_LEN)
    assert max_abs_diff(ref, unquantized) > 1e-3  # (the decoded experts are another model)
    q = build(BuildOptions(model_name=str(ck), output=tmp_path / "q", precision=Precision.INT4))
    assert "QMoE" in [n.op_type for n in onnx.load(str(q / "model.onnx"),
                                                   load_external_data=False).graph.node]


def test_mixed_measures_the_layers_own_projections(checkpoints, tmp_path):
    """rtn_mixed on LFM2: a conv layer's own projections (kind_projections) are measured beside
    attention's and the MLP's, and promoted as they are: layer 1's conv out_proj, planted to
    cost its layer's output most at 4 bits (8 input channels 1024x larger, its columns reading
    them 1024x smaller, rounded to zero; the conv's output 8x larger), comes first (measured
    11.5 dB against 18.4 and more); the graph stores exactly the manifest's choice at 8
    bits."""
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    ck = tmp_path / "planted"
    shutil.copytree(checkpoints["lfm2"], ck)
    tensors = load_file(ck / "model.safetensors")
    # the same model in float: 8 channels of the conv's output 1024x larger (its C gate's rows
    # of in_proj, [B, C, x]), out_proj's columns reading them 1024x smaller
    inp, out_proj = (f"model.layers.1.conv.{n}.weight" for n in ("in_proj", "out_proj"))
    w_in, w_out = (tensors[n].astype(np.float32) for n in (inp, out_proj))
    hidden = w_out.shape[1]
    w_in[hidden:hidden + 8] *= 1024
    w_out[:, :8] /= 1024
    w_out *= 8  # (and the layer's conv writing more into the residual stream than it does)
    tensors[inp], tensors[out_proj] = (w.astype(ml_dtypes.bfloat16) for w in (w_in, w_out))
    save_file(tensors, ck / "model.safetensors", metadata={"format": "pt"})
    out = build(BuildOptions(model_name=str(ck), output=tmp_path / "o", precision=Precision.INT4,
                             extra=ExtraOptions(int4_algo_config="rtn_mixed")))
    report = json.loads((out / "build_manifest.json").read_text())["mixed_precision"]
    print("mixed precision:", report["promoted"], report["projections"][:4])
    measured = {(p["layer"], p["weight"]) for p in report["projections"]}
    assert {(i, w) for i in (0, 1, 3) for w in ("conv_in", "conv_out")} <= measured
    assert (2, "o") in measured and (0, "down") in measured
    assert report["promoted"][0]["layer"] == 1 and report["promoted"][0]["weight"] == "conv_out"
    assert report["projections"][0]["sqnr_db"] < report["projections"][1]["sqnr_db"] - 5
    nodes = {"conv_in": "conv/in_proj", "conv_out": "conv/out_proj", "qkv": "attn/qkv_proj",
             "o": "attn/o_proj", "gate_up": "mlp/gate_up_proj", "down": "mlp/down_proj"}
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    eight = {n.name for n in graph.node if n.op_type == "MatMulNBits" and any(
        a.name == "bits" and a.i == 8 for a in n.attribute)}
    assert eight == {"/lm_head/MatMul_Q8"} | {
        f"/model/layers.{p['layer']}/{nodes[p['weight']]}/MatMul_Q8" for p in report["promoted"]}
