"""What quantization cost: the calibrated QNN pipeline against the float one it was made from.

Before calibration the float pipeline runs held-out prompts (``evaluation_prompts.txt``, none of
them a calibration prompt) greedily; after it, the quantized pipeline runs the same prompts fed
the float pipeline's tokens, so that both are compared at the same positions. Per position: the
cosine of the two logit vectors, whether their top-1 tokens agree, and the KL divergence of the
quantized model's next-token distribution from the float one's (nats). The float model is the
float transformer graphs the build wrote, with lm_head computed in fp32 from the checkpoint's
weight (the build's lm_head graphs hold int8 weights from the start), so the figures include
what lm_head's int8 weights cost. "prefill" is the logits
of each prompt's last token (the prefill graph), "decode" those of the generated steps (the
decode graph). The figures go into build_manifest.json and one log line.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from builder.quant.calibration import tokenize
from builder.runner import PipelineRun, graph_runner, run_pipeline

logger = logging.getLogger(__name__)

EVALUATION_PROMPTS = Path(__file__).with_name("evaluation_prompts.txt")
SAMPLES = 4   # held-out prompts
STEPS = 8     # greedy steps each: 1 prefill position and 7 decode positions per prompt


def evaluation_prompts(tokenizer_dir: Path, context: int) -> list[list[int]]:
    return tokenize(EVALUATION_PROMPTS, SAMPLES, tokenizer_dir, max(1, context - STEPS - 1))


def reference(folder: Path, prompts: list[list[int]], lm_head: np.ndarray) -> list[PipelineRun]:
    """The float model's greedy runs: the float transformer graphs the build wrote (run before
    they are quantized) and lm_head in fp32 from the checkpoint's weight [vocab, hidden]."""
    graphs = graph_runner(folder)

    def runner(filename, feeds):
        if filename.startswith("lm_head"):
            return {"logits": float_logits(feeds["hidden_states"], lm_head)}
        return graphs(filename, feeds)

    return [run_pipeline(folder, ids, STEPS, runner=runner) for ids in prompts]


def float_logits(hidden: np.ndarray, weight: np.ndarray, rows: int = 8192) -> np.ndarray:
    """hidden [1, S, H] times weight [V, H] transposed, in fp32, a slice of the vocabulary at a
    time (no fp32 copy of the whole table)."""
    h = hidden[0].astype(np.float32)
    out = np.empty((h.shape[0], weight.shape[0]), np.float32)
    for start in range(0, weight.shape[0], rows):
        out[:, start:start + rows] = h @ weight[start:start + rows].astype(np.float32).T
    return out[None]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare(expected: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Cosine, top-1 agreement and KL(expected || actual) of [N, V] logits, over the N rows."""
    e, a = expected.astype(np.float64), actual.astype(np.float64)
    cosine = (e * a).sum(-1) / np.maximum(np.linalg.norm(e, axis=-1) * np.linalg.norm(a, axis=-1),
                                          1e-30)
    log_p, log_q = log_softmax(e), log_softmax(a)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    return {"positions": int(len(e)), "mean_cosine": float(cosine.mean()),
            "min_cosine": float(cosine.min()),
            "top1_agreement": float((e.argmax(-1) == a.argmax(-1)).mean()),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max())}


def accuracy_report(folder: Path, prompts: list[list[int]], float_runs: list[PipelineRun],
                    label: str) -> dict:
    """The quantized pipeline in ``folder`` against ``float_runs``, prefill and decode."""
    quantized = [run_pipeline(folder, ids, STEPS, forced=ref.tokens)
                 for ids, ref in zip(prompts, float_runs)]
    phases = {}
    for phase, rows in (("prefill", slice(0, 1)), ("decode", slice(1, None))):
        expected = np.stack([x for r in float_runs for x in r.step_logits[rows]])
        actual = np.stack([x for r in quantized for x in r.step_logits[rows]])
        phases[phase] = compare(expected, actual)
    report = {"against": "the float model: the transformer graphs the build wrote before "
                         "calibration, lm_head in fp32 from the checkpoint",
              "precision": label, "prompts": len(prompts), "steps": STEPS,
              "source": EVALUATION_PROMPTS.name, **phases}
    logger.info("accuracy of %s against float on %d held-out prompts: %s", label, len(prompts),
                "; ".join(f"{phase} cosine {m['mean_cosine']:.6f} (min {m['min_cosine']:.6f}), "
                          f"top-1 {100 * m['top1_agreement']:.1f}%, KL {m['mean_kl']:.2e}"
                          for phase, m in phases.items()))
    return report
