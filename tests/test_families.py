"""The families of LayerNorms, parallel blocks, MLPs without a gate and interleaved rotary
(Phi, Starcoder2, GPT-NeoX, StableLM, Cohere, Cohere2, GLM, GLM-4, OLMo 3, EXAONE 4, ERNIE 4.5,
Nemotron): what the plugin API does for them that
a plausible plugin once got silently wrong. fp32 parity against transformers is in
test_parity, each feature moving transformers' logits and -e qnn at the defaults in
test_architectures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from builder import BuildOptions, build
from builder.config import DecoderConfig
from builder.models import LlamaBuilder, Starcoder2Builder
from builder.ops.rotary import interleaved_order
from builder.options import ExecutionProvider, ExtraOptions, Precision
from builder.pipeline import resolve_lengths, resolve_splits
from builder.roles import TensorRole as R
from builder.testing import max_abs_diff, run_decoder
from checkpoints import FAMILIES, make_checkpoint
from conftest import run_cli

PROMPT = np.random.default_rng(3).integers(3, 256, (1, 12))


def _rotate_half(x, cos, sin):
    half = x.shape[-1] // 2
    return x * np.concatenate([cos, cos]) + np.concatenate([-x[half:], x[:half]]) * \
        np.concatenate([sin, sin])


def _interleaved(x, cos, sin):
    out = np.empty_like(x)
    out[0::2] = x[0::2] * cos - x[1::2] * sin
    out[1::2] = x[1::2] * cos + x[0::2] * sin
    return out


@pytest.mark.parametrize("head_dim, rotary_dim", [(32, 32), (64, 32), (128, 64)])
def test_interleaved_rotary_is_rotate_half_on_reordered_values(head_dim, rotary_dim):
    """Trap 3: interleaved rotary (Cohere, GLM) equals rotate-half rotary on the values
    reordered by ``interleaved_order``, and q·k is unchanged by the reordering; the unreordered
    rotate-half (Llama's, what a plugin inheriting it would build) is another model."""
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, head_dim))
    freq = 10000.0 ** -(np.arange(0, rotary_dim, 2) / rotary_dim)
    order = interleaved_order(head_dim, rotary_dim)

    def rotated(x, rotary, position):  # (q at position 7, k at 2: q·k sees the distance)
        a = freq * position
        return np.concatenate([rotary(x[:rotary_dim], np.cos(a), np.sin(a)), x[rotary_dim:]])

    def score(rotary, order=slice(None)):
        return rotated(q[order], rotary, 7) @ rotated(k[order], rotary, 2)

    assert np.isclose(score(_rotate_half, order), score(_interleaved))
    assert abs(score(_rotate_half) - score(_interleaved)) > 1e-2


def test_sizing_counts_no_gate_in_an_mlp_without_one():
    """Trap 6: the QNN part sizing of an MLP without a gate (Starcoder2-3B's shapes at w8a16)
    counts up and down only: 3 parts, where counting a gate made 4."""
    config = DecoderConfig.from_hf({
        "architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2",
        "vocab_size": 49152, "hidden_size": 3072, "intermediate_size": 12288,
        "num_hidden_layers": 30, "num_attention_heads": 24, "num_key_value_heads": 2,
        "max_position_embeddings": 16384, "rms_norm_eps": 1e-5, "tie_word_embeddings": True})
    roles = [r for r, _ in Starcoder2Builder.layer_weight_shapes(config, 0)]
    assert R.GATE not in roles and {R.UP, R.DOWN, R.UP_BIAS, R.ATTN_NORM_BIAS} <= set(roles)

    def parts(cls):
        options = BuildOptions(model_name="x", output=Path("unused"), precision=Precision.W8A16,
                               execution_provider=ExecutionProvider.QNN,
                               extra=ExtraOptions.parse([]))
        resolve_lengths(options, config)
        return len(resolve_splits(options, config, cls))

    print(f"Starcoder2-3B at w8a16: {parts(Starcoder2Builder)} parts; counted with a gate: "
          f"{parts(LlamaBuilder)}")
    assert parts(Starcoder2Builder) == 3 < parts(LlamaBuilder)


def test_lm_head_bias_with_a_vocabulary_in_slices(tmp_path):
    """Trap 8: Phi's lm_head bias on a calibrated QNN build whose vocabulary (33000) is run
    in slices of 32768 rows by calibration and the accuracy report: each slice adds its own
    rows of the bias, and the report's float reference has the bias too (a build that dropped
    or misplaced it would measure far below)."""
    from qnn_helpers import qnn_build

    ck = make_checkpoint(tmp_path / "ck", "phi", vocab_size=33000)
    folder = qnn_build(ck, tmp_path / "o", "w8a16")
    report = json.loads((folder / "build_manifest.json").read_text())["accuracy"]
    print("phi, vocabulary 33000, w8a16:", {p: report[p]["mean_cosine"] for p in
                                            ("prefill", "decode")})
    assert min(report[p]["mean_cosine"] for p in ("prefill", "decode")) >= 0.999


@pytest.mark.parametrize("arch", [*FAMILIES, "olmoe", "granitemoe"])
def test_int4_close_to_fp32(arch, checkpoints, built, tmp_path):
    """-p int4 at the defaults (k_quant, lm_head at 8 bits): every projection quantized (the
    families' biases, LayerNorms, packed or interleaved q/k rows and stacked experts included;
    a mixture's router stays float) and the logits
    close to the fp32 build's. Measured min cosine over the prompt: 0.88-0.99 (int4 blocks of 32
    on random weights, lowest with four layers of norms after the sublayers: OLMo 3, EXAONE 4;
    -p int8 0.9988-0.9996 on the same graphs); a wrong graph gives 0.1-0.5."""
    import onnx

    out = build(BuildOptions(model_name=str(checkpoints[arch]), output=tmp_path / "o",
                             precision=Precision.INT4))
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert not [n.name for n in graph.node if n.op_type == "MatMul"  # none left in float
                and not n.name.endswith("/mlp/gate/MatMul")]
    ours = run_decoder(out, PROMPT, steps=4)
    ref = run_decoder(built[arch], PROMPT, steps=4)
    a, b = ours.prefill_logits[0], ref.prefill_logits[0]
    cosine = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    print(f"{arch} int4 vs fp32: min cosine {cosine.min():.5f}, max abs {max_abs_diff(a, b):.3f}")
    assert cosine.min() >= 0.8


@pytest.mark.parametrize("changes, message", [
    ({"layer_norm_eps": 1e-3, "rms_norm_eps": 1e-5},
     "layer_norm_eps=0.001 and rms_norm_eps=1e-05 name the same setting and disagree"),
])
def test_aliased_keys_that_disagree(changes, message, checkpoints, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints["phi"], ck)
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, **changes}))
    r = run_cli("-m", str(ck), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]


def test_pythia_config_of_the_hub_keys(checkpoints, built, tmp_path):
    """Trap 10: a hub Pythia config.json names its rotary ``rotary_pct`` and
    ``rotary_emb_base`` (no rope_parameters): read as transformers reads them."""
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints["gpt_neox"], ck)
    config = json.loads((ck / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    (ck / "config.json").write_text(json.dumps(config))
    out = build(BuildOptions(model_name=str(ck), output=tmp_path / "o"))
    assert max_abs_diff(run_decoder(out, PROMPT).prefill_logits,
                        run_decoder(built["gpt_neox"], PROMPT).prefill_logits) == 0


def _without(config: dict, key: str) -> dict:
    """config.json without ``key`` (``rope_parameters.x``: inside rope_parameters)."""
    if key.startswith("rope_parameters."):
        rope = dict(config["rope_parameters"])
        del rope[key.split(".", 1)[1]]
        return {**config, "rope_parameters": rope}
    return {k: v for k, v in config.items() if k != key}


# keys a released config.json may leave out, whose transformers default is not builder's
# generic one (and differs from the tiny checkpoint's value where given, so the default binds)
LEFT_OUT = [("phi", "rope_parameters.partial_rotary_factor"), ("phi", "layer_norm_eps"),
            ("gpt_neox", "rope_parameters.partial_rotary_factor"), ("gpt_neox", "layer_norm_eps"),
            ("stablelm", "rope_parameters.partial_rotary_factor"),
            ("starcoder2", "tie_word_embeddings"), ("cohere", "logit_scale"),
            ("cohere2", "sliding_window")]


@pytest.mark.parametrize("arch, key", LEFT_OUT, ids=[f"{a}-{k}" for a, k in LEFT_OUT])
def test_defaults_of_keys_left_out(arch, key, checkpoints, tmp_path):
    """Trap 10: config.json without ``key`` builds what transformers builds from it (Phi's
    partial rotary 0.5, not 1.0; GPT-NeoX's 0.25; LayerNorm epsilons 1e-5, not 1e-6)."""
    from checkpoints import hf_logits

    ck = tmp_path / "ck"
    shutil.copytree(checkpoints[arch], ck)
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(_without(config, key)))
    out = build(BuildOptions(model_name=str(ck), output=tmp_path / "o"))
    run = run_decoder(out, PROMPT, steps=3)
    ref = hf_logits(ck, run.tokens, run.attention_mask, PROMPT.shape[1])
    ours = np.concatenate([run.prefill_logits] + [s[:, None] for s in run.step_logits], 1)
    assert max_abs_diff(ours, ref) <= 1e-4


@pytest.mark.parametrize("arch, key, value", [
    ("llama", "attention_scale", 2.0), ("phi", "use_parallel_residual", False),
    ("cohere", "rope_interleave", False)])
def test_a_key_the_architecture_does_not_read_is_refused(arch, key, value, checkpoints,
                                                         tmp_path):
    """Trap 10: a config.json key the architecture does not read (here: one that another
    family reads, or none does) may change the math in transformers: one error naming it,
    nothing written; training and bookkeeping keys (dropouts, dtype, use_cache) stay quiet."""
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints[arch], ck)
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, key: value}))
    r = run_cli("-m", str(ck), "-o", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{key}={value!r}: a key" in r.stderr and "does not read" in r.stderr, r.stderr
    assert f"config_keys_ignored={key}" in r.stderr  # (what to do when it changes nothing)
    assert not (tmp_path / "out").exists()


def test_config_keys_ignored(checkpoints, built, tmp_path):
    """A key the user knows changes nothing for this model is named in config_keys_ignored:
    built as without it; a name config.json does not have is refused (a typo would otherwise
    ignore nothing and say nothing)."""
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints["llama"], ck)
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, "my_training_flag": True}))
    r = run_cli("-m", str(ck), "-o", str(tmp_path / "out"), "--extra_options",
                "config_keys_ignored=my_training_flag")
    assert r.returncode == 0, r.stderr[-2000:]
    assert max_abs_diff(run_decoder(tmp_path / "out", PROMPT).prefill_logits,
                        run_decoder(built["llama"], PROMPT).prefill_logits) == 0
    r = run_cli("-m", str(ck), "-o", str(tmp_path / "typo"), "--extra_options",
                "config_keys_ignored=my_training_flag,my_traning_flag")
    assert r.returncode == 2 and "config_keys_ignored names my_traning_flag" in r.stderr, \
        r.stderr[-2000:]


@pytest.mark.parametrize("arch, algo", [("phi", "gptq"), ("gpt_neox", "rtn_mixed")])
def test_data_aware_int4_on_a_parallel_block_without_a_gate(arch, algo, checkpoints, tmp_path):
    """GPTQ and measured mixed precision see an MLP without a gate (up and down only) and a
    parallel block: the build's accuracy report against float stays close (measured: Phi gptq
    0.996, GPT-NeoX rtn_mixed 0.992 in prefill)."""
    out = build(BuildOptions(model_name=str(checkpoints[arch]), output=tmp_path / "o",
                             precision=Precision.INT4,
                             extra=ExtraOptions.parse([f"int4_algo_config={algo}"])))
    report = json.loads((out / "build_manifest.json").read_text())["accuracy"]
    assert min(report[p]["mean_cosine"] for p in ("prefill", "decode")) >= 0.98


def test_awq_scales_fold_into_a_layernorm_bias(checkpoints, tmp_path):
    """AWQ's scales divide a LayerNorm's bias as well as its weight. Starcoder2 with four
    outlier input channels of q/k/v (the norm's weight and bias x64 there, q/k/v's columns /64:
    the same model in float): AWQ scales the attention group of both layers, and the build is
    closer to the fp32 build than rtn's (measured mean cosine 0.990 against 0.972; a bias left
    unscaled would move every logit)."""
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    ck = tmp_path / "ck"
    shutil.copytree(checkpoints["starcoder2"], ck)
    tensors = load_file(ck / "model.safetensors")
    for name, factor in [(n, 64.0) for n in ("input_layernorm.weight", "input_layernorm.bias")] \
            + [(f"self_attn.{p}_proj.weight", 1 / 64) for p in "qkv"]:
        for layer in range(2):
            t = tensors[f"model.layers.{layer}.{name}"].astype(np.float32)
            t[..., :4] *= factor  # (a norm's channels; a projection's input columns)
            tensors[f"model.layers.{layer}.{name}"] = t.astype(ml_dtypes.bfloat16)
    save_file(tensors, ck / "model.safetensors", metadata={"format": "pt"})
    fp32 = build(BuildOptions(model_name=str(ck), output=tmp_path / "fp32"))
    ids = np.random.default_rng(3).integers(3, 256, (1, 24))
    ref = run_decoder(fp32, ids).prefill_logits[0]
    cosine = {}
    for algo in ("rtn", "awq"):
        out = build(BuildOptions(model_name=str(ck), output=tmp_path / algo,
                                 precision=Precision.INT4,
                                 extra=ExtraOptions.parse([f"int4_algo_config={algo}"])))
        got = run_decoder(out, ids).prefill_logits[0]
        cosine[algo] = float(np.mean(np.sum(got * ref, -1) / np.linalg.norm(got, axis=-1)
                                     / np.linalg.norm(ref, axis=-1)))
    groups = json.loads((tmp_path / "awq" / "build_manifest.json").read_text())["awq"]["groups"]
    print(f"starcoder2 with outlier channels: mean cosine {cosine}; AWQ {groups['attn']}")
    assert groups["attn"]["layers_scaled"] == 2
    assert cosine["awq"] >= 0.985 and cosine["awq"] > cosine["rtn"] + 0.01


def test_exaone4_pattern_of_its_released_configs(checkpoints, built, tmp_path):
    """EXAONE 4.0's released config.json may give its hybrid as sliding_window_pattern "LLLG"
    (three local layers, one global) without layer_types: the same model as layer_types."""
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints["exaone4"], ck)
    config = json.loads((ck / "config.json").read_text())
    assert config.pop("layer_types") == ["sliding_attention"] * 3 + ["full_attention"]
    (ck / "config.json").write_text(json.dumps({**config, "sliding_window_pattern": "LLLG"}))
    out = build(BuildOptions(model_name=str(ck), output=tmp_path / "o"))
    assert max_abs_diff(run_decoder(out, PROMPT).prefill_logits,
                        run_decoder(built["exaone4"], PROMPT).prefill_logits) == 0
    (ck / "config.json").write_text(json.dumps({**config, "sliding_window_pattern": "LGGG"}))
    other = build(BuildOptions(model_name=str(ck), output=tmp_path / "other"))
    assert max_abs_diff(run_decoder(other, PROMPT).prefill_logits,
                        run_decoder(built["exaone4"], PROMPT).prefill_logits) > 1e-2
