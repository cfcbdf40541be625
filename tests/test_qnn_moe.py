"""-e qnn for mixtures of experts: the routed experts as dense standard ops (every expert on
every token, weighted by the routing weight onnxruntime's MoE gives it: ``ops.moe.dense_experts``)
and GPT-OSS's attention sinks as one more column of the decomposed softmax. Against transformers
on the CPU EP, the HTP simulator against the CPU EP, and onnxruntime-genai through the
pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from builder.testing import run_on_qnn, run_pipeline, run_pipeline_on_qnn
from checkpoints import hf_logits
from qnn_helpers import PROMPTS, cosines, genai_sequence, graph_feeds, qnn_build

pytest.importorskip("onnxruntime_qnn", reason="the QNN tests need onnxruntime-qnn")

# Qwen3-MoE (a dense layer; top 2 renormalized), every other layer sparse and top 3 not
# renormalized, Mixtral, OLMoE, Granite MoE, Qwen3.5-MoE (a shared expert, linear attention),
# Granite 4.0-H with experts (Mamba2), GPT-OSS (sinks, biased router and experts, the clamped
# SwiGLU, sliding windows)
ARCHS = ["qwen3_moe", "qwen3_moe_step2", "mixtral", "olmoe", "granitemoe", "qwen3_5_moe",
         "granitemoehybrid", "gpt_oss"]
PROMPT = PROMPTS["small"]  # 13 tokens: two chunks of P = 8
STEPS = 6


@pytest.fixture(scope="module")
def fp16_built(checkpoints, tmp_path_factory):
    built = {}

    def get(arch):
        if arch not in built:
            built[arch] = qnn_build(checkpoints[arch], tmp_path_factory.mktemp("moe") / arch)
        return built[arch]
    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_pipeline_matches_transformers(arch, fp16_built, checkpoints):
    """The fp16 graphs on the CPU EP against transformers (fp32): prompt and decode steps."""
    folder = fp16_built(arch)
    run = run_pipeline(folder, PROMPT, STEPS)
    tokens = np.array([PROMPT + run.tokens[:-1]])
    ref = hf_logits(checkpoints[arch], tokens, np.ones_like(tokens), len(PROMPT))[
        0, len(PROMPT) - 1:]
    err = float(np.abs(np.stack(run.step_logits) - ref).max())
    print(f"{arch} qnn fp16 vs transformers: max abs logit error {err:.5f}")
    assert err <= 2e-2  # (fp16: measured 4e-4 to 1.4e-2, logits of scale 1.3-2.4)
    assert [int(x.argmax()) for x in ref] == run.tokens


def test_routing_weights_follow_the_kernel(fp16_built, checkpoints, tmp_path):
    """Top-k without renormalization (qwen3_moe_step2, norm_topk_prob false): the cpu graph
    (onnxruntime's MoE, the picked k only) and the static one (every expert, weighted) agree on
    the prompt's last logits."""
    from builder import BuildOptions, build
    from builder.testing import run_decoder

    folder = fp16_built("qwen3_moe_step2")
    cpu = build(BuildOptions(model_name=str(checkpoints["qwen3_moe_step2"]),
                             output=tmp_path / "cpu"))
    ids = np.array([PROMPT])
    ours = run_pipeline(folder, PROMPT, 1).step_logits[0]
    theirs = run_decoder(cpu, ids, steps=0).prefill_logits[0, -1]
    assert float(np.abs(ours - theirs).max()) <= 1e-2
    config = json.loads((checkpoints["qwen3_moe_step2"] / "config.json").read_text())
    assert config["norm_topk_prob"] is False


@pytest.mark.parametrize("arch, precision, lengths", [
    ("qwen3_moe", "fp16", "default"), ("gpt_oss", "fp16", "small")])
def test_htp_runs_the_graphs_whole_and_matches_the_cpu_ep(arch, precision, lengths,
                                                          fp16_built, checkpoints, tmp_path):
    """Every node of the prefill and decode graphs on the HTP, TopK, the routing mask and the
    sinks' column included; the HTP simulator against the CPU EP on the same graphs over the
    prompt and the decode steps (Qwen3-MoE at the defaults, P 64 and C 512)."""
    folder = fp16_built(arch) if (precision, lengths) == ("fp16", "small") else qnn_build(
        checkpoints[arch], tmp_path / "o", precision, lengths=lengths)
    for graph in ("context.onnx", "iterator.onnx"):
        run = run_on_qnn(folder / graph, graph_feeds(folder, graph, np.random.default_rng(0)))
        assert run.cpu_nodes == [] and set(run.placed) == {"QNNExecutionProvider"}
    prompt = PROMPTS[lengths]
    on_cpu = run_pipeline(folder, prompt, STEPS)
    on_qnn = run_pipeline_on_qnn(folder, prompt, STEPS, forced=on_cpu.tokens)
    cos = cosines(on_qnn.step_logits, on_cpu.step_logits)
    print(f"{arch} HTP vs CPU EP {precision}: min cosine {min(cos):.6f}")
    assert min(cos) >= 0.999


def test_genai_generates_through_the_pipeline(fp16_built):
    """onnxruntime-genai through GPT-OSS's pipeline (sinks, experts) on the CPU EP: the ids of
    our own pipeline run."""
    folder = fp16_built("gpt_oss")
    sequence, generated = genai_sequence(folder, "cpu", prompt=PROMPT)
    assert sequence[:len(PROMPT)] == PROMPT and len(generated) >= 8
    assert generated == run_pipeline(folder, PROMPT, len(generated)).tokens


@pytest.mark.parametrize("precision", ["w8a16", "w4a16"])
def test_quantized_experts_are_refused(precision, checkpoints, tmp_path):
    """The routing on quantized activations flips experts (measured: a trained tiny Qwen3-MoE
    at w8a16 0.964 mean logit cosine against fp32, top-1 88%; the HTP against the CPU EP
    0.990, GPT-OSS 0.745): refused by name, nothing written."""
    from builder.errors import BuilderError

    with pytest.raises(BuilderError, match=f"mixture of experts\\) on -e qnn -p {precision}: "
                                           "the routing runs on quantized activations"):
        qnn_build(checkpoints["qwen3_moe"], tmp_path / "o", precision)
    assert not (tmp_path / "o").exists()
