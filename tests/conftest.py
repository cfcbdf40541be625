"""Shared fixtures: tiny random checkpoints (made once per session) and their builds."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import FAMILIES, HYBRIDS, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def qwen3_checkpoint(tmp_path_factory) -> Path:
    """Qwen3: tied embeddings, head_dim 32 != hidden/heads, q/k norm, GQA 4:2, sharded."""
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "qwen3", "qwen3", shard=True)


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory) -> Path:
    """Llama: untied lm_head, llama3 rope scaling, GQA 8:2, one file."""
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "llama", "llama")


@pytest.fixture(scope="session")
def checkpoints(qwen3_checkpoint, llama_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Every tiny variant: the two above, Mistral (MQA 2:1, an 8-token sliding window), the
    Phi-3 family (fused qkv/gate_up; LongRoPE crossing its original context; partial rotary),
    the mixtures of experts (Qwen3-MoE with a dense layer, or every other layer sparse and
    top 3 unnormalized; Mixtral) and the architectures that state only their differences
    (Qwen2, Gemma 2 and 3 (sharded), SmolLM3, Granite, OLMo 2), the families of LayerNorms,
    parallel blocks and MLPs without a gate (FAMILIES: see tests/checkpoints.py) and the hybrids
    (HYBRIDS: LFM2, Qwen3.5, Granite 4.0-H, and GPT-OSS)."""
    made = {name: make_checkpoint(tmp_path_factory.mktemp("ck") / name, name,
                                  shard=name == "gemma3")
            for name in ("mistral", "phi3", "phi3_longrope", "phi4mini", "qwen3_moe",
                         "qwen3_moe_step2", "mixtral", "qwen2", "gemma2", "gemma3", "smollm3",
                         "granite", "olmo2", *FAMILIES, "olmoe", "granitemoe", *HYBRIDS)}
    return {"qwen3": qwen3_checkpoint, "llama": llama_checkpoint, **made}


@pytest.fixture(scope="session")
def built(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """fp32 CPU builds of every checkpoint, made once through the public API."""
    from builder import BuildOptions, build

    out = {}
    for name, ck in checkpoints.items():
        out[name] = build(BuildOptions(model_name=str(ck),
                                       output=tmp_path_factory.mktemp("built") / name))
    return out


@pytest.fixture(scope="session")  # session: kept when other modules run between
def trained(tmp_path_factory):
    """Tiny Qwen3, Llama and Phi-3 checkpoints trained to have clear winners (a top-2 margin of
    several logits at every step: see checkpoints.train_previous_token), with their fp32 CPU
    builds. The tests that use them are in xdist_group "trained": one worker trains them."""
    from builder import BuildOptions, build

    folders = {arch: make_checkpoint(tmp_path_factory.mktemp("trained") / arch, arch,
                                     trained=True) for arch in ("qwen3", "llama", "phi3")}
    return {arch: (ck, build(BuildOptions(model_name=str(ck),
                                          output=tmp_path_factory.mktemp("fp32") / arch)))
            for arch, ck in folders.items()}


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m builder`` in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


@pytest.fixture
def copy_checkpoint(tmp_path):
    """Copy a checkpoint folder so a test can damage it."""
    def _copy(src: Path, name: str = "ck") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst
    return _copy
