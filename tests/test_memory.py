"""The build's peak memory, estimated from the shapes before anything is allocated: refused
when it exceeds the memory available, naming the option; and the estimate against measured
peaks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from builder import BuildOptions, ExtraOptions
from builder.config import DecoderConfig
from builder.errors import OptionError
from builder.memory import MIB, check_memory, estimate
from builder.models import Qwen3Builder
from conftest import ROOT
from test_bad_input import refused


def _qwen3_06b() -> DecoderConfig:
    """Qwen3-0.6B's config.json."""
    return DecoderConfig.from_hf({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
        "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "tie_word_embeddings": True, "hidden_act": "silu"})


def _options(precision, *items):
    return BuildOptions(model_name="x", output="o", precision=precision,
                        extra=ExtraOptions.parse(list(items), []))


def test_an_absurd_prefill_length_is_refused_before_anything_is_allocated(
        capsys, tmp_path, copy_checkpoint, qwen3_checkpoint):
    ck = copy_checkpoint(qwen3_checkpoint)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["max_position_embeddings"] = 131072
    (ck / "config.json").write_text(json.dumps(cfg))
    refused(capsys, tmp_path, ["-m", ck, "-e", "qnn", "-p", "w8a16", "--extra_options",
                               "qnn_prefill_length=100000", "qnn_context_length=131072"],
            "this build would need about", "(attention scores: ",
            "the prefill length (qnn_prefill_length=100000) and context "
            "(qnn_context_length=131072) set it: make them smaller")


def test_the_estimate_names_what_sets_it():
    """0.6B's mission build at the defaults fits a small machine; at P 100000 it does not."""
    config = _qwen3_06b()
    mission = _options("w4a16", "qnn_context_length=2048")
    parts = check_memory(mission, config, Qwen3Builder, True, free=2048 * MIB)
    assert parts["total"] < 2048 * MIB and parts["attention scores"] == 4 * 16 * 64 * 2048 * 4
    with pytest.raises(OptionError, match=r"more than the 2,048 MiB available; the prefill "
                                          r"length \(qnn_prefill_length=4096\)"):
        check_memory(_options("w4a16", "qnn_prefill_length=4096", "qnn_context_length=8192"),
                     config, Qwen3Builder, True, free=2048 * MIB)
    # a cpu build that does not run the layers holds no activations
    assert "attention scores" not in estimate(_options("int4"), config, Qwen3Builder, False)
    gptq = estimate(_options("int4", "int4_algo_config=gptq"), config, Qwen3Builder, False)
    assert gptq["attention scores"] == 4 * 16 * 64 * 512 * 4
    # GPTQ's Hessians (hidden^2, heads x head_dim^2, intermediate^2) and the largest's factor:
    # in the default w4a16 build (gptq_mixed), not in rtn_mixed's
    assert gptq["GPTQ Hessians"] == parts["GPTQ Hessians"] == 4 * (
        1024 ** 2 + 2048 ** 2 + 2 * 3072 ** 2)
    assert "GPTQ Hessians" not in estimate(_options("w4a16", "int4_algo_config=rtn_mixed",
                                                    "qnn_context_length=2048"),
                                           config, Qwen3Builder, True)


@pytest.mark.parametrize("flags", [[], ["-e", "qnn", "-p", "w8a16"]], ids=["cpu", "qnn"])
def test_the_estimate_against_the_measured_peak(tmp_path, qwen3_checkpoint, flags):
    """The tiny builds' measured peak (the manifest's stages) within the estimate's 0.5-1.5x
    (the 0.6B shape: benchmarks/build_benchmark.py, README)."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "builder", "-m", str(qwen3_checkpoint), "-o",
                        str(out), *flags], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((out / "build_manifest.json").read_text())
    measured = max(s["peak_rss_mb"] for s in manifest["stages"])
    estimated = manifest["memory_estimate"]["total"] / MIB
    assert 0.5 * estimated <= measured <= 1.5 * estimated, (measured, estimated)
