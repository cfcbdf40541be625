"""fp32 CPU builds against Hugging Face transformers (eager, fp32) on the same checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from builder.testing import genai_greedy, max_abs_diff, run_decoder
from checkpoints import FAMILIES, HYBRIDS, hf_greedy, hf_logits

ARCHS = ["qwen3", "llama", "mistral", "phi3", "phi3_longrope", "phi4mini", "qwen3_moe",
         "qwen3_moe_step2", "mixtral", "qwen2", "gemma2", "gemma3", "smollm3", "granite",
         "olmo2", *FAMILIES, "olmoe", "granitemoe", *HYBRIDS]
PROMPT_LEN, STEPS, TOL = 12, 10, 1e-4


def _compare(run, ref, prompt_len: int, valid: np.ndarray) -> tuple[float, float]:
    """(max abs logit difference, top-1 agreement) over the valid positions of every step."""
    diffs, agree, total = [], 0, 0
    for b in range(ref.shape[0]):
        cols = np.flatnonzero(valid[b, :prompt_len])
        ours = [run.prefill_logits[b, cols]] + [s[b][None] for s in run.step_logits]
        theirs = [ref[b, cols]] + [ref[b, prompt_len + j][None] for j in range(len(run.step_logits))]
        for o, t in zip(ours, theirs):
            diffs.append(max_abs_diff(o, t))
            agree += int((o.argmax(-1) == t.argmax(-1)).sum())
            total += o.shape[0]
    return max(diffs), agree / total


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_match_transformers(arch, built, checkpoints):
    ids = np.random.default_rng(1).integers(3, 256, (1, PROMPT_LEN))
    run = run_decoder(built[arch], ids, steps=STEPS)
    ref = hf_logits(checkpoints[arch], run.tokens, run.attention_mask, PROMPT_LEN)
    diff, top1 = _compare(run, ref, PROMPT_LEN, run.attention_mask)
    print(f"{arch}: max abs logit diff {diff:.2e}, top-1 agreement {top1:.0%}, "
          f"logit scale {np.abs(ref).max():.2f}")
    assert diff <= TOL
    assert top1 == 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_matches_transformers(arch, built, checkpoints):
    rng = np.random.default_rng(2)
    ids = rng.integers(3, 256, (2, PROMPT_LEN))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0  # pad token
    run = run_decoder(built[arch], ids, mask, steps=STEPS)
    ref = hf_logits(checkpoints[arch], run.tokens, run.attention_mask, PROMPT_LEN)
    diff, top1 = _compare(run, ref, PROMPT_LEN, run.attention_mask)
    print(f"{arch} batch 2, left padded: max abs diff {diff:.2e}, top-1 {top1:.0%}")
    assert diff <= TOL
    assert top1 == 1.0
    # The padded row decodes exactly as it would alone, without padding; except under LongRoPE,
    # where (in transformers too) the switch to the long tables follows the padded length.
    if "longrope" not in (checkpoints[arch] / "config.json").read_text():
        alone = run_decoder(built[arch], ids[1:, 4:], steps=STEPS)
        assert (alone.tokens[0, PROMPT_LEN - 4:] == run.tokens[1, PROMPT_LEN:]).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_genai_greedy_generation_matches_transformers(arch, built, checkpoints):
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, 256, 9)]
    ours = genai_greedy(built[arch], prompt, 16)
    theirs = hf_greedy(checkpoints[arch], prompt, 16)
    assert len(ours) == len(prompt) + 16
    assert ours == theirs


@pytest.mark.parametrize("arch", ["phi3_longrope", "phi4mini"])
def test_longrope_prompt_longer_than_original_context(arch, built, checkpoints):
    """A 20-token prompt (> original_max_position_embeddings = 16) is prefilled with the long
    tables, as transformers does, and decoding goes on with them."""
    ids = np.random.default_rng(4).integers(3, 256, (1, 20))
    run = run_decoder(built[arch], ids, steps=6)
    ref = hf_logits(checkpoints[arch], run.tokens, run.attention_mask, 20)
    diff, top1 = _compare(run, ref, 20, run.attention_mask)
    assert diff <= TOL and top1 == 1.0
