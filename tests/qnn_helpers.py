"""What the -e qnn tests share: the lengths and prompts they build and run at, a build helper,
random feeds for one graph, onnxruntime-genai in a subprocess, and the placement and data-file
checks of a folder."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from builder import BuildOptions, ExtraOptions, build
from builder.options import ExecutionProvider, Precision
from builder.testing import run_on_qnn

ARCHS = ["qwen3", "llama", "phi3"]
P, C = 8, 64  # the small lengths; "default" builds set neither (P = 64; C = 512: the default
# C is 2048 or max_position_embeddings when smaller, and the test checkpoints have 512)
DEFAULT_P = ExtraOptions().qnn_prefill_length
LENGTHS = ["small", "default"]
# prompts longer than P: a two-chunk prefill at either length
PROMPTS = {"small": [int(t) for t in np.random.default_rng(21).integers(3, 256, 13)],
           "default": [int(t) for t in np.random.default_rng(22).integers(3, 256, 70)]}
PROMPT = PROMPTS["small"]


def qnn_build(ck, out, precision="fp16", *extra, lengths="small"):
    given = [f"qnn_prefill_length={P}", f"qnn_context_length={C}"] if lengths == "small" else []
    return build(BuildOptions(
        model_name=str(ck), output=out, precision=Precision(precision),
        execution_provider=ExecutionProvider.QNN,
        extra=ExtraOptions.parse([*given, *extra])))


def pipeline(folder) -> list[dict]:
    """genai_config.json's stages, in order."""
    stages = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"][
        "pipeline"]
    return [spec for stage in stages for spec in stage.values()]


def transformer_graphs(folder) -> list[str]:
    """The prefill and decode graphs of every part of the transformer, in order."""
    return [s["filename"] for s in pipeline(folder)
            if "past_seq_len" in s["inputs"]]


def graph_feeds(folder, graph, rng):
    """Random inputs for one graph of the pipeline, at a mid-context position."""
    import onnx

    m = onnx.load(str(folder / graph), load_external_data=False)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.input}
    rows = next((s[2] for n, s in shapes.items() if n.startswith("past_key_")), None)
    feeds = {}
    for v in m.graph.input:
        shape = shapes[v.name]
        if v.name == "past_seq_len":  # rows 20 .. 20 + S - 1
            feeds[v.name] = np.array([[20 + shapes[m.graph.input[0].name][1] - 1]], np.int32)
        elif v.name == "total_seq_len":
            feeds[v.name] = np.array([rows], np.int32)
        elif v.type.tensor_type.elem_type == onnx.TensorProto.UINT8:  # 8-bit KV codes
            feeds[v.name] = rng.integers(0, 256, shape).astype(np.uint8)
        else:
            dtype = np.float16 if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 \
                else np.float32
            feeds[v.name] = (rng.standard_normal(shape) * 0.5).astype(dtype)
    return feeds


_GENAI = r"""
import json, sys
import numpy as np, onnxruntime_genai as og
model_dir, prompt, new, mode = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if mode == "qnn":
    import onnxruntime_qnn
    og.register_execution_provider_library("QNNExecutionProvider",
                                           onnxruntime_qnn.get_library_path())
    model = og.Model(model_dir)
else:
    config = og.Config(model_dir)
    config.clear_providers()
    model = og.Model(config)
params = og.GeneratorParams(model)
params.set_search_options(max_length=int(sys.argv[5]), do_sample=False)
gen = og.Generator(model, params)
gen.append_tokens(np.array([prompt], np.int32))
while not gen.is_done():
    gen.generate_next_token()
print(json.dumps([int(t) for t in gen.get_sequence(0)]))
"""


def genai(folder, prompt, max_length, mode):
    r = subprocess.run([sys.executable, "-c", _GENAI, str(folder), json.dumps(prompt), "0", mode,
                        str(max_length)], capture_output=True, text=True, timeout=600)
    return r


def genai_sequence(folder, mode="qnn", new_tokens=24, prompt=PROMPT):
    """onnxruntime-genai's whole sequence for ``prompt``, and the ids it generated after the
    prompt and the pads it keeps (the prompt goes in chunks of P, the last padded at its end:
    max_length must exceed that padded length)."""
    window = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"][
        "sliding_window"]["window_size"]
    padded = -(-len(prompt) // window) * window
    r = genai(folder, prompt, padded + new_tokens, mode)
    assert r.returncode == 0, r.stderr[-2000:]
    sequence = json.loads(r.stdout.strip().splitlines()[-1])
    return sequence, sequence[padded:]


def one_data_file_without_dead_bytes(folder):
    """After calibration every graph reads model.data, which holds each referenced tensor once
    and nothing else (the float weights the quantizer replaced are gone)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    assert sorted(p.name for p in folder.glob("*.data")) == ["model.data"]
    spans = set()
    for graph in folder.glob("*.onnx"):
        for t in onnx.load(str(graph), load_external_data=False).graph.initializer:
            if uses_external_data(t):
                info = ExternalDataInfo(t)
                assert info.location == "model.data"
                spans.add((info.offset, info.length))
    used = sum(length for _, length in spans)
    assert used <= (folder / "model.data").stat().st_size < used + 64 * len(spans)


def only_graph_io_on_cpu(folder):
    """Every node of each part's prefill and decode graphs on QNN, in one partition, but the
    graph-I/O Quantize/Dequantize: one pair per float input and output (the hidden stream in
    and out, each of the part's layers' KV buffers in and out). Returns each graph's QnnRun."""
    runs = {}
    for spec in pipeline(folder):
        if "past_seq_len" not in spec["inputs"]:
            continue
        graph = spec["filename"]
        run = run_on_qnn(folder / graph, graph_feeds(folder, graph, np.random.default_rng(0)))
        assert set(run.placed) == {"QNNExecutionProvider", "CPUExecutionProvider"}
        assert run.placed["QNNExecutionProvider"] == 1  # one partition: everything else
        assert all(n.split()[0] in ("QuantizeLinear", "DequantizeLinear") for n in run.cpu_nodes)
        import onnx

        g = onnx.load(str(folder / graph), load_external_data=False).graph
        float_io = sum(v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT,
                                                        onnx.TensorProto.FLOAT16)
                       for v in (*g.input, *g.output))  # (not the lengths, not uint8 KV)
        assert len(run.cpu_nodes) == float_io, (graph, run.cpu_nodes)
        runs[graph] = run
    return runs
