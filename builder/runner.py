"""Run what the builder wrote, as onnxruntime-genai would: used by calibration and by tests."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder.package import read_genai_config


def session(model_dir: Path, filename: str = "model.onnx"):
    """An onnxruntime CPU session on one graph of a model folder. A QDQ graph's quantized
    weights are multiplied in float32: by default onnxruntime fuses a DequantizeLinear weight
    and its MatMul into MatMulNBits with 8-bit activations (accuracy level 4), an error the HTP,
    which multiplies 16-bit activations exactly, does not make (a w8a16 projection's output
    was 93 of its 65536 steps off)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(str(Path(model_dir) / filename), opts,
                                providers=["CPUExecutionProvider"])


def graph_runner(model_dir: Path):
    """``run(filename, feeds) -> {output name: value}`` on onnxruntime's CPU EP, one session per
    graph of the folder, made on first use."""
    sessions: dict[str, object] = {}

    def run(filename, feeds):
        if filename not in sessions:
            sessions[filename] = session(model_dir, filename)
        sess = sessions[filename]
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))

    return run


@dataclass
class PipelineRun:
    step_logits: list[np.ndarray]     # [V] per generated token: the prompt's last, then each step
    tokens: list[int]                 # greedy tokens (or the forced ones)


def buffers(model_dir: Path, stages: list[dict]) -> dict[str, np.ndarray]:
    """Each buffer the runtime keeps between calls, zeroed as onnxruntime-genai allocates it:
    the KV cache (float16, or uint8 in an 8-bit-KV folder) and the other layers' states
    (``past.<layer>.<state>``), with the shape and element type of the graph input that takes
    it (batch 1)."""
    import onnx
    from onnx import helper

    kept = {}
    for spec in stages:
        graph = onnx.load(str(model_dir / spec["filename"]), load_external_data=False).graph
        for v in graph.input:
            if v.name.startswith(("past_key_", "past_value_", "past.")):
                t = v.type.tensor_type
                shape = [d.dim_value or 1 for d in t.shape.dim]
                kept[v.name] = np.zeros(shape, helper.tensor_dtype_to_np_dtype(t.elem_type))
    return kept


def presents(decoder: dict) -> Callable[[str], str]:
    """The output that becomes each past buffer at the next call, paired as onnxruntime-genai
    pairs them: by genai_config.json's name templates (``past_<x>_names`` → the same layer's
    ``present_<x>_names``), so no naming rule is stated twice."""
    pairs = []
    for key, template in decoder["inputs"].items():
        if key.startswith("past_") and key.endswith("_names"):
            pattern = re.compile(re.escape(template).replace("%d", r"(\d+)") + "$")
            pairs.append((pattern, decoder["outputs"]["present_" + key.removeprefix("past_")]))

    def present(past: str) -> str:
        for pattern, output in pairs:
            match = pattern.match(past)
            if match:
                return output % int(match.group(1))
        raise KeyError(f"{past}: no past_*_names template in genai_config.json names it")
    return present


def run_pipeline(model_dir: Path, prompt: list[int], steps: int,
                 forced: list[int] | None = None, runner=None) -> PipelineRun:
    """Drive a static decoder-pipeline folder as onnxruntime-genai does: the prompt in chunks of
    P (the last padded at its end), past_seq_len = row of each call's last token, one shared KV
    buffer per attention layer (and the other layers' states), then one token per step. Each
    call runs the stages of genai_config.json in order (those marked for the prompt, or for
    token generation), each fed by name from the call's inputs and the earlier stages' outputs
    (the embeddings graph's chunk mask too); the presents become the next call's pasts.
    ``runner(filename, feeds) -> outputs`` runs one graph (default: onnxruntime's CPU EP)."""
    cfg = read_genai_config(Path(model_dir))["model"]
    dec = cfg["decoder"]
    window, context = dec["sliding_window"]["window_size"], cfg["context_length"]
    stages = [spec for s in dec["pipeline"] for spec in s.values()]
    run = runner or graph_runner(model_dir)

    cache = buffers(Path(model_dir), stages)
    present = presents(dec)

    def call(ids, last_row, phase):
        values = {"input_ids": np.asarray([ids], np.int64),
                  "past_seq_len": np.array([[last_row]], np.int32),
                  "total_seq_len": np.array([context], np.int32), **cache}
        for spec in stages:
            if spec["run_on_prompt" if phase == "prompt" else "run_on_token_gen"]:
                out = run(spec["filename"], {name: values[name] for name in spec["inputs"]})
                values.update((name, out[name]) for name in spec["outputs"])
        for key in cache:
            cache[key] = values[present(key)]
        return values["logits"][0]

    pad = cfg["pad_token_id"]
    padded = -(-len(prompt) // window) * window
    ids = list(prompt) + [pad] * (padded - len(prompt))
    for k in range(0, padded, window):
        logits = call(ids[k:k + window], k + window - 1, "prompt")
    logits = [logits[len(prompt) - 1 - (padded - window)].astype(np.float32)]
    tokens = []
    for step in range(steps):
        nxt = int(logits[-1].argmax()) if forced is None else forced[step]
        tokens.append(nxt)
        if step == steps - 1:
            break
        logits.append(call([nxt], len(prompt) + step, "token")[0].astype(np.float32))
    return PipelineRun(logits, tokens)


