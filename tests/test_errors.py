"""Bad input: each is one clear line on stderr, exit code 2, and nothing written."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli


def _assert_refused(tmp_path, args, *needles):
    out = tmp_path / "out"
    r = run_cli(*args, "-o", str(out))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if not ln[:4].isdigit()]  # drop log lines
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging left
    return lines[0]


def _rewrite(folder, edit):
    """Apply ``edit(dict)`` to the tensors of the single-file checkpoint in ``folder``."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_config(tmp_path, copy_checkpoint, llama_checkpoint):
    ck = copy_checkpoint(llama_checkpoint)
    (ck / "config.json").unlink()
    _assert_refused(tmp_path, ["-m", str(ck)], "config.json")


def test_malformed_config(tmp_path, copy_checkpoint, llama_checkpoint):
    ck = copy_checkpoint(llama_checkpoint)
    (ck / "config.json").write_text("{ not json")
    _assert_refused(tmp_path, ["-m", str(ck)], "config.json", "not valid JSON")


def test_config_missing_key(tmp_path, copy_checkpoint, llama_checkpoint):
    ck = copy_checkpoint(llama_checkpoint)
    cfg = json.loads((ck / "config.json").read_text())
    del cfg["hidden_size"]
    (ck / "config.json").write_text(json.dumps(cfg))
    _assert_refused(tmp_path, ["-m", str(ck)], "hidden_size")


def test_unknown_architecture(tmp_path, copy_checkpoint, llama_checkpoint):
    ck = copy_checkpoint(llama_checkpoint)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLMX"]
    (ck / "config.json").write_text(json.dumps(cfg))
    line = _assert_refused(tmp_path, ["-m", str(ck)], "LlamaForCausalLMX", "Qwen3ForCausalLM",
                           "did you mean 'LlamaForCausalLM'")
    assert "plugin" in line


def test_unknown_extra_option(tmp_path, llama_checkpoint):
    _assert_refused(tmp_path, ["-m", str(llama_checkpoint), "--extra_options",
                               "shared_embedding=true"], "shared_embedding",
                    "did you mean 'shared_embeddings'")


def test_bad_option_value(tmp_path, llama_checkpoint):
    _assert_refused(tmp_path, ["-m", str(llama_checkpoint), "--extra_options",
                               "shared_embeddings=maybe"], "shared_embeddings", "true or false")


def test_qnn_option_without_qnn_target(tmp_path, llama_checkpoint):
    _assert_refused(tmp_path, ["-m", str(llama_checkpoint), "--extra_options",
                               "qnn_context_length=256"], "qnn_context_length", "-e qnn")


@pytest.mark.parametrize("flags, needle", [
    (["-p", "w8a16"], "precision 'w8a16' is not supported yet for -e cpu; valid: fp32, fp16, "
                      "int4, int8"),
    (["-e", "dml"], "invalid choice: 'dml' (choose from 'cpu', 'cuda', 'qnn')"),
    (["-e", "qnn", "-p", "bf16"], "precision 'bf16' is not supported yet for -e qnn; valid: "
                                  "fp16, fp32, w8a16, int8, w4a16, int4, w8a8"),
    (["-e", "cuda", "-p", "fp32"], "precision 'fp32' is not supported yet for -e cuda; valid: "
                                   "fp16, bf16"),
])
def test_precision_or_target_not_supported_yet(tmp_path, llama_checkpoint, flags, needle):
    _assert_refused(tmp_path, ["-m", str(llama_checkpoint), *flags], needle)


def test_shared_embeddings_on_untied_model(tmp_path, llama_checkpoint):
    _assert_refused(tmp_path, ["-m", str(llama_checkpoint), "--extra_options",
                               "shared_embeddings=true"], "tie_word_embeddings=false")


def test_missing_tensor(tmp_path, copy_checkpoint, llama_checkpoint):
    ck = copy_checkpoint(llama_checkpoint)
    _rewrite(ck, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _assert_refused(tmp_path, ["-m", str(ck)], "model.layers.1.mlp.up_proj.weight", "not found")


def test_unused_tensor(tmp_path, copy_checkpoint, llama_checkpoint):
    ck = copy_checkpoint(llama_checkpoint)
    _rewrite(ck, lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)}))
    _assert_refused(tmp_path, ["-m", str(ck)], "model.layers.0.mlp.extra_proj.weight",
                    "not used")


def test_wrong_tensor_shape(tmp_path, copy_checkpoint, llama_checkpoint):
    ck = copy_checkpoint(llama_checkpoint)
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(ck, lambda t: t.update({name: t[name][:-16].clone()}))
    _assert_refused(tmp_path, ["-m", str(ck)], name, "shape", "[32, 128]")


def test_wrong_tensor_dtype(tmp_path, copy_checkpoint, llama_checkpoint):
    ck = copy_checkpoint(llama_checkpoint)
    name = "model.norm.weight"
    _rewrite(ck, lambda t: t.update({name: t[name].to(torch.int32)}))
    _assert_refused(tmp_path, ["-m", str(ck)], name, "dtype I32")


def test_truncated_safetensors(tmp_path, copy_checkpoint, qwen3_checkpoint):
    ck = copy_checkpoint(qwen3_checkpoint)
    shard = sorted(ck.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    _assert_refused(tmp_path, ["-m", str(ck)], shard.name, "truncated")


@pytest.mark.parametrize("damage, needle", [
    ("length", "not a readable safetensors file"),  # a header length of 2^63 - 1
    ("list", "not a readable safetensors file"),    # a header that is a JSON list
])
def test_damaged_safetensors_header(tmp_path, copy_checkpoint, llama_checkpoint, damage, needle):
    ck = copy_checkpoint(llama_checkpoint)
    shard = ck / "model.safetensors"
    data = shard.read_bytes()
    if damage == "length":
        shard.write_bytes((2 ** 63 - 1).to_bytes(8, "little") + data[8:])
    else:
        header = b"[1, 2, 3]"
        shard.write_bytes(len(header).to_bytes(8, "little") + header + data[8:])
    _assert_refused(tmp_path, ["-m", str(ck)], "model.safetensors", needle)


def test_checkpoint_file_that_is_a_named_pipe(tmp_path, copy_checkpoint, llama_checkpoint):
    """A FIFO named model.safetensors would block the first read forever: refused unopened."""
    ck = copy_checkpoint(llama_checkpoint)
    (ck / "model.safetensors").unlink()
    os.mkfifo(ck / "model.safetensors")
    _assert_refused(tmp_path, ["-m", str(ck)], "model.safetensors: not a regular file (a named "
                    "pipe)")


def test_pickle_only_repository(tmp_path, copy_checkpoint, llama_checkpoint):
    ck = copy_checkpoint(llama_checkpoint)
    (ck / "model.safetensors").unlink()
    (ck / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    _assert_refused(tmp_path, ["-m", str(ck)], "pytorch_model.bin", "never loaded")


def test_missing_folder(tmp_path):
    _assert_refused(tmp_path, ["-m", str(tmp_path / "nowhere" / "x" / "y")], "no such folder")


def test_output_is_a_foreign_non_empty_folder(tmp_path, llama_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = run_cli("-m", str(llama_checkpoint), "-o", str(out))
    assert r.returncode == 2 and "not a previous build output" in r.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_bad_flag_value_is_one_line(tmp_path, llama_checkpoint):
    _assert_refused(tmp_path, ["-m", str(llama_checkpoint), "-p", "int3"], "-p/--precision",
                    "invalid choice")


def test_unwritable_output(tmp_path, llama_checkpoint):
    (tmp_path / "afile").write_text("x")
    r = run_cli("-m", str(llama_checkpoint), "-o", str(tmp_path / "afile" / "out"))
    assert r.returncode == 2 and "cannot write there" in r.stderr and "Traceback" not in r.stderr


def test_default_precision_follows_the_target(tmp_path, llama_checkpoint):
    r = run_cli("-m", str(llama_checkpoint), "-o", str(tmp_path / "o"), "-e", "cuda")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "o" / "build_manifest.json").read_text())
    assert manifest["options"]["precision"] == "fp16"
