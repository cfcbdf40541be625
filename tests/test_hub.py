"""Hub ids resolve through huggingface_hub's cache, tested offline with a real cache layout."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import run_cli

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _fake_cache(cache, checkpoint, repo="some-org/tiny-model", extra_files=()):
    """Lay ``checkpoint`` out as huggingface_hub stores a downloaded snapshot."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / REVISION
    blobs = repo_dir / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, src in enumerate(sorted(checkpoint.iterdir())):
        blob = blobs / f"blob{i:04d}"
        shutil.copyfile(src, blob)
        (snapshot / src.name).symlink_to(os.path.relpath(blob, snapshot))
    for name, data in extra_files:
        (snapshot / name).write_bytes(data)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def offline_env(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    return env


def test_build_from_hub_id_offline_cache(tmp_path, qwen3_checkpoint, offline_env):
    cache = tmp_path / "cache"
    _fake_cache(cache, qwen3_checkpoint)
    out = tmp_path / "out"
    r = run_cli("-m", "some-org/tiny-model", "-c", str(cache), "-o", str(out), env=offline_env)
    assert r.returncode == 0, r.stderr
    assert (out / "model.onnx").is_file() and (out / "tokenizer.json").is_file()
    manifest = json.loads((out / "build_manifest.json").read_text())
    assert manifest["checkpoint"]["repo_id"] == "some-org/tiny-model"
    assert manifest["checkpoint"]["revision"] == REVISION
    shards = [f["name"] for f in manifest["checkpoint"]["files"]]
    assert len(shards) > 1 and all(s.endswith(".safetensors") for s in shards)


def test_hub_id_not_in_cache_offline(tmp_path, offline_env):
    out = tmp_path / "out"
    r = run_cli("-m", "some-org/absent-model", "-c", str(tmp_path / "cache"), "-o", str(out),
                env=offline_env)
    assert r.returncode == 2
    assert "some-org/absent-model: no such local folder, and as a hub repository id it is not in the Hugging Face cache" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_hub_snapshot_with_only_pickles_is_refused(tmp_path, llama_checkpoint, offline_env,
                                                   copy_checkpoint):
    ck = copy_checkpoint(llama_checkpoint)
    (ck / "model.safetensors").unlink()
    cache = tmp_path / "cache"
    _fake_cache(cache, ck, extra_files=[("pytorch_model.bin", b"never unpickled")])
    out = tmp_path / "out"
    r = run_cli("-m", "some-org/tiny-model", "-c", str(cache), "-o", str(out), env=offline_env)
    assert r.returncode == 2
    assert "only pickled weights (pytorch_model.bin)" in r.stderr
    assert not out.exists()


def test_config_only_needs_no_weights(tmp_path, qwen3_checkpoint, offline_env, copy_checkpoint):
    ck = copy_checkpoint(qwen3_checkpoint)
    for shard in ck.glob("*.safetensors"):
        shard.unlink()
    cache = tmp_path / "cache"
    _fake_cache(cache, ck)
    out = tmp_path / "out"
    r = run_cli("-m", "some-org/tiny-model", "-c", str(cache), "-o", str(out),
                "--extra_options", "config_only=true", env=offline_env)
    assert r.returncode == 0, r.stderr
    assert (out / "genai_config.json").is_file() and not (out / "model.onnx").exists()
