"""Helpers for tests of the core and of plugins: run a built decoder with onnxruntime, and the
transformers references to compare it with (``hf_model``, ``hf_logits``, ``hf_greedy``).

torch and transformers are imported by those three functions only, when called: they stay
test-only dependencies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder.package import read_genai_config
from builder.runner import PipelineRun, presents, run_pipeline, session

__all__ = ["DecodeRun", "PipelineRun", "QnnRun", "genai_greedy", "hf_greedy", "hf_logits",
           "hf_model", "max_abs_diff", "run_decoder", "run_on_qnn", "run_pipeline",
           "run_pipeline_on_qnn", "session"]


@dataclass
class DecodeRun:
    """Logits of a prefill and of each decode step, and the tokens that were fed."""

    prefill_logits: np.ndarray         # [B, S, V]
    step_logits: list[np.ndarray]      # each [B, V]
    tokens: np.ndarray                 # [B, S + steps]: prompt, then the decoded tokens
    attention_mask: np.ndarray         # [B, S + steps]




def _initial_states(model_dir: Path, sess, batch: int) -> dict[str, np.ndarray]:
    """Zeros for every state input of a decoder session: the KV cache (``past_key_values.*``,
    [batch, kv heads, 0, head size] as genai_config.json gives them: other builders name the
    last dimension symbolically) and the states of layers of other kinds
    (``past.{i}.{name}``, their fixed shape)."""
    decoder = read_genai_config(Path(model_dir))["model"]["decoder"]
    kv = [batch, decoder["num_key_value_heads"], 0, decoder["head_size"]]
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    return {i.name: np.zeros(kv if i.name.startswith("past_key_values.") else
                             [batch if d == "batch_size" else d for d in i.shape], types[i.type])
            for i in sess.get_inputs() if i.name.startswith("past")}


def run_decoder(model_dir: Path, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                steps: int = 8, forced: np.ndarray | None = None,
                adapter: Path | None = None) -> DecodeRun:
    """Prefill ``input_ids`` then decode ``steps`` tokens with the KV cache (and the states of
    layers of other kinds).

    Decoded tokens are greedy, or ``forced[:, j]`` at step j when given. ``adapter``: a LoRA
    adapter file (``adapters/<name>.onnx_adapter``) active in every run.
    """
    options = None
    if adapter is not None:
        import onnxruntime as ort

        lora = ort.LoraAdapter()
        lora.Load(str(adapter))
        options = ort.RunOptions()
        options.add_active_adapter(lora)
    sess = session(model_dir)
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    batch = ids.shape[0]
    past = _initial_states(model_dir, sess, batch)
    present = presents(read_genai_config(Path(model_dir))["model"]["decoder"])
    out_names = [o.name for o in sess.get_outputs()]
    feed_ids, tokens, steps_out, prefill = ids, [ids], [], None
    for step in range(steps + 1):
        outs = dict(zip(out_names, sess.run(None, {"input_ids": feed_ids,
                                                    "attention_mask": mask, **past}, options)))
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
        past = {name: outs[present(name)] for name in past}
    return DecodeRun(prefill, steps_out, np.concatenate(tokens, axis=1), mask)


def held_out_kl(checkpoint: Path, reference: Path, model_dir: Path, prompts: int = 16) -> float:
    """Mean KL of ``model_dir``'s next-token distributions from ``reference``'s at every position
    of the held-out prompts (the first ``prompts`` of builder's evaluation prompts, 64 tokens at
    most, tokenized with ``checkpoint``'s tokenizer), each prefilled alone."""
    from builder.quant.calibration import tokenize
    from builder.quant.report import EVALUATION_PROMPTS, compare

    ids = tokenize(EVALUATION_PROMPTS, prompts, checkpoint, 64)

    def logits(folder):
        return np.concatenate([run_decoder(folder, np.array([p]), steps=0).prefill_logits[0]
                               for p in ids])
    return compare(logits(reference), logits(model_dir))["mean_kl"]


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


QNN_OPTIONS = {"backend_type": "htp", "soc_model": "60", "htp_arch": "73"}

_QNN_RUNNER = r"""
import json, sys
import numpy as np, onnxruntime as ort, onnxruntime_qnn
model, feeds_path, out_path, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
so = ort.SessionOptions()
so.add_provider_for_devices(devices, options)
so.log_severity_level = 0
sess = ort.InferenceSession(model, so)
sess.disable_fallback()  # a failing QNN graph must fail, not rerun on CPU
feeds = dict(np.load(feeds_path))
names = [o.name for o in sess.get_outputs()]
np.savez(out_path, **dict(zip(names, sess.run(None, feeds))))
"""


@dataclass
class QnnRun:
    outputs: dict[str, np.ndarray]
    placed: dict[str, int]          # execution provider → number of (fused) nodes
    cpu_nodes: list[str]            # "OpType name" of every node left on CPU
    log: str = ""                   # the session's verbose log (the QNN graph's tensors)

    def weight_encodings(self) -> dict[str, str]:
        """{static tensor name: its QNN quantization encoding}, as the EP logs the graph it
        gives QNN (e.g. QNN_QUANTIZATION_ENCODING_BLOCKWISE_EXPANSION for an LPBQ weight)."""
        import re

        return dict(re.findall(r" name=(\S+) .*?type=QNN_TENSOR_TYPE_STATIC .*?"
                               r"quantizationEncoding=(\w+)", self.log))


def run_on_qnn(model: Path, feeds: dict[str, np.ndarray], options: dict | None = None,
               timeout: int = 600) -> QnnRun:
    """Run one session on the QNN HTP backend (simulated on x86) in a subprocess, since a
    simulator crash kills its process; placement is read from onnxruntime's verbose log."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        feeds_path, out_path = Path(tmp) / "feeds.npz", Path(tmp) / "out.npz"
        np.savez(feeds_path, **feeds)
        r = subprocess.run([sys.executable, "-c", _QNN_RUNNER, str(model), str(feeds_path),
                            str(out_path), json.dumps(options or QNN_OPTIONS)],
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"QNN session failed ({r.returncode}):\n{r.stderr[-3000:]}")
        outputs = dict(np.load(out_path))
    return QnnRun(outputs, *_placements(r.stderr), r.stderr)


def _placements(log: str) -> tuple[dict[str, int], list[str]]:
    import re

    placed: dict[str, int] = {}
    cpu_nodes: list[str] = []
    lines = log.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"placed on \[(\w+)\]\. Number of nodes: (\d+)", line)
        if not m:
            continue
        placed[m.group(1)] = placed.get(m.group(1), 0) + int(m.group(2))
        if m.group(1) == "CPUExecutionProvider":
            for follow in lines[i + 1: i + 1 + int(m.group(2))]:
                cpu_nodes.append(follow.split("]", 1)[-1].strip())
    return placed, cpu_nodes


_QNN_PIPELINE_RUNNER = r"""
import json, sys
from pathlib import Path
import numpy as np, onnxruntime as ort, onnxruntime_qnn
from builder.testing import run_pipeline, session
model_dir, prompt, steps, forced, options, out = (Path(sys.argv[1]), json.loads(sys.argv[2]),
    int(sys.argv[3]), json.loads(sys.argv[4]), json.loads(sys.argv[5]), sys.argv[6])
ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
sessions = {}
def runner(filename, feeds):
    if filename not in sessions:
        if filename == "embeddings.onnx":
            sessions[filename] = session(model_dir, filename)
        else:
            so = ort.SessionOptions()
            so.add_provider_for_devices(devices, options)
            so.log_severity_level = 3
            sessions[filename] = ort.InferenceSession(str(model_dir / filename), so)
            sessions[filename].disable_fallback()
    sess = sessions[filename]
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
run = run_pipeline(model_dir, prompt, steps, forced, runner)
np.savez(out, logits=np.stack(run.step_logits), tokens=np.array(run.tokens))
"""


def run_pipeline_on_qnn(model_dir: Path, prompt: list[int], steps: int,
                        forced: list[int] | None = None, options: dict | None = None,
                        timeout: int = 900) -> PipelineRun:
    """run_pipeline with every graph but the embeddings on the QNN HTP (simulated), in a
    subprocess."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.npz"
        r = subprocess.run([sys.executable, "-c", _QNN_PIPELINE_RUNNER, str(model_dir),
                            json.dumps(prompt), str(steps), json.dumps(forced),
                            json.dumps(options or QNN_OPTIONS), str(out)],
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"QNN pipeline failed ({r.returncode}):\n{r.stderr[-3000:]}")
        data = np.load(out)
        return PipelineRun(list(data["logits"]), [int(t) for t in data["tokens"]])


# -- the transformers references (torch imported when called) ------------------------------
def hf_model(folder: Path, **config_overrides):
    """transformers' model of a checkpoint folder, fp32, eager attention, in eval mode."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", **config_overrides)
    return model.eval()


def hf_logits(folder: Path | None, tokens: np.ndarray, mask: np.ndarray, prompt_len: int,
              num_hidden_layers: int | None = None, model=None) -> np.ndarray:
    """Logits [B, T, V]: a prefill of ``prompt_len`` tokens, then one cached step per token, with
    positions from the mask, as generate() computes them. Stepping matters for LongRoPE, whose
    tables depend on the length reached by each forward call. ``model``: an already loaded
    (possibly modified) transformers model instead of ``folder``'s."""
    import torch

    kwargs = {} if num_hidden_layers is None else {"num_hidden_layers": num_hidden_layers}
    model = model if model is not None else hf_model(folder, **kwargs)
    ids = torch.from_numpy(np.asarray(tokens, np.int64))
    m = torch.from_numpy(np.asarray(mask, np.int64))
    pos = (m.cumsum(-1) - 1).clamp(min=0)
    out, cache = [], None
    bounds = [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, ids.shape[1])]
    with torch.no_grad():
        for a, b in bounds:
            r = model(input_ids=ids[:, a:b], attention_mask=m[:, :b], position_ids=pos[:, a:b],
                      past_key_values=cache, use_cache=True)
            cache = r.past_key_values
            out.append(r.logits)
    return torch.cat(out, dim=1).numpy()


def hf_greedy(folder: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' generate(), greedy.

    Under LongRoPE, Phi-3's generate() throws the KV cache away once the sequence crosses the
    original context and re-runs the whole prefix with the long tables; an exported decoder (ours
    and onnxruntime-genai's) keeps its cache. For those checkpoints the reference is therefore a
    greedy loop over the model's own cached forward, which is what the exported graph computes.
    """
    import torch

    model = hf_model(folder)
    ids = torch.tensor([prompt])
    if "longrope" not in (folder / "config.json").read_text():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return out[0].tolist()
    tokens, cache, feed = list(prompt), None, ids
    with torch.no_grad():
        for _ in range(new_tokens):
            r = model(input_ids=feed, past_key_values=cache, use_cache=True)
            cache = r.past_key_values
            tokens.append(int(r.logits[0, -1].argmax()))
            feed = torch.tensor([[tokens[-1]]])
    return tokens
