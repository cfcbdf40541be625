"""-e qnn: static pipelines on the QNN HTP backend (simulated on x86 by onnxruntime-qnn).

QNN sessions run in subprocesses (a simulator crash would kill pytest) with disable_fallback(),
so a graph that fails on QNN fails here instead of silently rerunning on CPU.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from builder import BuildOptions, ExtraOptions, build
from builder.errors import OptionError
from builder.options import ExecutionProvider, Precision
from builder.testing import run_decoder, run_on_qnn, run_pipeline, run_pipeline_on_qnn, session
from checkpoints import make_checkpoint, plant_outlier
from conftest import run_cli
from qnn_helpers import (ARCHS, C, DEFAULT_P, LENGTHS, P, PROMPT, PROMPTS, activation_scales,
                         along_greedy_path, check_headroom_scales, genai, genai_sequence,
                         graph_feeds, one_data_file_without_dead_bytes,
                         only_graph_io_on_cpu, own_data, qnn_build, recompute_report)
from qnn_helpers import against_cpu as _against_cpu
from qnn_helpers import cosines as _cosines

pytest.importorskip("onnxruntime_qnn", reason="the QNN tests need onnxruntime-qnn")
@pytest.fixture(scope="session")  # session: kept when other modules run between
def qnn_built(checkpoints, tmp_path_factory):
    return {(lengths, arch): qnn_build(checkpoints[arch],
                                        tmp_path_factory.mktemp("qnn") / arch, lengths=lengths)
            for lengths in LENGTHS for arch in ARCHS}


def test_default_lengths_are_p64_and_c_up_to_2048(qnn_built):
    """P 64; C 2048, or max_position_embeddings when smaller: the tests' checkpoints have 512
    (the mission command's test builds one with 4096: C 2048)."""
    genai = json.loads((qnn_built["default", "qwen3"] / "genai_config.json").read_text())
    assert genai["model"]["context_length"] == 512
    assert genai["model"]["decoder"]["sliding_window"]["window_size"] == DEFAULT_P == 64
    manifest = json.loads((qnn_built["default", "qwen3"] / "build_manifest.json").read_text())
    assert manifest["options"]["extra_options"]["qnn_context_length"] == 512


def test_context_follows_a_shorter_max_position_embeddings(tmp_path):
    """The shipped example (max_position_embeddings 256): C defaults to 256, logged."""
    r = run_cli("-m", "examples/tiny-qwen3", "-o", str(tmp_path / "o"), "-e", "qnn")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "qnn_context_length not given: 256 (the model's max_position_embeddings" in r.stderr
    assert json.loads((tmp_path / "o" / "genai_config.json").read_text())["model"][
        "context_length"] == 256


@pytest.mark.parametrize("options, message", [
    (["qnn_context_length=1024"], "qnn_context_length=1024 exceeds the model's "
                                  "max_position_embeddings=256: set qnn_context_length to at "
                                  "most 256"),
    (["qnn_prefill_length=256"], "qnn_prefill_length=256 leaves no room in the context: the "
                                 "model's max_position_embeddings is 256, so set "
                                 "qnn_prefill_length below 256"),
    (["qnn_prefill_length=128", "qnn_context_length=100"],
     "qnn_context_length=100 must be larger than qnn_prefill_length=128: raise "
     "qnn_context_length or lower qnn_prefill_length"),
    (["qnn_calibration_steps=200", "-p", "w8a16"],
     "qnn_calibration_steps=200 does not fit after a prompt's first chunk of 64 in the context "
     "of 256: give at most 192")])
def test_lengths_that_do_not_fit_name_the_option(options, message, tmp_path):
    r = run_cli("-m", "examples/tiny-qwen3", "-o", str(tmp_path / "o"), "-e", "qnn",
                "--extra_options", *options)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("graph", ["context.onnx", "iterator.onnx", "lm_head_context.onnx",
                                   "lm_head_iterator.onnx"])
def test_every_node_placed_on_qnn(arch, graph, lengths, qnn_built):
    folder = qnn_built[lengths, arch]
    run = run_on_qnn(folder / graph, graph_feeds(folder, graph, np.random.default_rng(0)))
    assert run.cpu_nodes == [] and set(run.placed) == {"QNNExecutionProvider"}, run.placed


@pytest.mark.parametrize("precision", ["fp16", "w8a16"])
@pytest.mark.parametrize("arch, prefill", [  # P = 128: qwen3 and mistral's window (CI time)
    (a, p) for a in ("qwen3", "llama", "mistral", "phi3") for p in (8, 64)] + [
    ("qwen3", 128), ("mistral", 128)])
def test_htp_matches_the_cpu_ep_on_the_same_graphs(arch, prefill, precision, checkpoints,
                                                   tmp_path):
    """The HTP simulator against onnxruntime's CPU EP on the very same graphs (C = 512, the
    default), over a two-chunk prefill and 16 steps: whatever the HTP computes differently
    shows here, apart from the model's own accuracy. At P = 64 (the default) Qwen3's keys used
    to be wrong on the HTP (a rank-4 RmsNorm: see DecoderBuilder.head_norm)."""
    folder = qnn_build(checkpoints[arch], tmp_path / "o", precision,
                        f"qnn_prefill_length={prefill}", lengths="default")
    prompt = [int(t) for t in np.random.default_rng(prefill).integers(3, 256, prefill * 3 // 2)]
    on_cpu = run_pipeline(folder, prompt, 17)
    on_qnn = run_pipeline_on_qnn(folder, prompt, 17, forced=on_cpu.tokens)
    cos = _cosines(on_qnn.step_logits, on_cpu.step_logits)
    err = max(float(np.abs(a - b).max()) for a, b in zip(on_qnn.step_logits, on_cpu.step_logits))
    print(f"HTP vs CPU EP {arch} P={prefill} {precision}: min cosine {min(cos):.6f}, max abs "
          f"{err:.4f}")
    assert min(cos) >= 0.999


def _misses_are_near_ties(top1, greedy, ref, err):
    for step, (a, b) in enumerate(zip(top1, greedy)):
        assert a == b or float(ref[step][b] - ref[step][a]) <= 2 * err, (step, a, b, err)


@pytest.mark.parametrize("arch, precision, extra, lengths", [
    (a, "fp16", (), lengths) for a in ARCHS for lengths in LENGTHS] + [
    ("llama", "fp32", (), "default"), ("qwen3", "fp16", ("qnn_linear=conv",), "default")])
def test_qnn_accuracy_against_fp32_cpu_build(arch, precision, extra, lengths, qnn_built, built,
                                             checkpoints, tmp_path):
    """Prefill (two chunks) and 16 decode steps on the HTP against our fp32 CPU decoder. fp32
    graphs run at fp16 precision on the HTP."""
    prompt = PROMPTS[lengths]
    folder = (qnn_built[lengths, arch] if precision == "fp16" and not extra
              else qnn_build(checkpoints[arch], tmp_path / "o", precision, *extra,
                              lengths=lengths))
    if extra:  # every projection really is a Conv, and every node still runs on QNN
        import onnx

        ops = [n.op_type for n in onnx.load(str(folder / "context.onnx"),
                                            load_external_data=False).graph.node]
        assert ops.count("Conv") == 7 * 3 and "MatMul" in ops  # attention's MatMuls remain
        for graph in ("context.onnx", "iterator.onnx"):
            run = run_on_qnn(folder / graph, graph_feeds(folder, graph, np.random.default_rng(0)))
            assert run.cpu_nodes == [] and set(run.placed) == {"QNNExecutionProvider"}
    # Fed the CPU decoder's greedy path, the HTP picks the same token at every step, unless the
    # fp32 reference itself is a near-tie that fp16 error can flip...
    ref, greedy_cpu, _, cos, err, ours = _against_cpu(folder, built[arch], prompt=prompt)
    print(f"{arch} qnn {precision} {extra} {lengths}: greedy {greedy_cpu[:8]}..., min cosine "
          f"{min(cos):.6f}, max abs logit error {err:.4f}, top-1 "
          f"{np.mean(np.array(ours) == greedy_cpu):.0%}")
    assert min(cos) >= 0.999
    _misses_are_near_ties(ours, greedy_cpu, ref, err)
    # ...and, left to itself, the pipeline generates the same ids while no near-tie intervenes.
    _same_greedy_until_a_near_tie(run_pipeline_on_qnn(folder, prompt, 17).tokens,
                                  greedy_cpu, ref, err)


def _same_greedy_until_a_near_tie(ours, greedy_cpu, ref, err):
    first = next((i for i, (a, b) in enumerate(zip(ours, greedy_cpu)) if a != b), None)
    if first is not None:
        top2 = np.sort(ref[first])[-2:]
        assert top2[1] - top2[0] <= 2 * err, (first, ours, greedy_cpu)
    return first


@pytest.mark.parametrize("lengths", LENGTHS)
def test_pipeline_on_cpu_matches_qnn_graph_semantics(lengths, qnn_built, built):
    """The same graphs on onnxruntime's CPU EP: the pipeline's arithmetic is right before the
    HTP is involved (fp16 against fp32)."""
    prompt = PROMPTS[lengths]
    run = run_pipeline(qnn_built[lengths, "qwen3"], prompt, 9)
    cpu = run_decoder(built["qwen3"], np.array([prompt]), steps=8,
                      forced=np.array([run.tokens[:8]]))
    ref = [cpu.prefill_logits[0, -1]] + [s[0] for s in cpu.step_logits]
    assert min(_cosines(run.step_logits, ref)) >= 0.9999


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("mode", ["qnn", "cpu"])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_genai_generates_like_the_cpu_decoder(arch, mode, lengths, qnn_built, built):
    """onnxruntime-genai runs the folder (QNN EP registered, or the CPU EP; the prompt is longer
    than P): exactly the ids of our own pipeline run on that EP, and the CPU decoder build's
    greedy ids up to a near-tie that fp16 may flip."""
    prompt, folder = PROMPTS[lengths], qnn_built[lengths, arch]
    sequence, generated = genai_sequence(folder, mode, prompt=prompt)
    assert sequence[:len(prompt)] == prompt
    assert len(generated) >= 16
    runner = run_pipeline_on_qnn if mode == "qnn" else run_pipeline
    assert generated == runner(folder, prompt, len(generated)).tokens
    cpu = run_decoder(built[arch], np.array([prompt]), steps=len(generated) - 1,
                      forced=np.array([generated[:-1]]))
    ref = [cpu.prefill_logits[0, -1]] + [s_[0] for s_ in cpu.step_logits]
    err = 0.05  # fp16 graphs; the measured error is below 0.02 (test above)
    first = _same_greedy_until_a_near_tie(generated, [int(x.argmax()) for x in ref], ref, err)
    print(f"{arch} genai {mode} {lengths}: {generated[:10]}..., first near-tie flip: {first}")


def test_prompt_longer_than_context_is_refused(qnn_built):
    r = genai(qnn_built["small", "qwen3"], PROMPT * 6, C, "cpu")  # 78 tokens > C = 64
    assert r.returncode != 0
    assert "exceeds max length (64)" in r.stderr


def test_context_not_larger_than_prefill(checkpoints, tmp_path):
    with pytest.raises(OptionError, match="qnn_context_length=8 must be larger than "
                                          "qnn_prefill_length=8"):
        build(BuildOptions(model_name=str(checkpoints["qwen3"]), output=tmp_path / "o",
                           execution_provider=ExecutionProvider.QNN,
                           precision=Precision.FP16,
                           extra=ExtraOptions.parse(["qnn_prefill_length=8",
                                                     "qnn_context_length=8"])))
    assert not (tmp_path / "o").exists()


def test_unknown_qnn_option(tmp_path, checkpoints):
    r = run_cli("-m", str(checkpoints["qwen3"]), "-o", str(tmp_path / "o"), "-e", "qnn",
                "--extra_options", "qnn_prefil_length=8")
    assert r.returncode == 2 and "did you mean 'qnn_prefill_length'" in r.stderr


@pytest.mark.parametrize("lengths", LENGTHS)
def test_epcontext_folder_gives_the_same_tokens(lengths, checkpoints, qnn_built, tmp_path):
    out = qnn_build(checkpoints["qwen3"], tmp_path / "ctx", "fp16", "qnn_epcontext=true",
                     lengths=lengths)
    stages = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["pipeline"]
    files = [spec["filename"] for stage in stages for spec in stage.values()]
    assert files == ["embeddings.onnx", "context_ctx.onnx", "iterator_ctx.onnx",
                     "lm_head_context_ctx.onnx", "lm_head_iterator_ctx.onnx"]
    import onnx

    ctx = onnx.load(str(out / "context_ctx.onnx"))
    assert [n.op_type for n in ctx.graph.node] == ["EPContext"]
    compiled = genai_sequence(out, prompt=PROMPTS[lengths])
    assert compiled == genai_sequence(qnn_built[lengths, "qwen3"], prompt=PROMPTS[lengths])


@pytest.mark.xdist_group("trained")
@pytest.mark.parametrize("lengths", ["default"])  # compiling is length-blind; CI time
def test_epcontext_of_a_quantized_folder(lengths, trained, tmp_path):
    """qnn_epcontext=true with calibration: the contexts are compiled from the calibrated QDQ
    graphs (graph-I/O Quantize/Dequantize left around each EPContext node, on the CPU), and
    onnxruntime-genai generates from them what the uncompiled QDQ graphs give on QNN."""
    import onnx

    ck, _ = trained["qwen3"]
    out = qnn_build(ck, tmp_path / "ctx", "w4a16", "shared_embeddings=true",
                     "qnn_epcontext=true", lengths=lengths)
    for graph in ("context_ctx.onnx", "iterator_ctx.onnx", "lm_head_context_ctx.onnx",
                  "lm_head_iterator_ctx.onnx"):
        ops = [n.op_type for n in onnx.load(str(out / graph)).graph.node]
        assert ops.count("EPContext") == 1 and "QuantizeLinear" in ops, ops
        assert set(ops) == {"EPContext", "QuantizeLinear", "DequantizeLinear"}, ops
    prompt = PROMPTS[lengths]
    generated = genai_sequence(out, prompt=prompt)[1]
    assert len(generated) >= 16
    assert generated == run_pipeline_on_qnn(out, prompt, len(generated)).tokens


def test_weight_shared_contexts(tmp_path):
    """qnn_weight_sharing=true: each part's prefill and decode graphs (and lm_head's two) are
    compiled into one context binary that both EPContext models reference, holding the weights
    once: about half the bytes of a context per graph. (Not run: the x86 HTP simulator crashes
    loading any context of two graphs; README.)"""
    import onnx

    ck = make_checkpoint(tmp_path / "ck", "qwen3", hidden_size=256, intermediate_size=2048,
                         head_dim=64)  # (weights a tiny model's graph overhead does not hide)
    sizes = {}
    for sharing in ("true", "false"):
        out = qnn_build(ck, tmp_path / sharing, "w4a16", "qnn_num_splits=2",
                        "qnn_epcontext=true", f"qnn_weight_sharing={sharing}")
        stages = json.loads((out / "genai_config.json").read_text())["model"]["decoder"][
            "pipeline"]
        files = [spec["filename"] for stage in stages for spec in stage.values()]
        assert files[1:] == ["context_0_ctx.onnx", "iterator_0_ctx.onnx", "context_1_ctx.onnx",
                             "iterator_1_ctx.onnx", "lm_head_context_ctx.onnx",
                             "lm_head_iterator_ctx.onnx"]
        bins = sorted(p.name for p in out.glob("*.bin"))
        if sharing == "false":
            assert bins == []  # (embedded in each EPContext node)
            sizes[sharing] = sum((out / f).stat().st_size for f in files[1:])
            continue
        assert bins == ["context_0_ctx_qnn.bin", "context_1_ctx_qnn.bin",
                        "lm_head_context_ctx_qnn.bin"]
        for first, second in zip(files[1::2], files[2::2]):
            nodes = [n for f in (first, second) for n in onnx.load(str(out / f)).graph.node
                     if n.op_type == "EPContext"]
            attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                     for n in nodes]
            assert [a["ep_cache_context"] for a in attrs] == [
                first.replace(".onnx", "_qnn.bin").encode()] * 2
            assert all(a["embed_mode"] == 0 for a in attrs)
        outputs = json.loads((out / "build_manifest.json").read_text())["outputs"]
        assert set(bins) <= {o["name"] for o in outputs}
        sizes[sharing] = sum((out / b).stat().st_size for b in bins)
    print(f"context binaries: shared {sizes['true']} bytes, one per graph {sizes['false']}")
    assert sizes["true"] <= 0.6 * sizes["false"]


def test_shared_embeddings_on_qnn_needs_a_quantized_tied_build(checkpoints, tmp_path):
    for ck, precision, message in (("qwen3", "fp16", "use -p w8a16 or w4a16"),
                                   ("llama", "w8a16", "tie_word_embeddings=false")):
        r = run_cli("-m", str(checkpoints[ck]), "-o", str(tmp_path / "o"), "-e", "qnn",
                    "-p", precision, "--extra_options", "shared_embeddings=true",
                    f"qnn_prefill_length={P}", f"qnn_context_length={C}")
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("lengths", ["default"])
def test_mission_command(lengths, tmp_path):
    """python -m builder -m <Qwen3> -p int4 -e qnn --extra_options shared_embeddings=true
    (exactly, at "default": C 2048): a calibrated w4a16 pipeline whose lookup and lm_head read
    one int8 table, stored once, and which onnxruntime-genai runs with the QNN EP."""
    import onnx

    out = tmp_path / "qwen3-qnn"
    given = [f"qnn_prefill_length={P}", f"qnn_context_length={C}"] if lengths == "small" else []
    # max_position_embeddings 4096 (Qwen3-0.6B's is 40960): C is the default 2048
    ck = make_checkpoint(tmp_path / "qwen3", "qwen3", shard=True, max_position_embeddings=4096)
    r = run_cli("-m", str(ck), "-o", str(out), "-p", "int4", "-e", "qnn",
                "--extra_options", "shared_embeddings=true", *given)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "qnn_context_length not given: 2048 (the default)" in r.stderr
    assert re.search(r"calibration \(minmax\): \d+ layers, one at a time; prefill graph on",
                     r.stderr)
    manifest = json.loads((out / "build_manifest.json").read_text())
    assert manifest["kv_cache"]["dtype"] == "uint8"  # (genai below runs the uint8 KV cache)
    assert manifest["kv_cache"]["context_length"] == 2048
    assert json.loads((out / "genai_config.json").read_text())["model"]["context_length"] == 2048
    assert manifest["options"]["extra_options"]["qnn_int4_format"] == "lpbq"
    tables = {}
    for graph in ("embeddings.onnx", "lm_head_context.onnx", "lm_head_iterator.onnx"):
        m = onnx.load(str(out / graph), load_external_data=False)
        big = {t.name: t for t in m.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL}
        assert set(big) <= {"model.embed_tokens.weight_int8", "model.embed_tokens.weight_scale"}
        table = big["model.embed_tokens.weight_int8"]
        assert table.data_type == onnx.TensorProto.INT8 and list(table.dims) == [64, 256]
        tables[graph] = {e.key: e.value for e in table.external_data}
    assert len({(t["location"], t["offset"]) for t in tables.values()}) == 1  # stored once
    one_data_file_without_dead_bytes(out)
    only_graph_io_on_cpu(out)  # the prefill and decode graphs at C 2048: whole on the HTP
    for graph in ("lm_head_context.onnx", "lm_head_iterator.onnx"):
        run = run_on_qnn(out / graph, graph_feeds(out, graph, np.random.default_rng(0)))
        assert run.cpu_nodes == ["QuantizeLinear (hidden_states/Q)",
                                 "DequantizeLinear (logits/DQ)"], run.cpu_nodes
    prompt = PROMPTS[lengths]
    generated = genai_sequence(out, prompt=prompt)[1]
    assert len(generated) >= 16
    assert generated == run_pipeline_on_qnn(out, prompt, len(generated)).tokens


@pytest.fixture(scope="session")  # session: kept when other modules run between
def w8a16_built(trained, tmp_path_factory):
    return {(lengths, arch): qnn_build(ck, tmp_path_factory.mktemp("w8a16") / arch, "w8a16",
                                        lengths=lengths)
            for lengths in LENGTHS for arch, (ck, _) in trained.items()}


@pytest.mark.xdist_group("trained")
@pytest.mark.parametrize("arch", ["qwen3", "phi3"])  # tied (embedding table) and untied lm_head
def test_accuracy_report_matches_an_independent_computation(arch, w8a16_built, trained,
                                                            tmp_path):
    """The w8a16 folder's accuracy report against an independent computation through whole
    graphs (``recompute_report``)."""
    folder = w8a16_built["default", arch]
    ck = trained[arch][0]
    recompute_report(folder, ck, qnn_build(ck, tmp_path / "fp32", "fp32", lengths="default"),
                     arch)


def test_accuracy_metrics_against_torch():
    """The report's cosine, top-1 and KL on random logits, against torch's own functions."""
    import torch

    from builder.quant.report import compare

    rng = np.random.default_rng(5)
    e = rng.normal(0, 4, (12, 300)).astype(np.float32)
    a = (e + rng.normal(0, 1.5, e.shape)).astype(np.float32)
    got = compare(e, a)
    te, ta = torch.tensor(e, dtype=torch.float64), torch.tensor(a, dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(te, ta, dim=-1)
    kl = torch.nn.functional.kl_div(torch.log_softmax(ta, -1), torch.log_softmax(te, -1),
                                    log_target=True, reduction="none").sum(-1)
    assert got["positions"] == 12
    assert got["mean_cosine"] == pytest.approx(cos.mean().item(), abs=1e-12)
    assert got["min_cosine"] == pytest.approx(cos.min().item(), abs=1e-12)
    assert got["mean_kl"] == pytest.approx(kl.mean().item(), rel=1e-9)
    assert got["max_kl"] == pytest.approx(kl.max().item(), rel=1e-9)
    assert got["top1_agreement"] == (te.argmax(-1) == ta.argmax(-1)).double().mean().item()
    assert 0 < got["top1_agreement"] < 1 and got["mean_kl"] > 0.01  # a test that can fail
    targets = rng.integers(0, 300, 12)
    with_targets = compare(e, a, targets)
    # the report's own computation, a slice of the vocabulary at a time, agrees with compare()
    from builder.quant.report import Agreement

    many = rng.normal(0, 4, (300, 300))  # more positions than the report's ROWS at a time
    e2, a2, t2 = many, many + rng.normal(0, 1.5, many.shape), rng.integers(0, 300, 300)
    agreement = Agreement(t2, len(e2))
    for start in range(0, 300, 64):
        agreement.update(range(start, min(300, start + 64)), e2[:, start:start + 64],
                         a2[:, start:start + 64])
    for where in (slice(None), slice(0, 5), slice(130, 300)):
        want = compare(e2[where], a2[where], t2[where])
        for key, value in agreement.result(where).items():
            assert value == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    ce = {name: torch.nn.functional.cross_entropy(x, torch.tensor(targets)).item()
          for name, x in (("float", te), ("quantized", ta))}
    assert with_targets["float_perplexity"] == pytest.approx(np.exp(ce["float"]), rel=1e-9)
    assert with_targets["perplexity"] == pytest.approx(np.exp(ce["quantized"]), rel=1e-9)
    assert with_targets["perplexity_change"] == pytest.approx(
        np.exp(ce["quantized"] - ce["float"]) - 1, rel=1e-6)


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.xdist_group("trained")
@pytest.mark.parametrize("arch", ARCHS)
def test_w8a16_placement_and_accuracy(arch, lengths, w8a16_built, trained):
    """Calibrated w8a16 (uint16 activations, 8-bit per-channel weights) on the HTP, against the
    fp32 CPU build over a two-chunk prefill and 16 decode steps on the CPU's greedy path, on a
    checkpoint whose logits have clear winners."""
    folder = w8a16_built[lengths, arch]
    only_graph_io_on_cpu(folder)
    one_data_file_without_dead_bytes(folder)
    ref, greedy, _, cos, err, ours = _against_cpu(folder, trained[arch][1],
                                                  prompt=PROMPTS[lengths])
    top1 = float(np.mean(np.array(ours) == greedy))
    print(f"{arch} w8a16 {lengths} on QNN: mean cosine {np.mean(cos):.5f} (min {min(cos):.5f}), top-1 "
          f"{top1:.0%}, max abs logit error {err:.3f}")
    # at the defaults, w8a16's targets (measured with its default, gptq: mean 0.99997-0.99999,
    # min 0.99959-0.99999; with rtn 0.99993-0.99998, 0.99954-0.99998);
    # at P 8, C 64 Phi-3 measured 0.99964 (min 0.99770)
    mean_target, min_target = (0.9999, 0.999) if lengths == "default" else (0.9995, 0.997)
    assert np.mean(cos) >= mean_target and min(cos) >= min_target
    assert top1 >= 0.95


@pytest.mark.xdist_group("trained")
@pytest.mark.parametrize("lengths", LENGTHS)
def test_w8a16_generates_through_genai_with_qnn(lengths, w8a16_built):
    prompt, folder = PROMPTS[lengths], w8a16_built[lengths, "qwen3"]
    generated = genai_sequence(folder, prompt=prompt)[1]
    assert generated == run_pipeline_on_qnn(folder, prompt, len(generated)).tokens


@pytest.mark.xdist_group("trained")
@pytest.mark.parametrize("lengths", ["default"])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_trajectory_calibration_beats_empty_cache(arch, lengths, trained, w8a16_built, tmp_path,
                                                  monkeypatch):
    """Calibrating the decode graph on an empty KV cache (the naive method) against calibrating
    it on real text with the sequence's own, growing cache (ours): same prompts, same prefill
    calibration, same quantizer, each graph on its own ranges (the shipped builds also give a
    tensor both graphs compute the union of both graphs' ranges, which covers what the empty
    cache misses: both then measure 0.99997); judged on the decode steps of the QDQ graphs (CPU
    EP) against the fp32 build, and the shipped build (the union) no worse."""
    import builder.folders
    from builder.folders import PipelineFolder

    ck, fp32 = trained[arch]
    monkeypatch.setattr(builder.folders, "unite_phases", lambda ranges: None)
    ours = qnn_build(ck, tmp_path / "trajectory", "w8a16", lengths=lengths)
    monkeypatch.setattr(PipelineFolder, "empty_cache", True)
    # (a build calibrated this way is broken: its own report would stop it)
    naive = qnn_build(ck, tmp_path / "empty_cache", "w8a16", "quant_accuracy_check=false",
                      lengths=lengths)
    prompt = PROMPTS[lengths]
    cpu = run_decoder(fp32, np.array([prompt]), steps=16)
    ref = [cpu.prefill_logits[0, -1]] + [s[0] for s in cpu.step_logits]
    greedy = [int(r.argmax()) for r in ref]
    scores, top1 = {}, {}
    for mode, out in (("trajectory", ours), ("empty_cache", naive),
                      ("shipped", w8a16_built[lengths, arch])):
        run = run_pipeline(out, prompt, 17, forced=greedy)
        scores[mode] = float(np.mean(_cosines(run.step_logits[1:], ref[1:])))
        top1[mode] = float(np.mean([int(x.argmax()) == g
                                    for x, g in zip(run.step_logits[1:], greedy[1:])]))
    print(f"{arch} {lengths}: decode cosine (top-1), trajectory {scores['trajectory']:.4f} "
          f"({top1['trajectory']:.0%}) vs empty cache {scores['empty_cache']:.4f} "
          f"({top1['empty_cache']:.0%})")
    assert scores["trajectory"] >= 0.99
    assert scores["trajectory"] - scores["empty_cache"] >= W8A16_EMPTY_CACHE_GAP[arch]
    assert scores["shipped"] >= scores["trajectory"] - 1e-5


# measured (HTP, trained checkpoints): see the closing notes; guarded with a margin (decode
# cosine gap 0.748 and 0.949). w4a16 at the defaults (LPBQ, uint8 KV): mean cosine 0.99517,
# 0.99909, 0.99827; qwen3's guard is the target, 0.995; conv (per-channel) 0.9950
W8A16_EMPTY_CACHE_GAP = {"qwen3": 0.5, "llama": 0.5}
W4A16_MEAN_COSINE = {("qwen3", "matmul"): 0.995, ("llama", "matmul"): 0.998,
                     ("phi3", "matmul"): 0.997, ("qwen3", "conv"): 0.985}


@pytest.mark.xdist_group("trained")
@pytest.mark.parametrize("arch, linear, lengths", [  # the defaults only (CI time); the small
    (a, "matmul", "default") for a in ARCHS] + [("qwen3", "conv", "default")])  # P: HTP matrix
def test_w4a16_placement_and_accuracy(arch, linear, lengths, trained, tmp_path):
    """w4a16: int4 weights block-wise (along the input dimension) on MatMul, or per-channel on
    1x1 Conv (per-channel int4 on MatMul is wrong on the HTP), but the projections the default
    (rtn_mixed) promoted, int8 per channel; uint16 activations; all on QNN but the graph-I/O
    Q/DQ. Against the fp32 CPU build, guarded at the measured level minus a margin."""
    import onnx

    ck, fp32 = trained[arch]
    folder = qnn_build(ck, tmp_path / "o", "w4a16", f"qnn_linear={linear}", lengths=lengths)
    scope = {"gate": "mlp", "up": "mlp", "down": "mlp"}
    promoted = {f"model.layers.{p['layer']}.{scope.get(p['weight'], 'self_attn')}."
                f"{p['weight']}_proj.weight_quantized" for p in json.loads(
                    (folder / "build_manifest.json").read_text())["mixed_precision"]["promoted"]}
    assert promoted
    m = onnx.load(str(folder / "iterator.onnx"), load_external_data=False)
    producers = {n.output[0]: n for n in m.graph.node}
    inits = {i.name: i for i in m.graph.initializer}
    weights = [producers[n.input[1]] for n in m.graph.node
               if n.op_type == ("MatMul" if linear == "matmul" else "Conv")
               and n.input[1] in producers and producers[n.input[1]].input[0] in inits]
    assert len(weights) >= 7 * 2  # every projection of every layer
    for dq in weights:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        if dq.input[0] in promoted:
            assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8
            assert attrs.get("block_size") is None, attrs
            continue
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT4
        assert attrs.get("block_size") == (32 if linear == "matmul" else None), attrs
    assert {dq.input[0] for dq in weights} >= promoted
    only_graph_io_on_cpu(folder)
    prompt = PROMPTS[lengths]
    cpu = run_decoder(fp32, np.array([prompt]), steps=16)
    ref = [cpu.prefill_logits[0, -1]] + [s[0] for s in cpu.step_logits]
    greedy = [int(r.argmax()) for r in ref]
    on_qnn = run_pipeline_on_qnn(folder, prompt, 17, forced=greedy)
    on_cpu = run_pipeline(folder, prompt, 17, forced=greedy)  # the same QDQ graphs on the CPU EP
    cos = _cosines(on_qnn.step_logits, ref)
    top1 = float(np.mean([int(x.argmax()) == g for x, g in zip(on_qnn.step_logits, greedy)]))
    print(f"{arch} w4a16 ({linear}) {lengths} on QNN: mean cosine {np.mean(cos):.4f} (min "
          f"{min(cos):.4f}), top-1 {top1:.0%}; QNN vs CPU EP on the same graphs: min cosine "
          f"{min(_cosines(on_qnn.step_logits, on_cpu.step_logits)):.5f}")
    assert np.mean(cos) >= W4A16_MEAN_COSINE[arch, linear]
    assert top1 >= 0.95
    assert min(_cosines(on_qnn.step_logits, on_cpu.step_logits)) >= 0.99


@pytest.mark.parametrize("form", ["lpbq", "float_block"])
def test_w4a16_weights_reach_the_htp_as_lpbq(form, checkpoints, tmp_path):
    """At the defaults (P 64, C 512, rtn_mixed) every int4 projection weight of the prefill and
    decode graphs reaches QNN with the HTP's block-wise expansion encoding (LPBQ), as the EP
    logs the graph it compiles, and every graph runs whole on the HTP; with
    qnn_int4_format=float_block none does (the float-block path). The promoted int8 weights
    are per-channel either way."""
    import onnx

    extra = [] if form == "lpbq" else ["qnn_int4_format=float_block"]
    folder = qnn_build(checkpoints["qwen3"], tmp_path / "o", "w4a16", *extra, lengths="default")
    runs = only_graph_io_on_cpu(folder)
    assert len(runs) == 2
    for graph, run in runs.items():
        m = onnx.load(str(folder / graph), load_external_data=False)
        codes = {i.name: i.data_type for i in m.graph.initializer if i.name.endswith(
            "_proj.weight_quantized")}
        assert len(codes) == 7 * 3  # every projection of every layer
        int4 = [n for n, t in codes.items() if t == onnx.TensorProto.INT4]
        assert 0 < len(int4) < len(codes)  # (rtn_mixed promoted some to int8)
        encodings = run.weight_encodings()
        for name in int4:
            lpbq = encodings.get(name) == "QNN_QUANTIZATION_ENCODING_BLOCKWISE_EXPANSION"
            assert lpbq == (form == "lpbq"), (graph, name, encodings.get(name))
        for name in set(codes) - set(int4):  # (the EP transposes per-channel int8 weights)
            assert encodings[f"{name}_transpose"] == \
                "QNN_QUANTIZATION_ENCODING_AXIS_SCALE_OFFSET", name
        print(f"{form} {graph}: {len(int4)} int4 weights as "
              f"{sorted({encodings.get(n) for n in int4}, key=str)}, {len(codes) - len(int4)} "
              "int8")


def test_uint8_kv_buffers_keep_their_bytes(checkpoints, tmp_path):
    """The w4a16 default's 8-bit KV cache: each layer's K and V buffers are uint8 graph inputs
    and outputs with one scale and zero point for past and present in both graphs, so a row a
    call does not write leaves it byte for byte (on the CPU EP and on the HTP), and the
    prefill graph's present is what the decode graph reads; the manifest states the bytes."""
    import onnx
    from onnx import numpy_helper

    folder = qnn_build(checkpoints["qwen3"], tmp_path / "o", "w4a16", lengths="default")
    manifest = json.loads((folder / "build_manifest.json").read_text())
    assert manifest["options"]["extra_options"]["qnn_kv_bits"] == 8
    # (no coverage tokens with a uint8 KV cache: see qnn_calibration_coverage)
    assert manifest["options"]["extra_options"]["qnn_calibration_coverage"] == 0
    assert manifest["kv_cache"] == {"dtype": "uint8", "bytes_per_token": 2 * 3 * 2 * 32,
                                    "context_length": 512, "bytes": 2 * 3 * 2 * 32 * 512,
                                    "attention_layers": 3, "state_bytes": 0}
    parts = manifest["device_memory"]["parts"]  # embeddings, the transformer, lm_head
    assert [p["graphs"] for p in parts] == [["embeddings.onnx"], ["context.onnx", "iterator.onnx"],
                                            ["lm_head_context.onnx", "lm_head_iterator.onnx"]]
    assert [p["kv_bytes"] for p in parts] == [0, manifest["kv_cache"]["bytes"], 0]
    transformer = parts[1]  # its weights once in a shared context, twice in a context each
    # (less than twice in a model this small: each graph has its own activation scales)
    assert 1.6 * transformer["weight_bytes_shared"] <= transformer["weight_bytes_per_graph"] \
        <= 2 * transformer["weight_bytes_shared"]
    # the largest activations, at 16 bits: the prefill graph's attention scores (4 heads x P 64
    # x C 512) and lm_head's P x 256 logits before their output's Q/DQ
    largest = [p.get("largest_activation") for p in parts]
    assert largest[0] is None  # (the lookup computes nothing between its input and output)
    assert (largest[1]["graph"], largest[1]["bytes"]) == ("context.onnx", 2 * 4 * 64 * 512)
    assert (largest[2]["graph"], largest[2]["bytes"]) == ("lm_head_context.onnx", 2 * 64 * 256)
    params = {}
    for graph in ("context.onnx", "iterator.onnx"):
        m = onnx.load(str(folder / graph), load_external_data=False)
        kv = [v for v in (*m.graph.input, *m.graph.output) if "_key_" in v.name
              or "_value_" in v.name]
        assert len(kv) == 3 * 4 and all(v.type.tensor_type.elem_type == onnx.TensorProto.UINT8
                                        for v in kv)
        wanted = {f"{v.name}_{p}" for v in kv for p in ("scale", "zero_point")}
        inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer
                 if i.name in wanted}
        for v in kv:
            params.setdefault(v.name.split("_", 1)[1], set()).add(
                (float(inits[f"{v.name}_scale"]), int(inits[f"{v.name}_zero_point"])))
        feeds = graph_feeds(folder, graph, np.random.default_rng(1))
        start = int(feeds["past_seq_len"][0, 0]) - (64 if graph == "context.onnx" else 1) + 1
        written = np.zeros(512, bool)
        written[start:start + (64 if graph == "context.onnx" else 1)] = True
        cpu = dict(zip([o.name for o in m.graph.output], session(folder, graph).run(None, feeds)))
        htp = run_on_qnn(folder / graph, feeds).outputs
        for name in (n for n in feeds if n.startswith(("past_key_", "past_value_"))):
            present = name.replace("past_", "present_")
            for out in (cpu[present], htp[present]):
                np.testing.assert_array_equal(out[:, :, ~written], feeds[name][:, :, ~written])
                assert not np.array_equal(out[:, :, written], feeds[name][:, :, written])
    assert len(params) == 3 * 2 and all(len(p) == 1 for p in params.values()), params


# the w4a16 forms' KL against either other form's, prefill plus decode and each phase: at most
FORM_COST = {"qwen3": (1.3, 1.8), "llama": (1.2, 1.8), "phi3": (3.0, 4.0)}


@pytest.mark.xdist_group("trained")
@pytest.mark.parametrize("arch", ["qwen3", "llama", "phi3"])
def test_lpbq_and_uint8_kv_cost_what_was_measured(arch, trained, tmp_path):
    """The w4a16 forms (LPBQ weights, uint8 KV) against the float-block and the 16-bit-KV
    builds of the same trained checkpoint, with round-to-nearest weights (rtn_mixed, the
    default when the forms were chosen): the accuracy report's KL, prefill / decode, measured
    (LPBQ + uint8 KV vs float blocks vs 16-bit KV): qwen3 7.0e-4 / 1.6e-3, 8.7e-4 / 1.1e-3,
    7.2e-4 / 1.5e-3; llama 1.1e-4 / 1.7e-4, 1.4e-4 / 2.0e-4, 1.1e-4 / 1.6e-4; phi3 2.3e-4 /
    2.0e-3, 2.3e-4 / 1.0e-3, 1.1e-4 / 9.8e-4. Nothing measurable on qwen3 and llama; phi3 pays
    about 2x for each form (its layer-1 keys span +-17 for the uint8 cache; LPBQ's decode
    position not traced). (Measured before builder's CPU sessions computed QDQ graphs exactly,
    phi3's forms cost nothing: README, "Attention's products on the HTP".) With the promotion
    measured at the layers' outputs (the same projections promoted in all three builds):
    qwen3 7.8e-4 / 1.7e-3, 7.5e-4 / 1.3e-3, 7.6e-4 / 1.7e-3 (LPBQ's decode 1.3x float blocks';
    the sums 1.21x); llama 9.2e-5 / 1.6e-4, 9.6e-5 / 1.4e-4, 8.7e-5 / 1.6e-4; phi3 2.3e-4 /
    2.0e-3, 2.3e-4 / 1.0e-3, 1.1e-4 / 9.7e-4. At quant_budget 0.2 (more promoted, each build
    its own choice): qwen3 3.7e-4 / 1.4e-3, 4.5e-4 / 1.0e-3, 3.3e-4 / 1.2e-3; llama 7.2e-5 /
    1.2e-4, 6.9e-5 / 9.5e-5, 6.7e-5 / 1.2e-4; phi3 1.7e-3 / 3.9e-4, 1.8e-3 / 4.7e-3, 4.7e-4 /
    3.2e-4 (the uint8 KV's prefill 3.6x the 16-bit one's: Phi-3's one held-out position, whose
    KL moves 10x between builds; the sums 2.6x)."""
    def kl(*extra):
        out = qnn_build(trained[arch][0], tmp_path / "-".join(extra or ("default",)),
                        "w4a16", "int4_algo_config=rtn_mixed", *extra, lengths="default")
        report = json.loads((out / "build_manifest.json").read_text())["accuracy"]
        return report["prefill"]["mean_kl"], report["decode"]["mean_kl"]

    ours = kl()
    both, each = FORM_COST[arch]
    # (the 16-bit KV build calibrated on the same tokens: without qnn_calibration_coverage's,
    # which it would take by default)
    for extra in (["qnn_int4_format=float_block"],
                  ["qnn_kv_bits=16", "qnn_calibration_coverage=0"]):
        theirs = kl(*extra)
        print(f"{arch} w4a16 defaults KL {ours[0]:.2e} / {ours[1]:.2e}; {' '.join(extra)} "
              f"{theirs[0]:.2e} / {theirs[1]:.2e}")
        assert sum(ours) <= both * sum(theirs)
        assert ours[0] <= each * theirs[0] and ours[1] <= each * theirs[1]


@pytest.mark.parametrize("lengths", ["default"])
def test_w8a8_builds_and_runs_on_qnn(lengths, checkpoints, built, tmp_path):
    folder = qnn_build(checkpoints["qwen3"], tmp_path / "o", "w8a8", lengths=lengths)
    prompt = PROMPTS[lengths]
    run = run_on_qnn(folder / "iterator.onnx", graph_feeds(folder, "iterator.onnx",
                                                       np.random.default_rng(0)))
    assert run.placed["QNNExecutionProvider"] == 1
    assert all(n.split()[0] in ("QuantizeLinear", "DequantizeLinear") for n in run.cpu_nodes)
    cpu = run_decoder(built["qwen3"], np.array([prompt]), steps=8)
    ref = [cpu.prefill_logits[0, -1]] + [s[0] for s in cpu.step_logits]
    ours = run_pipeline_on_qnn(folder, prompt, 9, forced=[int(r.argmax()) for r in ref])
    print(f"qwen3 w8a8 {lengths} on QNN: mean cosine {np.mean(_cosines(ours.step_logits, ref)):.4f}")
    assert np.mean(_cosines(ours.step_logits, ref)) >= 0.9


# measured on the trained qwen3 (CPU EP, same path as the other accuracy tests): mean cosine
# minmax 0.9999, percentile 0.9999 (0.9996 at the default lengths), top-1 100% for both
@pytest.mark.xdist_group("trained")
@pytest.mark.parametrize("lengths", ["default"])
@pytest.mark.parametrize("method, mean_cosine", [
    ("percentile", {"small": 0.99, "default": 0.99})])
def test_histogram_calibration_methods(method, mean_cosine, lengths, trained, w8a16_built,
                                       tmp_path):
    """percentile (histograms cut at 99.999% on each side) builds, narrows the activation ranges
    against minmax, never widens them, and keeps the model's answers."""
    ck, fp32 = trained["qwen3"]
    folder = qnn_build(ck, tmp_path / "o", "w8a16", f"qnn_calibration_method={method}",
                        lengths=lengths)
    prompt = PROMPTS[lengths]
    ours = activation_scales(folder)
    minmax = activation_scales(w8a16_built[lengths, "qwen3"])
    assert ours.keys() == minmax.keys()
    narrower = [n for n in ours if ours[n] < minmax[n] * 0.999]
    assert narrower  # the method took effect
    # (up to a few histogram bins: merged histograms re-bin; measured at most 0.22% wider)
    wider = {n: (ours[n], minmax[n]) for n in ours if ours[n] > minmax[n] * 1.005}
    cpu = run_decoder(fp32, np.array([prompt]), steps=16)
    ref = [cpu.prefill_logits[0, -1]] + [s[0] for s in cpu.step_logits]
    greedy = [int(r.argmax()) for r in ref]
    run = run_pipeline(folder, prompt, 17, forced=greedy)
    cos = _cosines(run.step_logits, ref)
    top1 = np.mean([int(x.argmax()) == g for x, g in zip(run.step_logits, greedy)])
    print(f"qwen3 w8a16 {method} {lengths}: {len(narrower)} of {len(ours)} ranges narrower "
          f"than minmax; mean cosine {np.mean(cos):.4f} (min {min(cos):.4f}), top-1 {top1:.0%}; "
          f"wider: {wider}")
    if method == "percentile":  # cuts the tails of what minmax saw, never widens
        assert not wider, wider
    assert np.mean(cos) >= mean_cosine[lengths]
    assert top1 >= 0.95


@pytest.mark.xdist_group("trained")
def test_headroom_keeps_unseen_tokens_unclipped(trained, w8a16_built, tmp_path):
    """qnn_calibration_headroom (default 2 at 16-bit activations) against the calibrated ranges
    as they are (1): the MLP's activation scales twice as large (not its Sigmoid's), every
    other scale the same, and on the fp32 CPU build's greedy path from a prompt of random
    tokens (many of which the English calibration text never holds) no decode step loses its
    logits: with the ranges as calibrated, one token's layer-0 MLP product was clipped
    (measured on the CPU EP: min step cosine 0.9946 against 0.9989 with the headroom, mean
    0.99945 against 0.99984; with an earlier training run's checkpoint 0.9943 against 0.9993,
    on the HTP 0.9946 against 0.9993; with qnn_calibration_coverage's tokens calibrated too,
    0.99522 against 0.99993)."""
    ck, fp32 = trained["qwen3"]
    tight = qnn_build(ck, tmp_path / "o", "w8a16", "qnn_calibration_headroom=1",
                      lengths="default")
    wide = w8a16_built["default", "qwen3"]
    for graph in ("context.onnx", "iterator.onnx", "lm_head_iterator.onnx"):
        ratios = check_headroom_scales(wide, tight, graph, ("/mlp/",), kv16=True)
        wider = {n for n, r in ratios.items() if r == 2}
        if not graph.startswith("lm_head"):  # (the MLP's values, and the KV cache's)
            assert any("/mlp/" in n for n in wider) and any("past_key_" in n for n in wider)
            assert any("/k_cache/" in n for n in wider) and any("/v_cache/" in n for n in wider)
    cos = along_greedy_path(fp32, PROMPTS["default"], {"headroom 2": wide, "headroom 1": tight})
    print("qwen3 w8a16 on the CPU EP: " + "; ".join(
        f"{name}: mean cosine {np.mean(c):.5f} (min {min(c):.5f})" for name, c in cos.items()))
    assert min(cos["headroom 2"]) >= 0.9985 and np.mean(cos["headroom 2"]) >= 0.9998
    assert min(cos["headroom 2"]) - min(cos["headroom 1"]) >= 0.002
    manifest = json.loads((wide / "build_manifest.json").read_text())
    assert manifest["options"]["extra_options"]["qnn_calibration_headroom"] == 2.0


@pytest.mark.xdist_group("trained")
def test_kv_cache_headroom_keeps_a_key_unclipped(trained, tmp_path):
    """With a 16-bit KV cache (w8a16) each layer's K and V buffers and their update chains
    take qnn_calibration_headroom too: a key beyond the cache's calibrated range stays clipped
    for every later token. The trained Llama calibrated on its own data (a .json file of token
    ids: random prompts and its greedy continuations), along the fp32 greedy path from the
    prompt whose key went beyond: min step cosine 0.99672 before, 0.99999 with the headroom
    (CPU EP; 0.99673 and 0.99999 on the HTP; README, "Calibration data")."""
    ck, fp32 = trained["llama"]
    ids = tmp_path / "own.json"
    ids.write_text(json.dumps(own_data(fp32)))
    folder = qnn_build(ck, tmp_path / "o", "w8a16", f"qnn_calibration={ids}", lengths="default")
    prompt = [int(t) for t in np.random.default_rng(101).integers(3, 256, 70)]
    cos = along_greedy_path(fp32, prompt, {"own data": folder})["own data"]
    print(f"llama w8a16 on its own data, CPU EP: mean cosine {np.mean(cos):.5f} (min "
          f"{min(cos):.5f})")
    assert min(cos) >= 0.9995 and np.mean(cos) >= 0.9999


def test_prefill_calibration_sees_a_past(checkpoints, tmp_path):
    """Prompts shorter than P still calibrate the prefill graph on calls with earlier chunks in
    the KV cache (they are joined into two-chunk sequences): no activation of the calibrated
    graphs is left with the [0, 0] range (scale 1) that clipped a long prompt's past away and
    that the HTP requantized wrongly."""
    prompts = tmp_path / "short.txt"
    prompts.write_text("Hi.\nYes.\nNo way.\n")
    folder = qnn_build(checkpoints["qwen3"], tmp_path / "o", "w8a16",
                        f"qnn_calibration={prompts}")
    for graph in ("context.onnx", "iterator.onnx"):
        scales = activation_scales(folder, graph)
        assert not [name for name, scale in scales.items() if scale == 1.0], graph


def test_prefill_sequences_span_two_chunks():
    from builder.quant.calibration import prefill_sequences

    assert [len(s) for s in prefill_sequences([[1] * 30, [2] * 50, [3] * 100, [4] * 10], 64,
                                              495)] == [180, 190]
    assert prefill_sequences([[1, 2], [3]], 2, 100) == [[1, 2, 3, 1, 2]]
    assert [len(s) for s in prefill_sequences([[1] * 300], 64, 100)] == [100]


def test_calibration_options(checkpoints, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A first prompt about rivers.\n\nA second one, about mountains.\nA third.\n")
    r = run_cli("-m", str(checkpoints["qwen3"]), "-o", str(tmp_path / "o"), "-e", "qnn",
                "-p", "w8a16", "--extra_options", f"qnn_calibration={prompts}",
                "qnn_calibration_samples=2", "qnn_calibration_steps=4",
                f"qnn_prefill_length={P}", f"qnn_context_length={C}")
    assert r.returncode == 0, r.stderr[-2000:]
    # (both prompts are longer than P = 8 tokens: their own later chunks see a past, so none
    # is joined to another)
    # (and the vocabulary's tokens beyond the prompts' embeddings, at most 256, in sequences of
    # at most C - steps - 1 = 59)
    found = re.search(r"calibration \(minmax\): \d+ layers, one at a time; prefill graph on the "
                      r"2 prompts, (\d+) sequence\(s\) of the (\d+) vocabulary tokens beyond "
                      r"their embedding range \(qnn_calibration_coverage=256\) and 0 "
                      r"sequence\(s\) joined from the 0 prompts of one chunk or less \(\d+ "
                      r"tokens, \d+ calls of 8\)", r.stderr)
    assert found, r.stderr[-3000:]
    covering, tokens = int(found[1]), int(found[2])
    assert 0 < tokens <= 256 and covering == -(-tokens // 59)
    assert f"decode graph on the 2 prompts and {covering} sequence(s) of tokens, each " \
        f"continued by 3 tokens of the text after it ({3 * (2 + covering)} tokens)" in r.stderr
    r = run_cli("-m", str(checkpoints["qwen3"]), "-o", str(tmp_path / "o2"), "-e", "qnn",
                "-p", "w8a16", "--extra_options", f"qnn_calibration={tmp_path / 'none.txt'}",
                f"qnn_prefill_length={P}", f"qnn_context_length={C}")
    assert r.returncode == 2 and "none.txt: no such file" in r.stderr
    assert not (tmp_path / "o2").exists()


def _held_out_rows(folder, prompts, steps, runner_of):
    """The residual stream leaving each part of a split folder (``hidden_states_layer_k``, then
    ``hidden_states``) at the accuracy report's positions: each held-out prompt's last token,
    then its decode calls."""
    from builder.runner import run_pipeline

    cfg = json.loads((folder / "genai_config.json").read_text())["model"]
    window = cfg["decoder"]["sliding_window"]["window_size"]
    rows = {}
    for i, ids in enumerate(prompts):
        calls = []
        run = runner_of(calls)
        text = [t for p in prompts[i + 1:] + prompts[:i + 1] for t in p][:steps - 1] + [0]
        run_pipeline(folder, ids, steps, forced=text, runner=run)
        chunks = -(-len(ids) // window)
        picked = [(chunks - 1, (len(ids) - 1) % window)] + [(chunks + k, 0)
                                                            for k in range(steps - 1)]
        for name in calls[0]:
            rows.setdefault(name, []).extend(calls[c][name][0, r] for c, r in picked)
    return {name: np.stack(v).astype(np.float64) for name, v in rows.items()}


@pytest.mark.xdist_group("trained")
def test_sensitivity_against_an_independent_computation(trained, tmp_path):
    """The manifest's sensitivity, recomputed: the w8a16 folder and an fp32 folder, each in
    three parts (one layer each, so that every layer's output is a graph output), run whole on
    the held-out prompts; the stream's SQNR after each layer at the report's positions agrees
    with the manifest's. Also: every kind and every layer has its figures, and the activations
    beyond their ranges are listed with both ranges."""
    from builder.quant.report import STEPS, evaluation_prompts

    ck = trained["qwen3"][0]
    folder = qnn_build(ck, tmp_path / "w8a16", "w8a16", "qnn_num_splits=3",
                       "qnn_sensitivity=true", lengths="default")
    fp32 = qnn_build(ck, tmp_path / "fp32", "fp32", "qnn_num_splits=3", lengths="default")
    sensitivity = json.loads((folder / "build_manifest.json").read_text())["sensitivity"]
    prompts = evaluation_prompts(ck, 512)

    def runner_of(calls, folder):
        from builder.runner import graph_runner

        run = graph_runner(folder)

        def runner(filename, feeds):
            out = run(filename, feeds)
            if filename.startswith("context_0") or filename.startswith("iterator_0"):
                calls.append({})
            if filename.startswith(("context", "iterator")):
                calls[-1].update({n: v for n, v in out.items() if n.startswith("hidden")})
            return out
        return runner

    got = _held_out_rows(folder, prompts, STEPS, lambda calls: runner_of(calls, folder))
    ref = _held_out_rows(fp32, prompts, STEPS, lambda calls: runner_of(calls, fp32))
    names = ["hidden_states_layer_1", "hidden_states_layer_2", "hidden_states"]
    layers = sensitivity["layers"]
    assert [r["layer"] for r in layers] == [0, 1, 2]
    for layer, name in enumerate(names):
        f, q = ref[name], got[name]
        db = 10 * np.log10((f * f).sum() / ((q - f) ** 2).sum())
        print(f"layer {layer}: stream SQNR {layers[layer]['stream_sqnr_db']} dB in the "
              f"manifest, {db:.2f} dB here")
        assert f.shape == (len(prompts) * STEPS, 64)
        assert abs(layers[layer]["stream_sqnr_db"] - db) < 0.3
    kinds = sensitivity["kinds"]
    assert {"transformer weights", "transformer activations", "lm_head"} <= kinds.keys()
    assert [r["layer"] for r in kinds["layers"]] == [0, 1, 2]
    accuracy = json.loads((folder / "build_manifest.json").read_text())["accuracy"]
    positions = accuracy["prefill"]["positions"] + accuracy["decode"]["positions"]
    for figures in [kinds[k] for k in kinds if k != "layers"] + kinds["layers"]:
        assert figures["positions"] == positions and 0 < figures["mean_kl"] < 1e-3
    # one weight's SQNR, from the folder's int8 codes and scales against the checkpoint's
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    stored = {i.name: numpy_helper.to_array(i, base_dir=str(folder)) for i in onnx.load(
        str(folder / "context_0.onnx"), load_external_data=False).graph.initializer
              if i.name.startswith("model.layers.0.self_attn.q_proj.weight")}
    name = "model.layers.0.self_attn.q_proj.weight"
    w = load_file(ck / "model.safetensors")[name].astype(np.float32)
    got = (stored[f"{name}_quantized"].astype(np.float32) * stored[f"{name}_scale"]).T
    db = 10 * np.log10((w.astype(np.float64) ** 2).sum() / ((got - w) ** 2).sum())
    q_proj = next(r for r in sensitivity["weights"] if r["layer"] == 0 and r["weight"] == "q")
    assert q_proj["sqnr_db"] == pytest.approx(db, abs=0.01)
    assert len(sensitivity["weights"]) == 3 * 7
    assert all(r["sqnr_db"] > 30 for r in sensitivity["weights"])  # int8 per channel
    for t in sensitivity["clipped_tensors"]:
        lo, hi = t["range"]
        assert t["held_out"][0] < lo or t["held_out"][1] > hi
        assert t["clipped_by"] == pytest.approx(
            max(t["held_out"][1] - hi, lo - t["held_out"][0]) / (hi - lo), abs=1e-3)


@pytest.mark.xdist_group("trained")
def test_sensitivity_finds_a_planted_outlier(trained, tmp_path):
    """One MLP channel of layer 2 made 1024x larger and its down-projection column 1024x smaller:
    the same model in float (powers of two are exact in bf16), but that layer's MLP values now
    share a range with an outlier. The analysis puts the error there: layer 2 costs the most
    dB and has the largest KL of the layers quantized alone."""
    ck = plant_outlier(trained["qwen3"][0], tmp_path / "planted", 2)
    folder = qnn_build(ck, tmp_path / "o", "w8a16", "qnn_sensitivity=true", lengths="default")
    sensitivity = json.loads((folder / "build_manifest.json").read_text())["sensitivity"]
    cost = {r["layer"]: r["cost_db"] for r in sensitivity["layers"][1:]}
    kl = {r["layer"]: r["mean_kl"] for r in sensitivity["kinds"]["layers"]}
    print(f"planted in layer 2: dB cost per layer {cost}, KL with one layer quantized {kl}")
    assert max(cost, key=cost.get) == 2 and max(kl, key=kl.get) == 2


# measured on the HTP along the fp32 build's greedy path from random tokens (rtn -> gptq):
# qwen3 0.9943 -> 0.9957, llama 0.9976 -> 0.9994, phi3 0.9912 -> 0.9982; report KL on the
# held-out English prompts: qwen3 1.47e-3 -> 5.2e-4, phi3 see the print
GPTQ_W4A16_MEAN_COSINE = {"qwen3": 0.9945, "phi3": 0.997}  # rtn measured 0.9937, 0.9958


@pytest.mark.xdist_group("trained")
@pytest.mark.parametrize("arch", ["qwen3", "phi3"])
def test_w4a16_with_gptq(arch, trained, tmp_path):
    """int4_algo_config=gptq on -e qnn -p w4a16 at the defaults: the same int4 blocks, chosen
    by GPTQ with each layer's calibration inputs; placed whole on the HTP, closer to the fp32
    build than round to nearest on the HTP (a bound above rtn's measured figure) and, on the
    held-out prompts (the manifest's report), with well under rtn's KL."""
    ck, fp32 = trained[arch]
    rtn = qnn_build(ck, tmp_path / "rtn", "w4a16", "int4_algo_config=rtn", lengths="default")
    folder = qnn_build(ck, tmp_path / "gptq", "w4a16", "int4_algo_config=gptq",
                       lengths="default")
    assert not (folder / ".rounded").exists()
    only_graph_io_on_cpu(folder)
    kl = {name: json.loads((f / "build_manifest.json").read_text())["accuracy"]["decode"][
        "mean_kl"] for name, f in (("rtn", rtn), ("gptq", folder))}
    _, greedy, ours, cos, _, top = _against_cpu(folder, fp32, prompt=PROMPTS["default"])
    rtn_cos = _against_cpu(rtn, fp32, prompt=PROMPTS["default"])[3]
    print(f"{arch} w4a16 on QNN: gptq mean cosine {np.mean(cos):.5f} (min {min(cos):.5f}), "
          f"rtn {np.mean(rtn_cos):.5f} (min {min(rtn_cos):.5f}); report decode KL {kl}")
    assert np.mean(cos) >= GPTQ_W4A16_MEAN_COSINE[arch]
    assert np.mean(cos) > np.mean(rtn_cos)
    assert np.mean(np.array(top) == greedy) >= 0.95
    assert kl["gptq"] <= 0.6 * kl["rtn"]


def test_int4_algo_config_on_qnn(checkpoints, tmp_path):
    """On -e qnn int4_algo_config takes rtn (default) or gptq; the lm_head policies and k_quant
    are cpu/cuda's (lm_head is int8 there), refused by name; with -p fp16 it does nothing."""
    for value, message in (("k_quant", "int4_algo_config=k_quant does not apply on -e qnn"),
                           ("rtn_last", "choose from default, rtn, gptq")):
        r = run_cli("-m", str(checkpoints["qwen3"]), "-o", str(tmp_path / "o"), "-e", "qnn",
                    "-p", "w4a16", "--extra_options", f"int4_algo_config={value}")
        assert r.returncode == 2 and message in r.stderr, r.stderr[-1000:]
    r = run_cli("-m", str(checkpoints["qwen3"]), "-o", str(tmp_path / "o"), "-e", "qnn",
                "-p", "fp16", "--extra_options", "int4_algo_config=gptq")
    assert r.returncode == 2 and "applies on -e qnn to -p w8a16, w4a16" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kv_bits", [16, 8])
def test_activation_matmul_is_exact_on_the_htp(kv_bits, tmp_path):
    """The HTP rounds the second input of a MatMul of two 16-bit activations to 8 bits (this
    is why attention's q @ k^T and weights @ v go through ops.attention.activation_matmul): a
    plain [4, 64] @ [64, 128] lands tens of its 65536 output steps off the exact product, the
    8-bit terms within a few; with an 8-bit KV cache the second input is on an 8-bit grid
    already and its one 8-bit term is exact. onnxruntime's CPU EP computes both exactly."""
    import onnx

    from builder.graph import GraphBuilder, Qdq
    from builder.ops.attention import activation_matmul
    from builder.quant.kv import kv_params
    from builder.quant.qdq import activation_params

    rng = np.random.default_rng(0)
    a = rng.uniform(-1.9, 1.9, (4, 64)).astype(np.float32)
    b = rng.uniform(-1.4, 1.4, (64, 128)).astype(np.float32)
    if kv_bits == 8:  # b on the 8-bit KV grid of its range, as an 8-bit cache's values are
        scale, zero = kv_params(-1.4, 1.4, 8)
        b = ((np.clip(np.rint(b / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    out_range = (float(exact.min()) * 1.1, float(exact.max()) * 1.1)
    ranges = {"a": (-1.9, 1.9), "b": (-1.4, 1.4), "/plain/MatMul/output_0": out_range,
              "/split/MatMul/output_0": out_range}
    gb = GraphBuilder("g", tmp_path / "g.data",
                      qdq=Qdq(16, ranges | {"plain": out_range, "split": out_range},
                              kv_bits=kv_bits))
    gb.input("a", onnx.TensorProto.FLOAT, [4, 64])
    gb.input("b", onnx.TensorProto.FLOAT, [64, 128])
    gb.output(gb.node("MatMul", ["a", "b"], "/plain/MatMul"), "plain", onnx.TensorProto.FLOAT,
              [4, 128])
    gb.output(activation_matmul(gb, "/split", "a", "b", 64 * 1.9), "split",
              onnx.TensorProto.FLOAT, [4, 128])
    gb.save(tmp_path / "g.onnx")
    step = float(activation_params(*out_range, 16)[0])
    feeds = {"a": a, "b": b}
    on_cpu = dict(zip(("plain", "split"), session(tmp_path, "g.onnx").run(None, feeds)))
    on_htp = run_on_qnn(tmp_path / "g.onnx", feeds).outputs
    off = {(where, k): float(np.abs(got[k] - exact).max()) / step
           for where, got in (("cpu", on_cpu), ("htp", on_htp)) for k in ("plain", "split")}
    print(f"kv_bits {kv_bits}: steps off the exact product: " + ", ".join(
        f"{w} {k} {v:.1f}" for (w, k), v in off.items()))
    assert max(off["cpu", "plain"], off["cpu", "split"]) <= 3
    if kv_bits == 16:  # the HTP's rounding (a fact: if it goes, so can the terms)
        assert off["htp", "plain"] >= 20 and off["htp", "split"] <= 16
    else:  # measured: 4.7 steps off plain (the HTP's 8-bit grid is not the cache's), 0.9 here
        assert off["htp", "split"] <= 2 < off["htp", "plain"]
