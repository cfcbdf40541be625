"""One model definition, lowered per target.

A test-only architecture changes each of the DecoderBuilder hooks that state a model's math (an
embedding multiplier, the attention scale, an attention soft-cap, a final logit soft-cap, a
sliding window on some layers only). Its -e cpu and -e qnn builds must both match transformers'
Qwen3 carrying the same modifications (hooks and a patched attention function: the reference
is not ours), and a method the static graphs cannot lower stops the build with its name.
"""

from __future__ import annotations

import functools
import json
import types

import numpy as np
import pytest
import torch
import transformers

from builder import BuildOptions, ExtraOptions, build, hookimpl
from builder.errors import ConfigError
from builder.models.qwen3 import Qwen3Builder
from builder.options import ExecutionProvider, Precision
from builder.plugins import load_plugins
from builder.testing import max_abs_diff, run_decoder, run_pipeline
from checkpoints import hf_logits, make_checkpoint

MULTIPLIER, SCALE, ATTN_CAP, LOGIT_CAP, WINDOW = 3.0, 0.3, 4.0, 5.0, 5
SLIDING = ("sliding_attention", "full_attention", "sliding_attention")
PROMPT = [int(t) for t in np.random.default_rng(5).integers(3, 256, 70)]  # > P = 64: 2 chunks
STEPS = 8


class HookedQwen3(Qwen3Builder):
    architectures = ("HookedQwen3ForCausalLM",)

    def embedding_multiplier(self):
        return MULTIPLIER

    def attention_scale(self):
        return SCALE

    def attention_softcap(self):
        return ATTN_CAP

    def final_logit_softcap(self):
        return LOGIT_CAP

    def sliding_window(self, layer):
        return WINDOW if SLIDING[layer] == "sliding_attention" else None


def _plugins(*classes):
    module = types.SimpleNamespace(register_architectures=hookimpl(
        lambda register: [register(cls) for cls in classes]))
    return load_plugins([("test", module)])


def _build(ck, out, cls=HookedQwen3, ep="cpu", precision="fp32", *extra):
    return build(BuildOptions(model_name=str(ck), output=out, precision=Precision(precision),
                              execution_provider=ExecutionProvider(ep),
                              extra=ExtraOptions.parse(list(extra))), _plugins(cls))


@pytest.fixture(scope="session")  # session: kept when other modules run between
def hooked(tmp_path_factory):
    """A plain tiny Qwen3 (long enough for the QNN defaults) renamed to the test architecture."""
    ck = make_checkpoint(tmp_path_factory.mktemp("hooked") / "ck", "qwen3",
                         max_position_embeddings=1024)
    config = json.loads((ck / "config.json").read_text())
    config["architectures"] = ["HookedQwen3ForCausalLM"]
    (ck / "config.json").write_text(json.dumps(config))
    return ck


@functools.cache
def _modified_model(ck, off):
    """transformers' Qwen3 (eager, fp32) with the hooks' modifications except those in
    ``off``, loaded once per set (the attention soft-cap is patched in by ``_reference``)."""
    window = {} if "window" in off else dict(
        layer_types=list(SLIDING), sliding_window=WINDOW, use_sliding_window=True)
    model = transformers.Qwen3ForCausalLM.from_pretrained(
        ck, dtype=torch.float32, attn_implementation="eager", **window).eval()
    if "multiplier" not in off:
        model.model.embed_tokens.register_forward_hook(lambda m, i, out: out * MULTIPLIER)
    if "scale" not in off:
        for layer in model.model.layers:
            layer.self_attn.scaling = SCALE
    if "logit_cap" not in off:
        model.lm_head.register_forward_hook(
            lambda m, i, out: LOGIT_CAP * torch.tanh(out / LOGIT_CAP))
    return model


def _reference(ck, tokens, *, off=()):
    """The modified transformers Qwen3's logits of a prefill of PROMPT then one cached step per
    further token."""
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.qwen3 import modeling_qwen3

    model = _modified_model(ck, tuple(off))
    attention = (modeling_qwen3.eager_attention_forward if "attn_cap" in off else
                 functools.partial(modeling_gemma2.eager_attention_forward, softcap=ATTN_CAP))
    with pytest.MonkeyPatch.context() as patch:  # Gemma 2's eager attention has the soft-cap
        patch.setattr(modeling_qwen3, "eager_attention_forward", attention)
        return hf_logits(None, np.array([tokens]), np.ones((1, len(tokens)), np.int64),
                         len(PROMPT), model=model)[0, len(PROMPT) - 1:]


@pytest.fixture(scope="session")  # session: kept when other modules run between
def reference(hooked):
    """The reference's greedy path (PROMPT and STEPS tokens) and its logits along it."""
    tokens = list(PROMPT)
    for _ in range(STEPS):
        tokens.append(int(_reference(hooked, tokens)[-1].argmax()))
    return tokens, _reference(hooked, tokens)


def _forced(tokens):
    """The reference's decoded tokens, fed one per step (the last one only closes the run)."""
    return tokens[len(PROMPT):] + tokens[-1:]


def test_every_hook_changes_the_reference(hooked, reference):
    """Each modification matters on this checkpoint and prompt (so a target that dropped one
    would fail the comparisons below)."""
    tokens, logits = reference
    for hook in ("multiplier", "scale", "attn_cap", "logit_cap", "window"):
        assert max_abs_diff(_reference(hooked, tokens, off=(hook,)), logits) > 0.1, hook


def test_cpu_build_matches_the_modified_transformers(hooked, reference, tmp_path):
    tokens, logits = reference
    out = _build(hooked, tmp_path / "cpu")
    run = run_decoder(out, np.array([PROMPT]), steps=STEPS,
                      forced=np.array([tokens[len(PROMPT):]]))
    ours = np.concatenate([run.prefill_logits[0, -1:]] + [s for s in run.step_logits])
    assert max_abs_diff(ours, logits) <= 1e-4


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_qnn_build_matches_the_modified_transformers(precision, hooked, reference, tmp_path):
    """The static pipeline at its defaults (P = 64, C = 512), on onnxruntime's CPU EP."""
    tokens, logits = reference
    out = _build(hooked, tmp_path / "qnn", HookedQwen3, "qnn", precision)
    run = run_pipeline(out, PROMPT, STEPS + 1, forced=_forced(tokens))
    err = max_abs_diff(np.stack(run.step_logits), logits)
    print(f"hooked qwen3 -e qnn -p {precision} (CPU EP) vs transformers: max abs {err:.4f}")
    assert err <= 3e-2
    assert [int(x.argmax()) for x in run.step_logits[:-1]] == tokens[len(PROMPT):]


def test_qnn_build_matches_on_the_htp(hooked, reference, tmp_path):
    pytest.importorskip("onnxruntime_qnn")
    from builder.testing import run_pipeline_on_qnn

    tokens, logits = reference
    out = _build(hooked, tmp_path / "qnn", HookedQwen3, "qnn", "fp16")
    run = run_pipeline_on_qnn(out, PROMPT, STEPS + 1, forced=_forced(tokens))
    err = max_abs_diff(np.stack(run.step_logits), logits)
    print(f"hooked qwen3 -e qnn -p fp16 (HTP simulator) vs transformers: max abs {err:.4f}")
    assert err <= 3e-2


def test_a_method_without_a_static_lowering_is_named(hooked, tmp_path):
    class OwnFrame(HookedQwen3):
        def build(self):
            super().build()

    _build(hooked, tmp_path / "cpu", OwnFrame)  # the single graph takes it
    with pytest.raises(ConfigError, match=r"OwnFrame\.build overrides the single-graph "
                                          r"decoder's frame .* no lowering for -e qnn"):
        _build(hooked, tmp_path / "qnn", OwnFrame, "qnn", "fp16")
    assert not (tmp_path / "qnn").exists()


def test_every_hook_in_a_calibrated_qnn_build(hooked, reference, tmp_path):
    """w8a16 at the defaults: every hook's ops (the final soft-cap inside the calibrated lm_head
    graphs too) are quantized and placed on QNN but the graph-I/O Q/DQ, the model stays the
    modified transformers' on its greedy path, and the accuracy report's fp32 reference has the
    soft-cap too (its KL is small: a reference without it would be another distribution)."""
    from qnn_helpers import only_graph_io_on_cpu, run_on_qnn, graph_feeds

    tokens, logits = reference
    out = _build(hooked, tmp_path / "qnn", HookedQwen3, "qnn", "w8a16")
    only_graph_io_on_cpu(out)
    for graph in ("lm_head_context.onnx", "lm_head_iterator.onnx"):
        run = run_on_qnn(out / graph, graph_feeds(out, graph, np.random.default_rng(0)))
        assert [n.split()[0] for n in run.cpu_nodes] == ["QuantizeLinear", "DequantizeLinear"]
    run = run_pipeline(out, PROMPT, STEPS + 1, forced=_forced(tokens))
    cos = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
           for a, b in zip(run.step_logits, logits)]
    report = json.loads((out / "build_manifest.json").read_text())["accuracy"]
    print(f"hooked qwen3 w8a16 vs transformers: min cosine {min(cos):.5f}; report {report}")
    assert min(cos) >= 0.99
    assert [int(x.argmax()) for x in run.step_logits[:-1]] == tokens[len(PROMPT):]
    assert report["decode"]["mean_kl"] < 0.05 and report["decode"]["mean_cosine"] >= 0.99


def test_a_contrib_op_in_a_static_graph_is_named(hooked, tmp_path):
    """An override written with the single graph's contrib ops (here a FastGelu MLP) cannot be
    what the NPU runs: the node and the target are named."""
    from builder.graph import MS_DOMAIN

    class ContribMlp(HookedQwen3):
        def mlp(self, layer, x):
            h = super().mlp(layer, x)
            return self.gb.node("FastGelu", [h], "mlp/FastGelu", domain=MS_DOMAIN)

    with pytest.raises(ConfigError, match=r"context\.onnx: node /model/layers\.0/mlp/FastGelu "
                                          r"is com\.microsoft FastGelu, which -e qnn graphs "
                                          r"cannot take"):
        _build(hooked, tmp_path / "qnn", ContribMlp, "qnn", "fp16")
    assert not (tmp_path / "qnn").exists()


def test_config_layer_types_window_only_their_layers(tmp_path):
    """A Qwen3 config with use_sliding_window and max_window_layers: transformers writes
    layer_types (full, sliding, sliding) and windows only those layers; both targets agree."""
    ck = make_checkpoint(tmp_path / "ck", "qwen3", use_sliding_window=True, sliding_window=5,
                         max_window_layers=1, max_position_embeddings=1024)
    assert json.loads((ck / "config.json").read_text())["layer_types"] == [
        "full_attention", "sliding_attention", "sliding_attention"]
    cpu = build(BuildOptions(model_name=str(ck), output=tmp_path / "cpu"))
    run = run_decoder(cpu, np.array([PROMPT]), steps=STEPS)
    ref = hf_logits(ck, run.tokens, run.attention_mask, len(PROMPT))[0, len(PROMPT) - 1:]
    ours = np.concatenate([run.prefill_logits[0, -1:]] + [s for s in run.step_logits])
    assert max_abs_diff(ours, ref) <= 1e-4
    every = hf_logits(ck, run.tokens, run.attention_mask, len(PROMPT), model=transformers.
                      Qwen3ForCausalLM.from_pretrained(ck, dtype=torch.float32,
                                                       attn_implementation="eager",
                                                       layer_types=["sliding_attention"] * 3))
    assert max_abs_diff(every[0, len(PROMPT) - 1:], ref) > 0.1  # the full layer matters
    qnn = build(BuildOptions(model_name=str(ck), output=tmp_path / "qnn",
                             execution_provider=ExecutionProvider.QNN))
    tokens = [int(t) for t in run.tokens[0, len(PROMPT):]]
    static = run_pipeline(qnn, PROMPT, STEPS + 1, forced=tokens + tokens[-1:])
    assert max_abs_diff(np.stack(static.step_logits), ref) <= 3e-2
