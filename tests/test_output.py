"""Safe output: staging beside the target, atomic replacement, the manifest."""

from __future__ import annotations

import json

import pytest

from builder import BuildOptions, build
from builder.errors import BuilderError, OutputError
from builder.output import StagedOutput


def test_failed_build_keeps_previous_good_output(tmp_path, llama_checkpoint, copy_checkpoint):
    out = tmp_path / "out"
    build(BuildOptions(model_name=str(llama_checkpoint), output=out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = copy_checkpoint(llama_checkpoint, "broken")
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] += 16  # every MLP weight now has the wrong shape
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BuilderError, match="shape"):
        build(BuildOptions(model_name=str(broken), output=out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]


def test_rebuild_replaces_previous_output(tmp_path, llama_checkpoint, qwen3_checkpoint):
    out = tmp_path / "out"
    build(BuildOptions(model_name=str(llama_checkpoint), output=out))
    build(BuildOptions(model_name=str(qwen3_checkpoint), output=out))
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == "qwen3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupted_build_leaves_nothing(tmp_path):
    target = tmp_path / "deep" / "out"
    with pytest.raises(KeyboardInterrupt):
        with StagedOutput(target) as tmp:
            (tmp / "model.onnx").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        StagedOutput(tmp_path / "f")


def test_manifest(built, checkpoints):
    m = json.loads((built["qwen3"] / "build_manifest.json").read_text())
    assert m["options"]["precision"] == "fp32" and m["options"]["execution_provider"] == "cpu"
    assert m["options"]["extra_options"]["shared_embeddings"] is None
    assert {"onnx", "onnxruntime", "numpy", "safetensors", "builder"} <= set(m["versions"])
    files = {f["name"]: f["bytes"] for f in m["checkpoint"]["files"]}
    assert files == {p.name: p.stat().st_size for p in checkpoints["qwen3"].glob("*.safetensors")}
    stages = {s["stage"]: s for s in m["stages"]}
    assert {"source", "graph", "package"} <= set(stages)
    assert all(s["seconds"] >= 0 and s["peak_rss_mb"] > 0 for s in stages.values())
    outputs = {o["name"] for o in m["outputs"]}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= outputs


def test_genai_config(built, checkpoints):
    cfg = json.loads((checkpoints["llama"] / "config.json").read_text())
    g = json.loads((built["llama"] / "genai_config.json").read_text())["model"]
    assert g["type"] == "llama" and g["vocab_size"] == cfg["vocab_size"]
    assert g["eos_token_id"] == 2 and g["bos_token_id"] == 1 and g["pad_token_id"] == 0
    d = g["decoder"]
    assert (d["head_size"], d["num_key_value_heads"]) == (cfg["head_dim"], cfg["num_key_value_heads"])
    assert d["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert d["outputs"]["present_value_names"] == "present.%d.value"
