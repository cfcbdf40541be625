"""Rotary caches against transformers' own inverse-frequency functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from builder.config import DecoderConfig
from builder.ops import rope_cache
from checkpoints import TINY


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "linear", "factor": 4.0},
])
def test_scaled_inverse_frequencies_match_transformers(rope):
    import transformers

    spec = {k: v for k, v in TINY["llama"].items() if k not in ("arch", "config")}
    spec["rope_scaling"] = rope
    hf = transformers.LlamaConfig(**spec, architectures=["LlamaForCausalLM"])
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
    assert scale == 1.0
    ours = rope_cache(DecoderConfig.from_hf(hf.to_dict()).rope, hf.head_dim, 64)
    positions = torch.arange(64, dtype=torch.float32)[:, None] * inv_freq[None, :].float()
    np.testing.assert_allclose(ours.cos, positions.cos().numpy(), atol=1e-6)
    np.testing.assert_allclose(ours.sin, positions.sin().numpy(), atol=1e-6)
    default = rope_cache(DecoderConfig.from_hf({**hf.to_dict(), "rope_parameters": None,
                                                 "rope_scaling": None}).rope, hf.head_dim, 64)
    assert np.abs(default.cos - ours.cos).max() > 0.1  # the scaling really changes the table


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
     "truncate": False, "original_max_position_embeddings": 4096},  # GPT-OSS's
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    {"rope_type": "yarn", "factor": 8.0, "mscale": 1.0, "mscale_all_dim": 0.5,
     "original_max_position_embeddings": 256},
])
def test_yarn_matches_transformers(rope):
    """YaRN's blended frequencies and attention factor (the tables' scale), truncated ramp or
    not, as transformers computes them (GPT-OSS's head_dim 64, theta 150000)."""
    import transformers

    hf = transformers.GptOssConfig(head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                                   hidden_size=256,
                                   max_position_embeddings=131072,
                                   rope_parameters={**rope, "rope_theta": 150000.0})
    inv_freq, scale = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    ours = rope_cache(DecoderConfig.from_hf({**hf.to_dict(), "architectures": ["x"]}).rope,
                      64, 512, 131072)
    angles = torch.arange(512, dtype=torch.float32)[:, None] * inv_freq[None, :].float()
    # (a frequency one float32 ulp off, ~1e-7 relative, times 512 positions: 2e-5)
    np.testing.assert_allclose(ours.cos, (angles.cos() * scale).numpy(), atol=5e-5)
    np.testing.assert_allclose(ours.sin, (angles.sin() * scale).numpy(), atol=5e-5)
    assert scale > 1.0
    plain = rope_cache(DecoderConfig.from_hf({**hf.to_dict(), "architectures": ["x"],
                                              "rope_parameters": {"rope_theta": 150000.0}}
                                             ).rope, 64, 512)
    assert np.abs(plain.cos - ours.cos).max() > 0.1  # the scaling really changes the table


def test_old_style_rope_keys():
    cfg = DecoderConfig.from_hf({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 8,
        "hidden_size": 32,
        "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "rope_theta": 1234.0, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (cfg.rope.theta, cfg.rope.type, cfg.rope.params) == (1234.0, "linear", {"factor": 2.0})
    assert cfg.head_dim == 16 and cfg.num_key_value_heads == 2


def test_a_partial_rotary_the_fused_op_cannot_take(tmp_path):
    """40 rotary dims of 64 (not a multiple of 16, as GPT-NeoX-20B's 24 and Pythia-2.8B's 20):
    GroupQueryAttention's fused rotary refuses the tables at the first run, so the build uses
    RotaryEmbedding ops; a left-padded batch against transformers, and onnxruntime-genai's
    greedy tokens (the run check passes too)."""
    from builder import BuildOptions, build
    from builder.testing import genai_greedy, hf_greedy, hf_logits, run_decoder
    from checkpoints import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck", "phi3", partial_rotary_factor=0.625,
                         num_attention_heads=2, num_key_value_heads=1)
    out = build(BuildOptions(model_name=str(ck), output=tmp_path / "out"))
    ids = np.array([[3, 5, 7, 9, 11, 13], [0, 0, 7, 9, 11, 13]])
    mask = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]])
    ours = run_decoder(out, ids, mask, steps=0).prefill_logits
    ref = hf_logits(ck, ids, mask, 6)
    assert np.abs(ours - ref)[mask.astype(bool)].max() < 1e-4
    prompt = [3, 5, 7, 9, 11, 13]
    assert genai_greedy(out, prompt, 5) == hf_greedy(ck, prompt, 5)
