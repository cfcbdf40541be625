"""Helpers for tests of the core and of plugins: run a built decoder with onnxruntime.

Nothing here imports torch or transformers; reference outputs are the caller's business.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class DecodeRun:
    """Logits of a prefill and of each decode step, and the tokens that were fed."""

    prefill_logits: np.ndarray         # [B, S, V]
    step_logits: list[np.ndarray]      # each [B, V]
    tokens: np.ndarray                 # [B, S + steps]: prompt, then the decoded tokens
    attention_mask: np.ndarray         # [B, S + steps]


def session(model_dir: Path, filename: str = "model.onnx"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(Path(model_dir) / filename), opts,
                                providers=["CPUExecutionProvider"])


def _kv_spec(model_dir: Path) -> tuple[int, int, int]:
    decoder = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["decoder"]
    return decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]


def run_decoder(model_dir: Path, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                steps: int = 8, forced: np.ndarray | None = None) -> DecodeRun:
    """Prefill ``input_ids`` then decode ``steps`` tokens with the KV cache.

    Decoded tokens are greedy, or ``forced[:, j]`` at step j when given.
    """
    sess = session(model_dir)
    layers, kv_heads, head_dim = _kv_spec(model_dir)
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    batch = ids.shape[0]
    kv_type = {"tensor(float)": np.float32, "tensor(float16)": np.float16}[
        next(i.type for i in sess.get_inputs() if i.name.startswith("past_key_values"))]
    past = {f"past_key_values.{i}.{k}": np.zeros((batch, kv_heads, 0, head_dim), kv_type)
            for i in range(layers) for k in ("key", "value")}
    out_names = [o.name for o in sess.get_outputs()]
    feed_ids, tokens, steps_out, prefill = ids, [ids], [], None
    for step in range(steps + 1):
        outs = dict(zip(out_names, sess.run(None, {"input_ids": feed_ids,
                                                    "attention_mask": mask, **past})))
        logits = outs["logits"]
        if step == 0:
            prefill = logits
        else:
            steps_out.append(logits[:, -1])
        if step == steps:
            break
        nxt = logits[:, -1].argmax(-1) if forced is None else forced[:, step]
        feed_ids = np.asarray(nxt, np.int64).reshape(batch, 1)
        tokens.append(feed_ids)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        past = {f"past_key_values.{i}.{k}": outs[f"present.{i}.{k}"]
                for i in range(layers) for k in ("key", "value")}
    return DecodeRun(prefill, steps_out, np.concatenate(tokens, axis=1), mask)


def genai_greedy(model_dir: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy generation through onnxruntime-genai; returns prompt + generated ids."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    length = len(prompt) + new_tokens
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
