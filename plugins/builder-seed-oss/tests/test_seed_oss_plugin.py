"""The plugin, tested as its users would: installed, found through its entry point, and
checked against Hugging Face transformers on a tiny random checkpoint."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from builder import BuildOptions, build
from builder.plugins import load_plugins
from builder.testing import genai_greedy, hf_greedy, hf_logits, max_abs_diff, run_decoder


@pytest.fixture(scope="session", params=[(True, False), (False, True)],
                ids=["qkv-bias", "o-bias"])  # session: kept when other modules run between
def seed_oss_checkpoint(request, tmp_path_factory):
    """Biases on q/k/v only (the released models), or on o_proj only: each switch binds."""
    qkv, out = request.param
    folder = tmp_path_factory.mktemp("seed_oss")
    config = transformers.SeedOssConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        attention_bias=qkv, attention_out_bias=out, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.SeedOssForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)  # biases too: a plugin that dropped them would fail parity
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def test_found_through_its_entry_point():
    plugins = load_plugins()
    assert plugins.architectures.owner("SeedOssForCausalLM") == "seed_oss"


def test_parity_with_transformers(seed_oss_checkpoint, tmp_path):
    out = build(BuildOptions(model_name=str(seed_oss_checkpoint), output=tmp_path / "out"))
    ids = np.random.default_rng(0).integers(3, 256, (1, 10))
    run = run_decoder(out, ids, steps=8)
    ref = hf_logits(seed_oss_checkpoint, run.tokens, run.attention_mask, 10)  # prefill, steps
    assert max_abs_diff(run.prefill_logits, ref[:, :10]) <= 1e-4
    for j, step in enumerate(run.step_logits):
        assert max_abs_diff(step, ref[:, 10 + j]) <= 1e-4
    prompt = [int(t) for t in ids[0]]
    assert genai_greedy(out, prompt, 8) == hf_greedy(seed_oss_checkpoint, prompt, 8)


def test_cli_builds_with_the_plugin(seed_oss_checkpoint, tmp_path):
    r = subprocess.run([sys.executable, "-m", "builder", "-m", str(seed_oss_checkpoint),
                        "-o", str(tmp_path / "cli")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "SeedOssBuilder (seed_oss)" in r.stderr
