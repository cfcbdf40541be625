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


def activation_scales(folder, graph="iterator.onnx") -> dict[str, float]:
    """{scale initializer: value} of a QDQ graph's activations (not its stored constants')."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(folder / graph))
    names = {i.name for i in m.graph.initializer}
    return {i.name: float(numpy_helper.to_array(i)) for i in m.graph.initializer
            if i.name.endswith("_scale") and not i.dims  # not a stored constant's
            and i.name.removesuffix("_scale") + "_quantized" not in names}


def headroom_ratios(folder, graph: str, scopes, kv16: bool) -> dict[str, float]:
    """{activation scale: 2.0 or 1.0}: what qnn_calibration_headroom=2 does to each of the
    graph's activation scales against headroom 1, from the graph's own names: the values under
    ``scopes`` (not a bounded op's: Sigmoid, Softmax, Tanh) and, with a 16-bit KV cache
    (``kv16``), each layer's K and V buffers and the values of their update chains, twice as
    wide; an op that only moves values (Reshape, Transpose, ...) keeps its input's scale, and
    the parts of attention's split products (``ops.attention.activation_matmul``) that of the
    value they are grids of: the 8-bit high part and the rest, the second input's; the sum,
    the plain product's."""
    import re

    import onnx

    from builder.graph import BOUNDED, SAME_AS_INPUT
    from builder.quant.kv import kv_group

    model = onnx.load(str(folder / graph), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    ratios = {}
    for name in activation_scales(folder, graph):
        value = name.removesuffix("_scale")
        split = re.match(r"(.*)/rest/(Sub|MatMul|Add)/output_0$", value)
        if split:
            value = split[1] + ("/MatMul/output_0" if split[2] == "Add" else
                                "/high/Identity/output_0")
        while value in producer and producer[value].op_type in SAME_AS_INPUT:
            value = producer[value].input[0].removesuffix("_DequantizeLinear_Output")
        op = producer[value].op_type if value in producer else None
        wide = (any(s in value for s in scopes) and op not in BOUNDED) or (
            kv16 and kv_group(value) is not None)
        ratios[name] = 2.0 if wide else 1.0
    return ratios


def check_headroom_scales(wide, tight, graph: str, scopes, kv16: bool) -> dict[str, float]:
    """Assert that each activation scale of ``wide`` (headroom 2) is ``tight``'s (headroom 1)
    times its ``headroom_ratios`` (a KV buffer's fp16 scale at its floor may stay there);
    returns the ratios."""
    import pytest

    got, calibrated = activation_scales(wide, graph), activation_scales(tight, graph)
    assert got.keys() == calibrated.keys()
    ratios = headroom_ratios(wide, graph, scopes, kv16)
    for name, scale in got.items():
        if calibrated[name] == np.finfo(np.float16).tiny:  # (a KV buffer's or a state's fp16
            assert calibrated[name] <= scale <= 2 * calibrated[name]  # scale at its floor)
            continue
        # (rel: the KV buffers' scales are fp16, subnormal at 16 bits)
        assert scale == pytest.approx(calibrated[name] * ratios[name], rel=3e-3), name
    return ratios


def along_greedy_path(fp32, prompt, folders: dict) -> dict[str, list[float]]:
    """Each folder's logit cosine per step on the CPU EP along the fp32 build's greedy path
    from ``prompt`` (its last prefill position and 16 decode calls)."""
    from builder.testing import run_decoder, run_pipeline

    cpu = run_decoder(fp32, np.array([prompt]), steps=16)
    ref = [cpu.prefill_logits[0, -1]] + [s[0] for s in cpu.step_logits]
    greedy = [int(r.argmax()) for r in ref]
    return {name: cosines(run_pipeline(folder, prompt, 17, forced=greedy).step_logits, ref)
            for name, folder in folders.items()}


def own_data(fp32, count: int = 24, seed: int = 999) -> list[list[int]]:
    """Calibration prompts of a checkpoint trained on random tokens (``checkpoints``'
    train_previous_token), as token ids: ``count`` prompts of 84 random tokens (ids 3..255 of
    the byte-level tokenizer), each followed by the 16 tokens the fp32 build ``fp32``
    generates from it (greedy), as a measured prompt is."""
    from builder.testing import run_decoder

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        prompt = [int(t) for t in rng.integers(3, 256, 84)]
        run = run_decoder(fp32, np.array([prompt]), steps=15)
        rows.append(prompt + [int(run.prefill_logits[0, -1].argmax())]
                    + [int(s[0].argmax()) for s in run.step_logits])
    return rows


def cosines(a, b):
    return [float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in zip(a, b)]


def against_cpu(folder, cpu_folder, steps=17, prompt=PROMPT):
    """The QNN pipeline fed the fp32 CPU decoder's greedy path: (reference logits, the CPU's
    greedy ids, our logits on that path, cosine per step, max abs logit error, our argmaxes)."""
    from builder.testing import run_decoder, run_pipeline_on_qnn

    cpu = run_decoder(cpu_folder, np.array([prompt]), steps=steps - 1)
    ref = [cpu.prefill_logits[0, -1]] + [s[0] for s in cpu.step_logits]
    greedy = [int(r.argmax()) for r in ref]
    ours = run_pipeline_on_qnn(folder, prompt, steps, forced=greedy).step_logits
    err = max(float(np.abs(a - b).max()) for a, b in zip(ours, ref))
    return ref, greedy, ours, cosines(ours, ref), err, [int(x.argmax()) for x in ours]


def recompute_report(folder, ck, fp32, arch, perplexity_rel=1e-4):
    """The manifest's accuracy report of a calibrated ``folder``, recomputed: the held-out
    prompts, each continued by the next prompts' tokens, through the fp32 -e qnn build's
    (``fp32``) whole graphs with lm_head in float64 from the checkpoint ``ck`` (torch), and
    through the folder's whole graphs; at each prompt's last 32 tokens (the prefill graph's
    rows) and every decode call: cosine, top-1, KL and the perplexity of the next tokens
    computed with torch. (The report runs the same graphs one layer at a time.)
    ``perplexity_rel``: the quantized perplexities' tolerance."""
    import pytest

    import torch
    from safetensors.torch import load_file

    from builder.quant.report import PROMPT_POSITIONS, STEPS, evaluation_prompts
    from builder.runner import graph_runner, run_pipeline, session

    report = json.loads((folder / "build_manifest.json").read_text())["accuracy"]
    context = json.loads((folder / "genai_config.json").read_text())["model"]["context_length"]
    prompts = evaluation_prompts(ck, context)
    assert report["prompts"] == len(prompts) == 4 and report["steps"] == STEPS
    tensors = load_file(ck / "model.safetensors")
    weight = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"]).double()
    sessions = {}

    def float_head(filename, feeds):
        if filename.startswith("lm_head"):
            hidden = torch.from_numpy(feeds["hidden_states"].astype(np.float64))
            return {"logits": (hidden @ weight.T).numpy()}
        sess = sessions.setdefault(filename, session(fp32, filename))
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))

    def capturing(run, calls):
        def runner(filename, feeds):
            out = run(filename, feeds)
            if filename.startswith("lm_head"):
                calls.append(out["logits"][0])
            return out
        return runner

    phases = {"prefill": ([], [], []), "decode": ([], [], [])}  # expected, actual, next token
    for i, ids in enumerate(prompts):
        following = [t for p in prompts[i + 1:] + prompts[:i + 1] for t in p][:STEPS]
        logits = {}
        for name, f, run in (("ref", fp32, float_head), ("got", folder, graph_runner(folder))):
            calls = []
            run_pipeline(f, ids, STEPS, forced=following[:STEPS - 1] + [0],
                         runner=capturing(run, calls))
            prefill = np.concatenate(calls[:-(STEPS - 1)])[:len(ids)][-PROMPT_POSITIONS:]
            logits[name] = (prefill, np.stack([c[0] for c in calls[-(STEPS - 1):]]))
        targets = ((ids[1:] + following[:1])[-PROMPT_POSITIONS:], following[1:])
        for phase, k in (("prefill", 0), ("decode", 1)):
            phases[phase][0].append(logits["ref"][k])
            phases[phase][1].append(logits["got"][k])
            phases[phase][2].append(targets[k])
    for phase, (expected, actual, targets) in phases.items():
        e = torch.tensor(np.concatenate(expected), dtype=torch.float64)
        a = torch.tensor(np.concatenate(actual), dtype=torch.float64)
        t = torch.tensor(np.concatenate(targets))
        cos = torch.nn.functional.cosine_similarity(e, a, dim=-1)
        top1 = (e.argmax(-1) == a.argmax(-1)).double().mean().item()
        kl = torch.nn.functional.kl_div(torch.log_softmax(a, -1), torch.log_softmax(e, -1),
                                        log_target=True, reduction="none").sum(-1)
        ppl = {name: torch.exp(torch.nn.functional.cross_entropy(x, t)).item()
               for name, x in (("float", e), ("quantized", a))}
        got = report[phase]
        print(f"{arch} {phase}: report {got}; here cosine {cos.mean().item():.6f} "
              f"(min {cos.min().item():.6f}), top-1 {top1:.3f}, KL {kl.mean().item():.3e}, "
              f"perplexity {ppl}")
        assert got["positions"] == len(e) == (
            sum(min(len(p), PROMPT_POSITIONS) for p in prompts) if phase == "prefill"
            else len(prompts) * (STEPS - 1))
        # the fp32 build masks attention as float graphs do and keeps an fp16 KV cache, the
        # report's reference (the float layers calibration ran) the calibrated graphs' relative
        # mask and a float one: the figures agree closely, not to the last digit (compare()
        # itself: the test below). Measured: the two references' float perplexities 1.4e-4
        # apart, and at w8a16's KL of a few 1e-6 that difference is a third of it
        assert abs(got["mean_cosine"] - cos.mean().item()) < 1e-5
        assert abs(got["min_cosine"] - cos.min().item()) < 1e-4
        assert abs(got["top1_agreement"] - top1) <= 1 / len(e)
        assert abs(got["mean_kl"] - kl.mean().item()) < 0.2 * kl.mean().item() + 2e-6
        assert got["float_perplexity"] == pytest.approx(ppl["float"], rel=3e-4)
        assert got["perplexity"] == pytest.approx(ppl["quantized"], rel=perplexity_rel)
        assert got["mean_cosine"] >= 0.999 and got["top1_agreement"] >= 0.9  # clear winners


