"""The architectures that state only their differences (builder/models: Qwen2, Gemma 2,
Gemma 3, SmolLM3, Granite, OLMo 2, and the families of LayerNorms, parallel blocks, MLPs without
a gate and interleaved rotary: Phi, Starcoder2, GPT-NeoX, StableLM, Cohere, Cohere2): each
distinguishing feature matters on the tiny checkpoint (transformers' logits move without it),
the config fields they read are parsed or refused, and every target builds them through the one
definition. fp32 parity against transformers (prefill, decode, left-padded batch, genai
generation) is in test_parity, int4 in test_quant and test_families."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from builder.testing import max_abs_diff, run_decoder, run_pipeline
from checkpoints import FAMILIES, TINY, hf_logits, hf_model
from conftest import run_cli
from qnn_helpers import only_graph_io_on_cpu, qnn_build

NEW = ["qwen2", "gemma2", "gemma3", "smollm3", "granite", "olmo2", *FAMILIES]
PROMPT_LEN, STEPS = 12, 6
IDS = np.random.default_rng(7).integers(3, 256, (1, PROMPT_LEN + STEPS))

# (architecture, feature): what switches it off in transformers: config.json changes, modules
# replaced by nn.Identity or parameters zeroed (names under model.model.layers.<i>), every
# RMSNorm's weight less one (Gemma's (1 + w) read as w), or the embeddings times a factor
FEATURES = {
    ("qwen2", "q/k/v biases"): {"zero": ["self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                         "self_attn.v_proj.bias"]},
    ("gemma2", "attention soft-cap"): {"config": {"attn_logit_softcapping": None}},
    ("gemma2", "final soft-cap"): {"config": {"final_logit_softcapping": None}},
    ("gemma2", "query_pre_attn_scalar"): {"config": {"query_pre_attn_scalar": 32}},
    ("gemma2", "sliding window"): {"config": {"sliding_window": 1000}},
    ("gemma2", "post-attention norm"): {"identity": ["post_attention_layernorm"]},
    ("gemma2", "post-feed-forward norm"): {"identity": ["post_feedforward_layernorm"]},
    ("gemma2", "gelu_tanh"): {"config": {"hidden_activation": "silu"}},
    ("gemma2", "(1 + w) norms"): {"norms_minus_one": True},
    ("gemma2", "embedding scale"): {"embedding_times": 64 ** -0.5},
    ("gemma3", "(1 + w) norms"): {"norms_minus_one": True},
    ("gemma3", "embedding scale"): {"embedding_times": 64 ** -0.5},
    ("gemma3", "local rotary"): {"config": {"rope_parameters": {
        kind: {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 4.0}
        for kind in ("sliding_attention", "full_attention")}}},
    ("gemma3", "query_pre_attn_scalar"): {"config": {"query_pre_attn_scalar": 32}},
    ("gemma3", "q/k norm"): {"identity": ["self_attn.q_norm", "self_attn.k_norm"]},
    ("gemma3", "sliding window"): {"config": {"sliding_window": 1000}},
    ("smollm3", "NoPE layer"): {"config": {"no_rope_layers": [1, 1, 1]}},
    ("granite", "embedding_multiplier"): {"config": {"embedding_multiplier": 1.0}},
    ("granite", "attention_multiplier"): {"config": {"attention_multiplier": 16 ** -0.5}},
    ("granite", "residual_multiplier"): {"config": {"residual_multiplier": 1.0}},
    ("granite", "logits_scaling"): {"config": {"logits_scaling": 1.0}},
    ("olmo2", "q/k norm"): {"identity": ["self_attn.q_norm", "self_attn.k_norm"]},
    ("olmo2", "post-attention norm"): {"identity": ["post_attention_layernorm"]},
    ("olmo2", "post-feed-forward norm"): {"identity": ["post_feedforward_layernorm"]},
    ("phi", "q/k LayerNorm"): {"identity": ["self_attn.q_layernorm", "self_attn.k_layernorm"]},
    ("phi", "LayerNorm bias"): {"zero": ["input_layernorm.bias"]},
    ("phi", "MLP biases"): {"zero": ["mlp.fc1.bias", "mlp.fc2.bias"]},
    ("phi", "lm_head bias"): {"zero_model": ["lm_head.bias"]},
    ("starcoder2", "MLP biases"): {"zero": ["mlp.c_fc.bias", "mlp.c_proj.bias"]},
    ("starcoder2", "sliding window"): {"config": {"sliding_window": 1000}},
    ("gpt_neox", "parallel residual"): {"config": {"use_parallel_residual": False}},
    ("gpt_neox", "the MLP's own norm"): {"identity": ["post_attention_layernorm"]},
    ("gpt_neox", "partial rotary"): {"config": {"rope_parameters": {
        "rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 1.0}}},
    ("stablelm", "parallel residual"): {"config": {"use_parallel_residual": False}},
    ("stablelm", "q/k/v biases"): {"zero": ["self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                           "self_attn.v_proj.bias"]},
    ("cohere", "logit_scale"): {"config": {"logit_scale": 1.0}},
    ("cohere", "q/k norm per head"): {"identity": ["self_attn.q_norm", "self_attn.k_norm"]},
    ("cohere2", "sliding window"): {"config": {"sliding_window": 1000}},
    ("cohere2", "logit_scale"): {"config": {"logit_scale": 1.0}},
    ("glm", "q/k/v biases"): {"zero": ["self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                      "self_attn.v_proj.bias"]},
    ("glm4", "post-attention norm"): {"identity": ["post_self_attn_layernorm"]},
    ("glm4", "post-MLP norm"): {"identity": ["post_mlp_layernorm"]},
    ("olmo3", "sliding window"): {"config": {"sliding_window": 1000}},
    ("olmo3", "q/k norm"): {"identity": ["self_attn.q_norm", "self_attn.k_norm"]},
    ("exaone4", "sliding window"): {"config": {"sliding_window": 1000}},
    ("exaone4", "q/k norm"): {"identity": ["self_attn.q_norm", "self_attn.k_norm"]},
    ("ernie4_5", "MLP biases"): {"zero": ["mlp.gate_proj.bias", "mlp.up_proj.bias",
                                          "mlp.down_proj.bias"]},
    ("nemotron", "(1 + w) LayerNorms"): {"norms_minus_one": "LayerNorm1P"},
    ("nemotron", "MLP biases"): {"zero": ["mlp.up_proj.bias", "mlp.down_proj.bias"]},
    ("hunyuan", "q/k norm after rotary"): {"identity": ["self_attn.query_layernorm",
                                                        "self_attn.key_layernorm"]},
    ("hunyuan", "NTK alpha"): {"config": {"rope_parameters": {"rope_type": "default",
                                                              "rope_theta": 10000.0}}},
    ("arcee", "relu2"): {"config": {"hidden_act": "relu"}},
    ("helium", "q/k/v biases"): {"zero": ["self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                         "self_attn.v_proj.bias"]},
}


def _parity(ck, folder):
    """(max abs logit difference against transformers over a prefill and STEPS decode steps,
    the run, transformers' logits)."""
    run = run_decoder(folder, IDS[:, :PROMPT_LEN], steps=STEPS)
    ref = hf_logits(ck, run.tokens, run.attention_mask, PROMPT_LEN)
    ours = np.concatenate([run.prefill_logits] + [s[:, None] for s in run.step_logits], 1)
    return max_abs_diff(ours, ref), run, ref


def _logits(folder, model=None):
    return hf_logits(folder, IDS, np.ones_like(IDS), PROMPT_LEN, model=model)


@pytest.mark.parametrize("arch, feature", list(FEATURES), ids=[f"{a}-{f}" for a, f in FEATURES])
def test_each_feature_moves_transformers_logits(arch, feature, checkpoints):
    """Switched off in transformers, the feature changes the tiny checkpoint's logits: a build
    that dropped it would fail parity."""
    ck, off = checkpoints[arch], FEATURES[arch, feature]
    model = hf_model(ck, **off.get("config", {}))
    for layer in model.base_model.layers:
        for name in off.get("identity", []):
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent), child, torch.nn.Identity())
        for name in off.get("zero", []):
            torch.nn.init.zeros_(layer.get_parameter(name))
    for name in off.get("zero_model", []):
        torch.nn.init.zeros_(model.get_parameter(name))
    if off.get("norms_minus_one"):
        kind = off["norms_minus_one"] if isinstance(off["norms_minus_one"], str) else "RMSNorm"
        norms = [m for m in model.modules() if type(m).__name__.endswith(kind)]
        assert norms
        with torch.no_grad():
            for norm in norms:
                norm.weight -= 1
    if "embedding_times" in off:
        model.model.embed_tokens.register_forward_hook(
            lambda m, inputs, out: out * off["embedding_times"])
    moved = max_abs_diff(_logits(ck, model), _logits(ck))
    print(f"{arch} without {feature}: logits move by {moved:.3f}")
    assert moved > 1e-2


def test_every_new_architecture_has_its_features_listed():
    assert {a for a, _ in FEATURES} == set(NEW) and set(NEW) <= set(TINY)


def _edited(src, tmp_path, **changes):
    """A copy of checkpoint ``src`` whose config.json has ``changes`` (None: key removed)."""
    import shutil

    dst = tmp_path / "ck"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


GEMMA3_TYPES = TINY["gemma3"]["layer_types"]


@pytest.mark.parametrize("arch, changes, message", [
    ("gemma2", {"hidden_activation": "relu2"}, "hidden_act 'relu2' is not supported yet"),
    ("gemma3", {"rope_parameters": {"sliding_attention": {"rope_theta": 10.0},
                                    "chunked_attention": {"rope_theta": 10.0}}},
     "rope_parameters must be one set of parameters or one per layer type"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_theta": 10.0}}},
     "rope_parameters has no entry for layer type(s) sliding_attention"),
    ("gemma3", {"rope_parameters": {"sliding_attention": {"rope_type": "longrope"},
                                    "full_attention": {"rope_theta": 10.0}}},
     "rope_parameters.sliding_attention: LongRoPE per layer type is not supported"),
    ("gemma3", {"layer_types": ["chunked_attention"] * 4},
     "layer_types must list one of full_attention, sliding_attention"),
    ("gemma3", {"query_pre_attn_scalar": "big"},
     "query_pre_attn_scalar must be a positive number"),
    ("gemma2", {"attn_logit_softcapping": -1}, "attn_logit_softcapping must be a positive"),
    ("smollm3", {"no_rope_layers": [1, 2, 1]}, "no_rope_layers must list 0 or 1 for each"),
    ("granite", {"residual_multiplier": "half"}, "residual_multiplier must be a positive"),
    ("gemma3", {"use_bidirectional_attention": True},
     "use_bidirectional_attention=true (attention that sees later tokens"),
])
def test_config_fields_are_parsed_or_refused(arch, changes, message, checkpoints, tmp_path):
    """A config field that changes the math, with a value the builder does not support: one
    error line naming it, exit 2, nothing written."""
    ck = _edited(checkpoints[arch], tmp_path, **changes)
    r = run_cli("-m", str(ck), "-o", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_config_before_transformers_5(arch, checkpoints, built, tmp_path):
    """An older Gemma config.json builds the same model as transformers 5's: no layer_types
    (every sliding_window_pattern-th layer global: 2 by default for Gemma 2; this Gemma 3's
    pattern is 3), and Gemma 3's rotary as rope_theta and rope_scaling for the global layers
    and rope_local_base_freq for the local ones instead of rope_parameters by layer type."""
    changes = {"layer_types": None}
    if arch == "gemma3":
        params = TINY["gemma3"]["rope_parameters"]
        full = params["full_attention"]
        changes.update(rope_parameters=None, sliding_window_pattern=3,
                       rope_theta=full["rope_theta"],
                       rope_scaling={"rope_type": "linear", "factor": full["factor"]},
                       rope_local_base_freq=params["sliding_attention"]["rope_theta"])
    ck = _edited(checkpoints[arch], tmp_path, **changes)
    r = run_cli("-m", str(ck), "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    old, new = (run_decoder(f, IDS[:, :PROMPT_LEN], steps=STEPS)
                for f in (tmp_path / "out", built[arch]))
    assert max_abs_diff(old.prefill_logits, new.prefill_logits) == 0
    assert (old.tokens == new.tokens).all()
    wrong = _edited(checkpoints[arch], tmp_path / "w", **{**changes, "sliding_window_pattern": 4})
    r = run_cli("-m", str(wrong), "-o", str(tmp_path / "wrong"))
    assert r.returncode == 0, r.stderr[-2000:]
    other = run_decoder(tmp_path / "wrong", IDS[:, :PROMPT_LEN], steps=STEPS)
    assert max_abs_diff(other.prefill_logits, new.prefill_logits) > 1e-2  # the pattern binds


@pytest.mark.parametrize("arch", NEW)
def test_qnn_fp16_at_the_defaults_on_the_htp(arch, checkpoints, built, tmp_path):
    """-e qnn -p fp16 at the default P = 64, C = 512: the CPU EP pipeline against the fp32 CPU
    decoder (one definition, two lowerings), and the HTP simulator against the CPU EP on the
    same graphs."""
    pytest.importorskip("onnxruntime_qnn")
    from builder.testing import run_pipeline_on_qnn

    folder = qnn_build(checkpoints[arch], tmp_path / "o", "fp16", lengths="default")
    prompt = [int(t) for t in np.random.default_rng(11).integers(3, 256, 96)]  # two chunks
    cpu = run_decoder(built[arch], np.array([prompt]), steps=15)
    ref = [cpu.prefill_logits[0, -1]] + [s[0] for s in cpu.step_logits]
    greedy = [int(r.argmax()) for r in ref]
    on_cpu = run_pipeline(folder, prompt, 16, forced=greedy)
    on_qnn = run_pipeline_on_qnn(folder, prompt, 16, forced=greedy)
    err = max(float(np.abs(a - b).max()) for a, b in zip(on_cpu.step_logits, ref))
    cos = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
           for a, b in zip(on_qnn.step_logits, on_cpu.step_logits)]
    print(f"{arch} -e qnn -p fp16: CPU EP vs fp32 decoder max abs {err:.4f}; HTP vs CPU EP min "
          f"cosine {min(cos):.6f}")
    assert err <= 3e-2
    assert [int(x.argmax()) for x in on_cpu.step_logits] == greedy
    assert min(cos) >= 0.999


# measured on these random checkpoints: w8a16 0.9993-0.99997, w8a8 0.992-0.9997, w4a16
# 0.92-0.9996 (int4 blocks of 32 on random 0.08-std weights; a wrong graph gives ~0.1-0.5).
# The families run w8a16 only (the precisions share every lowering but the weights' bits).
COSINES = {"w8a16": 0.999, "w4a16": 0.9, "w8a8": 0.99}
QUANTIZED = [(a, p) for a in NEW for p in (["w8a16"] if a in FAMILIES else COSINES)]


@pytest.mark.parametrize("arch, precision", QUANTIZED, ids=[f"{a}-{p}" for a, p in QUANTIZED])
def test_qnn_quantized_at_the_defaults(arch, precision, checkpoints, tmp_path):
    """-e qnn -p w8a16 / w4a16 / w8a8 at the defaults: everything on QNN but the graph-I/O
    Q/DQ, and the build's accuracy report close to the float model (random weights, no clear
    winners: cosine only)."""
    pytest.importorskip("onnxruntime_qnn")
    folder = qnn_build(checkpoints[arch], tmp_path / "o", precision, lengths="default")
    only_graph_io_on_cpu(folder)
    report = json.loads((folder / "build_manifest.json").read_text())["accuracy"]
    print(f"{arch} {precision} report: " + "; ".join(
        f"{p} cosine {report[p]['mean_cosine']:.5f}, KL {report[p]['mean_kl']:.2e}"
        for p in ("prefill", "decode")))
    for phase in ("prefill", "decode"):
        assert report[phase]["mean_cosine"] >= COSINES[precision]


@pytest.mark.parametrize("arch, first", [("qwen2", 1), ("qwen3", 1), ("qwen2", 0)])
def test_qwen_window_without_layer_types(arch, first, tmp_path):
    """A config from before transformers 5 (use_sliding_window, no layer_types): the window
    binds only from max_window_layers on (0: every layer), as transformers fills
    layer_types."""
    from builder import BuildOptions, build
    from checkpoints import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck", arch, use_sliding_window=True, sliding_window=4,
                         max_window_layers=first)
    config = json.loads((ck / "config.json").read_text())
    layers = config["num_hidden_layers"]
    assert config.pop("layer_types") == (["full_attention"] * first
                                         + ["sliding_attention"] * (layers - first))
    (ck / "config.json").write_text(json.dumps(config))
    diff, run, ref = _parity(ck, build(BuildOptions(model_name=str(ck), output=tmp_path / "o")))
    assert diff <= 1e-4
    if first:
        every = hf_logits(ck, run.tokens, run.attention_mask, PROMPT_LEN,
                          model=hf_model(ck, layer_types=["sliding_attention"] * layers))
        assert max_abs_diff(every, ref) > 1e-2  # windowing layer 0 too: another model


def test_smollm3_window_without_layer_types(tmp_path):
    """SmolLM3 without layer_types: only its NoPE layers take the sliding window, as
    transformers fills layer_types."""
    from builder import BuildOptions, build
    from checkpoints import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck", "smollm3", use_sliding_window=True, sliding_window=4)
    config = json.loads((ck / "config.json").read_text())
    assert config.pop("layer_types") == ["full_attention", "sliding_attention", "full_attention"]
    (ck / "config.json").write_text(json.dumps(config))
    assert _parity(ck, build(BuildOptions(model_name=str(ck), output=tmp_path / "o")))[0] <= 1e-4


# keys a released config.json may leave out, whose transformers default is not builder's
# generic one (and differs from the tiny checkpoint's value, so the default binds)
LEFT_OUT = [("gemma2", "tie_word_embeddings"), ("gemma3", "tie_word_embeddings"),
            ("smollm3", "tie_word_embeddings"), ("gemma2", "attn_logit_softcapping"),
            ("gemma2", "final_logit_softcapping"), ("gemma2", "query_pre_attn_scalar"),
            ("gemma3", "query_pre_attn_scalar"), ("granite", "attention_multiplier"),
            ("olmo2", "rms_norm_eps")]


@pytest.mark.parametrize("arch, key", LEFT_OUT, ids=[f"{a}-{k}" for a, k in LEFT_OUT])
def test_defaults_of_keys_left_out(arch, key, checkpoints, tmp_path):
    """config.json without ``key``: the build takes transformers' default for the
    architecture, as transformers does (fp32 against transformers on the same folder)."""
    ck = _edited(checkpoints[arch], tmp_path, **{key: None})
    r = run_cli("-m", str(ck), "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert _parity(ck, tmp_path / "out")[0] <= 1e-4


@pytest.mark.parametrize("precision", ["fp32", "w8a16"])
def test_gemma3_in_parts_keeps_each_layers_rotary(precision, checkpoints, tmp_path):
    """-e qnn in two parts: the second starts at a global layer, whose rotary table must stay
    the global one although that part meets it first (the parts share one data file)."""
    unsplit = qnn_build(checkpoints["gemma3"], tmp_path / "one", precision)
    split = qnn_build(checkpoints["gemma3"], tmp_path / "two", precision, "qnn_num_splits=2")
    assert (split / "context_1.onnx").is_file()
    prompt = [int(t) for t in IDS[0, :PROMPT_LEN]]
    one, two = (run_pipeline(f, prompt, STEPS) for f in (unsplit, split))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(one.step_logits, two.step_logits))
    assert diff <= 1e-4 if precision == "fp32" else diff <= 0.05


TRAINED = ["gemma2", "gemma3", "smollm3"]  # those that train to clear winners in 250 steps (the
# other three keep top-2 margins of 0.04-0.17: their top-1 would measure noise)


@pytest.fixture(scope="module")
def trained_new(tmp_path_factory):
    """Clear-winner checkpoints (checkpoints.train_previous_token) and their fp32 CPU builds."""
    from builder import BuildOptions, build
    from checkpoints import make_checkpoint

    out = {}
    for arch in TRAINED:
        ck = make_checkpoint(tmp_path_factory.mktemp("trained") / arch, arch, trained=True)
        out[arch] = ck, build(BuildOptions(model_name=str(ck),
                                           output=tmp_path_factory.mktemp("fp32") / arch))
    return out


# measured: w8a16 mean cosine 0.99951-0.99999, w4a16 0.99244-0.99955, top-1 100% for all
@pytest.mark.xdist_group("trained_new")
@pytest.mark.parametrize("precision, cosine", [("w8a16", 0.999), ("w4a16", 0.99)])
@pytest.mark.parametrize("arch", TRAINED)
def test_quantized_accuracy_on_trained_checkpoints(arch, precision, cosine, trained_new,
                                                   tmp_path):
    """-e qnn at the defaults against the fp32 CPU decoder on its greedy path (CPU EP), on
    checkpoints with clear winners: the cost of quantization, not the graph's."""
    from qnn_helpers import PROMPTS

    ck, fp32 = trained_new[arch]
    prompt = PROMPTS["default"]
    cpu = run_decoder(fp32, np.array([prompt]), steps=16)
    ref = [cpu.prefill_logits[0, -1]] + [s[0] for s in cpu.step_logits]
    greedy = [int(r.argmax()) for r in ref]
    folder = qnn_build(ck, tmp_path / "o", precision, lengths="default")
    run = run_pipeline(folder, prompt, 17, forced=greedy)
    cos = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
           for a, b in zip(run.step_logits, ref)]
    top1 = np.mean([int(x.argmax()) == g for x, g in zip(run.step_logits, greedy)])
    print(f"{arch} {precision} trained: mean cosine {np.mean(cos):.5f} (min {min(cos):.5f}), "
          f"top-1 {top1:.0%}")
    assert np.mean(cos) >= cosine and top1 >= 0.95
