"""qnn_num_splits: the transformer as consecutive layer ranges, each a prefill and a decode graph
of its own, chained by the residual stream. A split folder must compute what the unsplit one
does, on the CPU EP and on the HTP simulator, through onnxruntime-genai too."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from builder.config import DecoderConfig
from builder.errors import OptionError
from builder.models.qwen3 import Qwen3Builder
from builder.options import BuildOptions, ExecutionProvider, ExtraOptions, Precision
from builder.pipeline import PART_LIMIT, resolve_lengths, resolve_splits
from builder.testing import run_on_qnn, run_pipeline, run_pipeline_on_qnn
from conftest import run_cli
from qnn_helpers import (ARCHS, PROMPTS, genai_sequence, graph_feeds,
                         one_data_file_without_dead_bytes, only_graph_io_on_cpu, pipeline,
                         qnn_build, transformer_graphs)

pytest.importorskip("onnxruntime_qnn", reason="the QNN tests need onnxruntime-qnn")
pytestmark = pytest.mark.xdist_group("splits")  # one worker builds the folders once
# the largest logit difference between a split folder and the unsplit one: fp16 rounds the
# residual stream where a part ends (the unsplit graph adds it inside the next norm); the
# calibrated QDQ graphs quantize it there either way
TOLERANCE = {"fp16": 2e-2, "w8a16": 1e-4}
LAYERS = 4  # the tiny checkpoints, deeper: 3 parts of 2/1/1 layers


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    from checkpoints import make_checkpoint

    return {arch: make_checkpoint(tmp_path_factory.mktemp("deep") / arch, arch,
                                  num_hidden_layers=LAYERS) for arch in ARCHS}


@pytest.fixture(scope="module")
def folders(deep, tmp_path_factory):
    """(arch, precision, parts, lengths) → a folder of the deeper tiny checkpoint, built on
    first use."""
    made = {}

    def get(arch, precision, parts, lengths="small"):
        key = (arch, precision, parts, lengths)
        if key not in made:
            out = tmp_path_factory.mktemp("split") / f"{arch}-{precision}-{parts}-{lengths}"
            made[key] = qnn_build(deep[arch], out, precision,
                                  f"qnn_num_splits={parts}", lengths=lengths)
        return made[key]

    return get


def _agree(split, whole, precision):
    assert split.tokens == whole.tokens
    err = max(float(np.abs(a - b).max()) for a, b in zip(split.step_logits, whole.step_logits))
    assert err <= TOLERANCE[precision], err
    return err


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("precision", ["fp16", "w8a16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_split_folder_matches_the_whole_on_the_cpu_ep(arch, precision, parts, folders):
    folder = folders(arch, precision, parts)
    graphs = transformer_graphs(folder)
    assert graphs == [f"{kind}_{k}.onnx" for k in range(parts) for kind in ("context", "iterator")]
    stages = pipeline(folder)
    layers = [sorted(int(n.rsplit("_", 1)[1]) for n in s["inputs"] if n.startswith("past_key_"))
              for s in stages if s["filename"].startswith("context_")]
    assert sum(layers, []) == list(range(LAYERS))  # consecutive ranges, each layer's KV once
    err = _agree(run_pipeline(folder, PROMPTS["small"], 9),
                 run_pipeline(folders(arch, precision, 1), PROMPTS["small"], 9), precision)
    print(f"{arch} {precision} {parts} parts on the CPU EP: max logit difference {err:.2e}")
    if precision == "w8a16":
        one_data_file_without_dead_bytes(folder)
        report = json.loads((folder / "build_manifest.json").read_text())["accuracy"]
        whole = json.loads((folders(arch, precision, 1) / "build_manifest.json").read_text())
        assert report == whole["accuracy"]  # calibration and the report see layers, not parts


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("precision", ["fp16", "w8a16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_split_folder_matches_the_whole_on_the_htp(arch, precision, parts, folders):
    """Every part's graphs run on QNN (the calibrated ones but their graph-I/O Q/DQ), and the
    split pipeline on the HTP simulator gives the unsplit one's ids and logits there."""
    folder = folders(arch, precision, parts)
    if precision == "w8a16":
        only_graph_io_on_cpu(folder)
    else:
        for graph in transformer_graphs(folder):
            run = run_on_qnn(folder / graph, graph_feeds(folder, graph, np.random.default_rng(0)))
            assert run.cpu_nodes == [] and set(run.placed) == {"QNNExecutionProvider"}
    err = _agree(run_pipeline_on_qnn(folder, PROMPTS["small"], 9),
                 run_pipeline_on_qnn(folders(arch, precision, 1), PROMPTS["small"], 9), precision)
    print(f"{arch} {precision} {parts} parts on the HTP: max logit difference {err:.2e}")


@pytest.mark.parametrize("lengths", ["default"])
def test_genai_generates_from_a_split_folder_with_qnn(lengths, folders):
    """onnxruntime-genai with the QNN EP registered, at the default lengths: the 3-part folder
    generates the unsplit folder's ids."""
    prompt = PROMPTS[lengths]
    split = genai_sequence(folders("qwen3", "w8a16", 3, lengths), prompt=prompt)
    assert split == genai_sequence(folders("qwen3", "w8a16", 1, lengths), prompt=prompt)
    assert len(split[1]) >= 16


def test_epcontext_compiles_each_part(deep, folders, tmp_path):
    """qnn_epcontext=true: a context binary per graph of every part; onnxruntime-genai runs
    the compiled folder to the uncompiled one's ids."""
    import onnx

    out = qnn_build(deep["qwen3"], tmp_path / "ctx", "fp16", "qnn_num_splits=2",
                    "qnn_epcontext=true")
    files = [s["filename"] for s in pipeline(out)]
    assert files == ["embeddings.onnx", "context_0_ctx.onnx", "iterator_0_ctx.onnx",
                     "context_1_ctx.onnx", "iterator_1_ctx.onnx", "lm_head_context_ctx.onnx",
                     "lm_head_iterator_ctx.onnx"]
    for graph in files[1:]:
        assert [n.op_type for n in onnx.load(str(out / graph)).graph.node] == ["EPContext"]
    assert genai_sequence(out) == genai_sequence(folders("qwen3", "fp16", 2))


def _resolve(config: dict, precision: str, splits="auto", *extra: str) -> list[range]:
    options = BuildOptions(model_name="x", output=Path("unused"), precision=Precision(precision),
                           execution_provider=ExecutionProvider.QNN,
                           extra=ExtraOptions.parse([f"qnn_num_splits={splits}", *extra]))
    decoder = DecoderConfig.from_hf(config)
    resolve_lengths(options, decoder)  # C (the KV buffers): the default 2048
    ranges = resolve_splits(options, decoder, Qwen3Builder)
    assert options.extra.qnn_num_splits == len(ranges)  # written back for the manifest
    return ranges


QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
         "head_dim": 128, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
         "hidden_act": "silu", "tie_word_embeddings": False, "rope_theta": 1000000}
SHAPES = {"4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8),
          "8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8)}


@pytest.mark.parametrize("shape", ["4B", "8B"])
@pytest.mark.parametrize("precision, weight_bytes, kv_bytes", [
    ("w4a16", 0.5 + 4.5 / 32, 1), ("w8a16", 1.0, 2), ("fp16", 2.0, 2)])
@pytest.mark.parametrize("sharing", [False, True])
def test_auto_counts_parts_from_the_weights(shape, precision, weight_bytes, kv_bytes, sharing,
                                            caplog):
    """auto: the fewest equal layer ranges whose share of the NPU each stays under the limit,
    counted here by hand from the shapes: the weights (int4: half a byte per weight, an fp32
    scale and an int4 zero point per block of 32; int8: a byte, per-channel scales a rounding
    error here; norms at 16 bits) twice, or once in a weight-shared context, and the K and V
    buffers at the default C = 2048 (uint8 at w4a16, 16-bit otherwise)."""
    c = SHAPES[shape]
    h, i, q = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"] * 128
    kv = c["num_key_value_heads"] * 128
    per_layer = (h * (q + 2 * kv) + q * h + 3 * h * i) * weight_bytes + 2 * (2 * h + 2 * 128)
    on_npu = per_layer * (1 if sharing else 2) + 2 * kv * 2048 * kv_bytes
    layers = c["num_hidden_layers"]
    expected = next(n for n in range(1, layers + 1)
                    if math.ceil(layers / n) * on_npu * 0.999 <= PART_LIMIT)
    extra = ["qnn_epcontext=true", "qnn_weight_sharing=true"] if sharing else []
    with caplog.at_level(logging.INFO, logger="builder.pipeline"):
        ranges = _resolve({**QWEN3, **c}, precision, "auto", *extra)
    assert len(ranges) == expected
    assert [r.start for r in ranges] == sorted(r.start for r in ranges) and \
        sum(len(r) for r in ranges) == layers and max(map(len, ranges)) - min(map(len, ranges)) <= 1
    assert f"transformer in {expected} part(s)" in caplog.text and "auto: the fewest" in caplog.text
    print(f"Qwen3-{shape} {precision}{' shared' if sharing else ''}: {expected} parts, "
          f"{per_layer * len(ranges[0]) / 2**20:.0f} MiB of weights in the largest")
    if (shape, precision, sharing) == ("8B", "w4a16", False):
        assert expected == 5  # what Qualcomm's AI Hub ships for Llama-3-8B
    if (shape, precision, sharing) == ("8B", "w4a16", True):
        assert expected == 3  # a shared part holds twice the weights


def test_auto_keeps_a_small_model_whole(folders):
    folder = folders("qwen3", "fp16", "auto")
    assert transformer_graphs(folder) == ["context.onnx", "iterator.onnx"]
    manifest = json.loads((folder / "build_manifest.json").read_text())
    assert manifest["options"]["extra_options"]["qnn_num_splits"] == 1


def test_explicit_split_count_is_honoured_or_refused(checkpoints, tmp_path):
    assert [len(r) for r in _resolve({**QWEN3, **SHAPES["8B"]}, "w4a16", 7)] == [6] + [5] * 6
    for value, message in (("4", "qnn_num_splits=4 is more parts than the model's 3 layers"),
                           ("0", "expected auto or a positive integer"),
                           ("some", "invalid literal")):
        r = run_cli("-m", str(checkpoints["qwen3"]), "-o", str(tmp_path / "o"), "-e", "qnn",
                    "--extra_options", f"qnn_num_splits={value}")
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert r.stderr.count("error:") == 1 and not (tmp_path / "o").exists()
    with pytest.raises(OptionError, match="applies to -e qnn only"):
        from builder import build
        build(BuildOptions(model_name=str(checkpoints["qwen3"]), output=tmp_path / "o",
                           extra=ExtraOptions.parse(["qnn_num_splits=2"])))
