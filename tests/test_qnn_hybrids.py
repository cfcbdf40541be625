"""-e qnn for the hybrids: LFM2's conv layers and the short convolutions before Qwen3.5's Gated
DeltaNet and Granite 4.0-H's Mamba2 lowered to standard ops (``static_causal_conv``), their
recurrences unrolled token by token (``static_linear_attention``), the windows and states
carried as fp16 buffers the way the KV cache is, at the defaults (P 64, C 512). Against
transformers, the HTP simulator against the CPU EP, onnxruntime-genai through the pipeline, and
the calibrated precisions on trained checkpoints.

The prompts are longer than P, so the last prefill chunk is padded at its end: a state must
stop at the chunk's last real token (the embeddings graph's chunk mask), or the decode steps
after the prompt would differ."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from builder import BuildOptions, build
from builder.runner import graph_runner
from builder.testing import run_on_qnn, run_pipeline, run_pipeline_on_qnn, session
from checkpoints import hf_logits, make_checkpoint
from qnn_helpers import (PROMPTS, against_cpu, along_greedy_path, check_headroom_scales,
                         cosines, genai_sequence, graph_feeds, only_graph_io_on_cpu, qnn_build,
                         recompute_report)

pytest.importorskip("onnxruntime_qnn", reason="the QNN tests need onnxruntime-qnn")

ARCHS = ["lfm2", "qwen3_5", "granitemoehybrid_dense"]
PROMPT = PROMPTS["default"]  # 70 tokens: a full chunk, then 6 real tokens and 58 pads
STEPS = 17


@pytest.fixture(scope="module")
def fp16_built(checkpoints, tmp_path_factory):
    return {arch: qnn_build(checkpoints[arch], tmp_path_factory.mktemp("hybrid") / arch,
                            lengths="default") for arch in ARCHS}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny hybrids trained to clear winners (checkpoints.train_previous_token), with their
    fp32 CPU builds, each made on first use (the tests that use them share one worker: xdist
    group "hybrids_trained")."""
    made = {}

    def get(arch):
        if arch not in made:
            ck = make_checkpoint(tmp_path_factory.mktemp("trained") / arch, arch, trained=True)
            made[arch] = ck, build(BuildOptions(model_name=str(ck), output=ck.parent / "fp32"))
        return made[arch]
    return get


def _with_mask(runner, mask):
    """A graph runner that feeds ``mask(feed)`` as the prefill graphs' chunk mask."""
    def run(filename, feeds):
        if "chunk_mask" in feeds:
            feeds = {**feeds, "chunk_mask": mask(feeds["chunk_mask"])}
        return runner(filename, feeds)
    return run


def test_graphs_and_genai_config(fp16_built):
    """A layer of another kind takes its states (fp16, fixed shapes: LFM2's past.<i>.conv
    [1, hidden, taps - 1]; Qwen3.5's past.<i>.conv and past.<i>.recurrent [1, value heads, dk,
    dv]) instead of a KV cache; the prefill graph also takes the chunk mask, which the
    embeddings graph gives; genai_config.json names the states as the runtime keeps them."""
    folder = fp16_built["lfm2"]
    c = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    assert c["inputs"]["past_conv_names"] == "past.%d.conv"
    assert c["outputs"]["present_conv_names"] == "present.%d.conv"
    assert c["layer_types"] == ["conv", "conv", "full_attention", "conv"]
    stages = {name: spec for stage in c["pipeline"] for name, spec in stage.items()}
    assert stages["embeddings"]["outputs"] == ["inputs_embeds", "chunk_mask"]
    states = ["past.0.conv", "past.1.conv", "past.3.conv"]
    assert stages["context"]["inputs"] == [
        "inputs_embeds", "past_seq_len", "total_seq_len", "past_key_2", "past_value_2", *states,
        "chunk_mask"]
    assert stages["iterator"]["inputs"] == stages["context"]["inputs"][:-1]
    assert stages["iterator"]["outputs"] == [
        "hidden_states", "present_key_2", "present_value_2",
        *(s.replace("past", "present") for s in states)]
    for arch, name, shape in (("lfm2", "past.0.conv", [1, 64, 2]),
                              ("qwen3_5", "past.0.recurrent", [1, 4, 16, 16])):
        for graph in ("context.onnx", "iterator.onnx"):
            inputs = {v.name: v.type.tensor_type for v in onnx.load(
                str(fp16_built[arch] / graph), load_external_data=False).graph.input}
            assert inputs[name].elem_type == onnx.TensorProto.FLOAT16
            assert [d.dim_value for d in inputs[name].shape.dim] == shape
    c = json.loads((fp16_built["qwen3_5"] / "genai_config.json").read_text())["model"]
    assert c["decoder"]["inputs"]["past_recurrent_names"] == "past.%d.recurrent"
    # the manifest counts the attention layer's KV buffers and the conv layers' windows
    manifest = json.loads((fp16_built["lfm2"] / "build_manifest.json").read_text())
    assert manifest["kv_cache"] == {"dtype": "float16", "bytes_per_token": 2 * 2 * 16 * 2,
                                    "context_length": 512, "bytes": 2 * 2 * 16 * 2 * 512,
                                    "attention_layers": 1, "state_bytes": 3 * 64 * 2 * 2}
    transformer = manifest["device_memory"]["parts"][1]
    assert transformer["kv_bytes"] == manifest["kv_cache"]["bytes"]
    assert transformer["state_bytes"] == 3 * 64 * 2 * 2


def test_chunk_mask_counts_tokens_as_the_runtime_does(fp16_built):
    """1 before the chunk's first pad token (pad_token_id 0), 0 from there on: onnxruntime-genai
    takes a chunk's tokens up to its first pad."""
    out = session(fp16_built["lfm2"], "embeddings.onnx").run(
        ["chunk_mask"], {"input_ids": np.array([[5, 9, 0, 7, 0, 0]], np.int64)})[0]
    assert out.tolist() == [[1, 1, 0, 0, 0, 0]]


# fp16 graphs against transformers' fp32 logits (scale about 2.5): measured max abs error
# LFM2 0.0018, Qwen3.5 0.017 (its recurrence in fp16), Granite 4.0-H 0.0015
FP16_ERROR = {"lfm2": 0.01, "qwen3_5": 0.05, "granitemoehybrid_dense": 0.01}


@pytest.mark.parametrize("arch", ARCHS)
def test_pipeline_matches_transformers(arch, fp16_built, checkpoints):
    """The fp16 graphs on the CPU EP against transformers (fp32) over the two-chunk prompt and
    16 decode steps with the states carried; counting the padded chunk's pads into the states
    (a chunk mask of ones) makes the first steps after the prompt wrong."""
    folder = fp16_built[arch]
    run = run_pipeline(folder, PROMPT, STEPS)
    tokens = np.array([PROMPT + run.tokens[:-1]])
    ref = hf_logits(checkpoints[arch], tokens, np.ones_like(tokens), len(PROMPT))[
        0, len(PROMPT) - 1:]
    ours = np.stack(run.step_logits)
    err = float(np.abs(ours - ref).max())
    print(f"{arch} qnn fp16 vs transformers: max abs logit error {err:.5f}")
    assert err <= FP16_ERROR[arch]
    assert [int(x.argmax()) for x in ref] == run.tokens
    pads = run_pipeline(folder, PROMPT, STEPS, forced=run.tokens,
                        runner=_with_mask(graph_runner(folder), np.ones_like))
    assert np.allclose(pads.step_logits[0], run.step_logits[0], atol=1e-3)  # (the prompt's)
    # the first decode steps read the states: off by much more than fp16's error (LFM2
    # measured 1.17 and 0.72 of its logits' scale of 1.6)
    assert all(float(np.abs(pads.step_logits[k] - run.step_logits[k]).max())
               > 10 * FP16_ERROR[arch] for k in (1, 2))


@pytest.mark.parametrize("precision", ["fp16", "w8a16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_htp_runs_the_graphs_whole_and_matches_the_cpu_ep(arch, precision, fp16_built,
                                                          checkpoints, tmp_path):
    """Every node of the prefill and decode graphs on the HTP (w8a16: but the graph-I/O Q/DQ),
    and the HTP simulator against the CPU EP on the same graphs over the prompt and 16 steps."""
    folder = fp16_built[arch] if precision == "fp16" else qnn_build(
        checkpoints[arch], tmp_path / "o", precision, lengths="default")
    if precision == "fp16":
        for graph in ("context.onnx", "iterator.onnx"):
            feeds = graph_feeds(folder, graph, np.random.default_rng(0))
            if "chunk_mask" in feeds:
                feeds["chunk_mask"] = (np.arange(64) < 40)[None].astype(np.float16)
            run = run_on_qnn(folder / graph, feeds)
            assert run.cpu_nodes == [] and set(run.placed) == {"QNNExecutionProvider"}
    else:
        only_graph_io_on_cpu(folder)
    # the convolutions' windows the padded prompt's last chunk hands to the first decode step,
    # selected at its last real token (a one-hot made from the chunk mask): as the CPU EP's to
    # the HTP's arithmetic (w8a16: 0.01-0.49% of the largest; fp16 up to 0.23%), where they
    # were 1.0-2.3% off while the one-hot came from a MatMul, which the HTP computes 1/254 off
    # (Qwen3.5's first decode step then 0.99888 against the CPU EP, 0.99986 now; on the trained
    # LFM2 the states 12-23% off, that step 0.99895 against the fp32 build, 0.99997 now)
    graph, feeds = last_prefill_call(folder)
    on_htp = run_on_qnn(folder / graph, feeds).outputs
    for name, ref in graph_runner(folder)(graph, feeds).items():
        if name.endswith(".conv"):
            ref, got = np.asarray(ref, np.float32), np.asarray(on_htp[name], np.float32)
            off = float(np.abs(got - ref).max() / np.abs(ref).max())
            print(f"{arch} {precision} {name}: HTP off the CPU EP by {off:.2%} of its largest")
            assert off <= 0.01, name
    on_cpu = run_pipeline(folder, PROMPT, STEPS)
    on_qnn = run_pipeline_on_qnn(folder, PROMPT, STEPS, forced=on_cpu.tokens)
    cos = cosines(on_qnn.step_logits, on_cpu.step_logits)
    print(f"{arch} HTP vs CPU EP {precision}: min cosine {min(cos):.6f}")
    assert np.mean(cos) >= 0.9995 and min(cos) >= 0.999


def last_prefill_call(folder):
    """The prefill graph and its feeds at the prompt's last (padded) chunk, as the CPU EP's
    pipeline run gives them."""
    runner, calls = graph_runner(folder), []

    def run(graph, feeds):
        if "chunk_mask" in feeds:
            calls.append((graph, dict(feeds)))
        return runner(graph, feeds)
    run_pipeline(folder, PROMPT, 1, runner=run)
    return calls[-1]


@pytest.mark.parametrize("mode", ["cpu", "qnn"])
@pytest.mark.parametrize("arch", ARCHS)
def test_genai_generates_through_the_pipeline(arch, mode, fp16_built):
    """onnxruntime-genai keeps the states between calls (past_conv_names,
    past_recurrent_names) and feeds the embeddings graph's chunk mask to the prefill graph: the
    ids of our own pipeline run."""
    folder = fp16_built[arch]
    sequence, generated = genai_sequence(folder, mode, prompt=PROMPT)
    assert sequence[:len(PROMPT)] == PROMPT and len(generated) >= 16
    runner = run_pipeline_on_qnn if mode == "qnn" else run_pipeline
    assert generated == runner(folder, PROMPT, len(generated)).tokens


# measured on the HTP simulator against the fp32 CPU build (trained checkpoints, the defaults,
# this module's prompt of random tokens): mean logit cosine (min), top-1 100% in each
#                 fp16               w8a16 rtn          w4a16 rtn          w4a16 gptq
#   LFM2          1.00000 (0.99999)  0.99990 (0.99954)  0.99199 (0.98317)  0.99531 (0.98813)
#   Qwen3.5       1.00000 (0.99999)  0.99994 (0.99984)  0.99212 (0.98047)  0.99447 (0.98916)
#   Granite 4.0-H 0.99999 (0.99998)  0.99995 (0.99984)  0.99309 (0.98853)  0.99456 (0.98796)
# (w8a16 with the headroom_scopes of each; before them LFM2 0.99984 (0.99882), Granite 0.99964
# (0.99472): one token clipped in each); w8a16's default, gptq: LFM2 0.99994 (0.99965), Qwen3.5
# 0.99996 (0.99987), Granite 0.99997 (0.99986)
# and w4a16's default, gptq_mixed: LFM2 0.99709 (0.99332), Qwen3.5 0.99581 (0.99081), Granite
# 0.99587 (0.99273); fp16 is guarded by the HTP-against-CPU-EP and transformers tests above, and
# Granite by those alone (CI time: training the tiny Granite 4.0-H takes 160 s here, its torch
# Mamba2 being slow)
MEAN_COSINE = {("lfm2", "w8a16"): 0.9999, ("qwen3_5", "w8a16"): 0.9999,
               ("qwen3_5", "w4a16"): 0.994}


@pytest.mark.xdist_group("hybrids_trained")
@pytest.mark.parametrize("arch, precision", list(MEAN_COSINE))
def test_accuracy_on_a_trained_checkpoint(arch, precision, trained, tmp_path):
    """On the HTP against the fp32 CPU build along its greedy path: the states are calibrated
    as every other tensor (their ranges from the layer stream, which carries them from call to
    call as the runtime does)."""
    ck, fp32 = trained(arch)
    folder = qnn_build(ck, tmp_path / "o", precision, lengths="default")
    ref, greedy, ours, cos, err, top1 = against_cpu(folder, fp32, STEPS, PROMPT)
    print(f"{arch} trained {precision} on the HTP: mean cosine {np.mean(cos):.5f} (min "
          f"{min(cos):.5f}), top-1 {np.mean(np.array(top1) == greedy):.0%}")
    assert np.mean(cos) >= MEAN_COSINE[arch, precision]
    assert top1 == greedy
    if precision == "w8a16":  # w8a16's target (no step's logits lost to a clipped value)
        assert min(cos) >= 0.999
    if (arch, precision) == ("lfm2", "w8a16"):  # the report, recomputed through whole graphs;
        # its perplexity of English text is 1.4e5 for this model (trained on another task),
        # where the layer stream's and the whole graphs' rounding of a few activations
        # measured 2.3e-4 apart
        recompute_report(folder, ck, qnn_build(ck, tmp_path / "fp32", "fp32",
                                               lengths="default"), arch, 1e-3)


@pytest.mark.xdist_group("hybrids_trained")
def test_gptq_rounds_towards_the_float_layers_outputs(trained, tmp_path):
    """gptq_sequential (on w4a16's default, gptq_mixed): each input of a layer rounded on
    what the layer computes with the projections before it rounded, and towards the float
    layer's outputs (a Gated DeltaNet's out_proj making up for its in_proj's rounding, the MLP
    for both). The report's KL on held-out text against the same build rounding every
    projection from one pass (measured on the trained Qwen3.5: prefill 1.7e-5 against 4.9e-5,
    decode 2.7e-5 against 6.8e-5; LFM2 and Granite 4.0-H 1.6-2.3x lower)."""
    ck, _ = trained("qwen3_5")
    reports = {}
    for sequential in ("true", "false"):
        folder = qnn_build(ck, tmp_path / sequential, "w4a16", f"gptq_sequential={sequential}",
                           lengths="default")
        manifest = json.loads((folder / "build_manifest.json").read_text())
        assert manifest["options"]["extra_options"]["gptq_sequential"] == (sequential == "true")
        reports[sequential] = manifest["accuracy"]
    print("qwen3_5 w4a16 report KL, sequential / at once: " + "; ".join(
        f"{p} {reports['true'][p]['mean_kl']:.3g} / {reports['false'][p]['mean_kl']:.3g}"
        for p in ("prefill", "decode")))
    for phase in ("prefill", "decode"):
        assert reports["true"][phase]["mean_kl"] <= 0.6 * reports["false"][phase]["mean_kl"]


@pytest.mark.xdist_group("hybrids_trained")
def test_coverage_keeps_the_vocabularys_rare_tokens_unclipped(trained, tmp_path):
    """qnn_calibration_coverage (default 256 at w8a16): calibration also prefills the tokens
    whose embeddings reach beyond the calibration text's (the byte-level tokenizer's text holds
    75 of the 256 tokens), and a prompt of random tokens loses no decode step. On the trained
    Qwen3.5 without them, along the fp32 greedy path from this prompt: min step cosine 0.99780
    against 0.99993 (CPU EP; over 8 prompts 0.99780 against 0.99980, Granite 4.0-H 0.98872
    against 0.99975, Llama's in-graph K/V values now kept by the KV cache's headroom)."""
    ck, fp32 = trained("qwen3_5")
    covered = qnn_build(ck, tmp_path / "c", "w8a16", lengths="default")
    text_only = qnn_build(ck, tmp_path / "t", "w8a16", "qnn_calibration_coverage=0",
                          lengths="default")
    prompt = [int(t) for t in np.random.default_rng(107).integers(3, 256, 70)]
    cos = along_greedy_path(fp32, prompt, {"coverage 256": covered, "coverage 0": text_only})
    print("qwen3_5 w8a16 on the CPU EP: " + "; ".join(
        f"{name}: mean cosine {np.mean(c):.5f} (min {min(c):.5f})" for name, c in cos.items()))
    assert min(cos["coverage 256"]) >= 0.999 and np.mean(cos["coverage 256"]) >= 0.9999
    assert min(cos["coverage 256"]) - min(cos["coverage 0"]) >= 0.001
    manifest = json.loads((covered / "build_manifest.json").read_text())
    assert manifest["options"]["extra_options"]["qnn_calibration_coverage"] == 256


@pytest.mark.parametrize("arch", ["lfm2", "granitemoehybrid_dense", "qwen3_5"])
def test_headroom_widens_the_architectures_own_values(arch, checkpoints, tmp_path):
    """qnn_calibration_headroom (2 at w8a16) widens the values under the architecture's
    ``headroom_scopes`` beside the MLP's (LFM2's conv layers, Granite 4.0-H's gated norm,
    Qwen3.5's recurrence), not their bounded ops' (Sigmoid), and no other: against the same
    build with headroom 1."""
    from builder.models.granitemoehybrid import GraniteMoeHybridBuilder
    from builder.models.lfm2 import Lfm2Builder
    from builder.models.qwen3_5 import Qwen3_5Builder

    ck = checkpoints[arch]
    cls = {"lfm2": Lfm2Builder, "granitemoehybrid_dense": GraniteMoeHybridBuilder,
           "qwen3_5": Qwen3_5Builder}[arch]
    own = [s for s in cls.headroom_scopes if s != "/mlp/"]
    assert own
    wide = qnn_build(ck, tmp_path / "wide", "w8a16")
    tight = qnn_build(ck, tmp_path / "tight", "w8a16", "qnn_calibration_headroom=1")
    for graph in ("context.onnx", "iterator.onnx"):
        ratios = check_headroom_scales(wide, tight, graph, cls.headroom_scopes, kv16=True)
        assert any(r == 2 and s in n for n, r in ratios.items() for s in own), (graph, own)


def test_parts_carry_their_own_layers_states(fp16_built, checkpoints, tmp_path):
    """qnn_num_splits=2: each part's graphs take the states of its own layers (and its prefill
    graph the chunk mask where it has such layers); the pipeline computes what the whole one
    does, and onnxruntime-genai runs it."""
    folder = qnn_build(checkpoints["qwen3_5"], tmp_path / "o", "fp16", "qnn_num_splits=2",
                       lengths="default")
    stages = {name: spec for stage in json.loads((folder / "genai_config.json").read_text())[
        "model"]["decoder"]["pipeline"] for name, spec in stage.items()}
    assert [s for s in stages["context_1"]["inputs"] if s.startswith("past.")] == [
        "past.2.conv", "past.2.recurrent"]
    assert "chunk_mask" in stages["context_0"]["inputs"] + stages["context_1"]["inputs"]
    whole = run_pipeline(fp16_built["qwen3_5"], PROMPT, STEPS)
    parts = run_pipeline(folder, PROMPT, STEPS)
    assert parts.tokens == whole.tokens
    assert max(float(np.abs(a - b).max())
               for a, b in zip(parts.step_logits, whole.step_logits)) <= FP16_ERROR["qwen3_5"]
    generated = genai_sequence(folder, "cpu", prompt=PROMPT)[1]
    assert generated == run_pipeline(folder, PROMPT, len(generated)).tokens


@pytest.mark.xdist_group("hybrids_trained")
def test_gptq_rounds_the_layers_own_projections(trained, tmp_path):
    """w4a16's default for a hybrid is gptq_mixed, as for every other model: GPTQ rounds the
    conv layers' in_proj and out_proj as well, and the measurement weighs them with the rest
    (the promoted, whatever their kind, int8 per channel). On the trained LFM2 the build's own
    report (held-out text): gptq against rtn KL 1.3e-4 against 9.2e-4, mean cosine 0.9986
    against 0.9927; the default 9.1e-5 (it promoted layer 3's down and conv out_proj and layer
    2's v)."""
    ck, _ = trained("lfm2")
    folders = {algo: qnn_build(ck, tmp_path / algo, "w4a16", *extra, lengths="default")
               for algo, extra in (("default", ()), ("gptq", ("int4_algo_config=gptq",)),
                                   ("rtn", ("int4_algo_config=rtn",)))}
    manifests = {algo: json.loads((f / "build_manifest.json").read_text())
                 for algo, f in folders.items()}
    assert manifests["default"]["options"]["extra_options"]["int4_algo_config"] == "default"
    report = {algo: m["accuracy"]["prefill"] for algo, m in manifests.items()}
    print(f"lfm2 w4a16 report: default {report['default']}, gptq {report['gptq']}, rtn "
          f"{report['rtn']}")
    assert report["gptq"]["mean_kl"] <= 0.5 * report["rtn"]["mean_kl"]
    assert report["gptq"]["mean_cosine"] > report["rtn"]["mean_cosine"]
    assert report["default"]["mean_kl"] <= report["gptq"]["mean_kl"]
    # the conv layers' projections are among the rounded weights: their codes differ from
    # rounding to nearest (a weight the rounding left alone would be rtn's, code for code)
    from onnx import numpy_helper

    def initializers(folder):
        return {t.name: t for t in onnx.load(str(folder / "context.onnx")).graph.initializer
                if t.name.endswith("proj.weight_quantized") or ".feed_forward.w" in t.name}

    gptq, rtn = ({n: numpy_helper.to_array(t) for n, t in initializers(folders[a]).items()
                  if "conv.in_proj" in n or "conv.out_proj" in n} for a in ("gptq", "rtn"))
    quantized = [n for n in gptq if n.endswith("_quantized")]
    assert len(quantized) == 2 * 3  # in_proj and out_proj of the 3 conv layers
    assert all(not np.array_equal(gptq[n], rtn[n]) for n in quantized)
    # the default's measurement covers every projection of every layer kind
    mixed = manifests["default"]["mixed_precision"]
    names = {"conv_in": "conv.in_proj", "conv_out": "conv.out_proj", "q": "self_attn.q_proj",
             "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
             "gate": "feed_forward.w1", "up": "feed_forward.w3", "down": "feed_forward.w2"}
    assert {p["weight"] for p in mixed["projections"]} == set(names)
    promoted = {f"model.layers.{p['layer']}.{names[p['weight']]}.weight_quantized"
                for p in mixed["promoted"]}
    kinds = {n: t.data_type for n, t in initializers(folders["default"]).items()
             if n.endswith("_quantized")}
    assert promoted and len(kinds) == 3 * 5 + 7
    assert {n for n, k in kinds.items() if k == onnx.TensorProto.INT8} == promoted
    assert all(k == onnx.TensorProto.INT4 for n, k in kinds.items() if n not in promoted)


def test_which_weight_methods_take_a_hybrid(checkpoints):
    """Round-to-nearest methods take every projection alike; gptq and the measured *_mixed
    know a hybrid's own projections; awq, which scales attention and MLP ones, refuses it
    (so w8a16's default stays rtn, and w4a16's is gptq_mixed, as for every other model)."""
    from builder.models.lfm2 import Lfm2Builder
    from builder.quant.rounding import hybrid_problem

    config = Lfm2Builder.config_class.from_file(checkpoints["lfm2"] / "config.json",
                                                Lfm2Builder.config_defaults,
                                                Lfm2Builder.config_aliases)
    for method in ("rtn", "k_quant", "gptq", "gptq_last", "rtn_mixed", "gptq_mixed"):
        assert hybrid_problem(Lfm2Builder, config, method) is None, method
    for method in ("awq", "awq_gptq"):
        assert "this model has conv layers" in hybrid_problem(Lfm2Builder, config, method)
    # Granite 4.0-H: its MoE template's experts where it has them, else a shared MLP alone
    from builder.models.granitemoehybrid import GraniteMoeHybridBuilder as Granite

    for name, refused in (("granitemoehybrid_dense", False), ("granitemoehybrid", True)):
        config = Granite.config_class.from_file(checkpoints[name] / "config.json",
                                                Granite.config_defaults, Granite.config_aliases)
        problem = hybrid_problem(Granite, config, "gptq_mixed")
        assert (problem is not None and "experts" in problem) == refused, (name, problem)
