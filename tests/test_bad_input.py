"""The bad-input campaign: each case is one clear ``error:`` line, exit 2, nothing written and
nothing of the user's deleted. Most run ``python -m builder``'s ``main`` in this process (fast);
the cases about memory, signals, file size limits and locks run it in a subprocess."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from builder.cli import main
from conftest import ROOT, run_cli

NAN_TENSOR = "model.layers.0.mlp.down_proj.weight"


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".out"))


def refused(capsys, tmp_path, args, *needles, out=None, left=()):
    """Run the CLI in this process; assert one error line holding ``needles``, exit 2, no output
    folder, no staging folder and no lock left. Returns the line."""
    out = out or tmp_path / "out"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        code = main([*map(str, args), "-o", str(out)])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert _leftovers(out.parent) == list(left)
    return lines[0]


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is _DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))


_DELETE = object()


def _set_weight(folder, name, index, value):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors[name].view(-1)[index] = value
    save_file(tensors, path, metadata={"format": "pt"})


# -- 1. garbage weights ------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("flags", [
    [], ["-p", "fp16"], ["-p", "int4"],
    ["-p", "int4", "--extra_options", "int4_algo_config=k_quant"],
    ["-e", "qnn", "-p", "int4"],
], ids=["fp32", "fp16", "int4-rtn", "int4-kquant", "qnn-int4"])
def test_nonfinite_weight(capsys, tmp_path, copy_checkpoint, llama_checkpoint, flags, value):
    ck = copy_checkpoint(llama_checkpoint)
    _set_weight(ck, NAN_TENSOR, 5, value)
    _set_weight(ck, NAN_TENSOR, 9, value)
    refused(capsys, tmp_path, ["-m", ck, *flags], f"tensor {NAN_TENSOR!r}",
            "holds 2 NaN or infinite value(s)")


@pytest.mark.parametrize("flags", [["-p", "fp16"], ["-e", "qnn", "-p", "fp16"]],
                         ids=["cpu", "qnn"])
def test_weight_above_fp16_range(capsys, tmp_path, copy_checkpoint, llama_checkpoint, flags):
    ck = copy_checkpoint(llama_checkpoint)
    _set_weight(ck, NAN_TENSOR, 3, -70000.0)  # bf16 holds it; fp16's largest is 65504
    refused(capsys, tmp_path, ["-m", ck, *flags], "down_proj", "70144", "65504",
            "-p fp32 or bf16")


def test_weight_above_fp16_range_builds_in_fp32(tmp_path, copy_checkpoint, llama_checkpoint):
    ck = copy_checkpoint(llama_checkpoint)
    _set_weight(ck, NAN_TENSOR, 3, -70000.0)
    assert main(["-m", str(ck), "-o", str(tmp_path / "out")]) == 0


# -- 2. a rebuild owns only what it wrote ------------------------------------------------------
@pytest.fixture
def previous_build(tmp_path, llama_checkpoint):
    out = tmp_path / "out"
    assert main(["-m", str(llama_checkpoint), "-o", str(out)]) == 0
    return out


def _refused_rebuild(capsys, tmp_path, ck, out, *needles):
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code = main(["-m", str(ck), "-o", str(out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert code == 2 and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing deleted
    assert _leftovers(tmp_path) == []


def test_rebuild_keeps_a_users_file(capsys, tmp_path, llama_checkpoint, previous_build):
    (previous_build / "NOTES.txt").write_text("mine")
    (previous_build / "myapp").mkdir()
    (previous_build / "myapp" / "main.py").write_text("print()")
    _refused_rebuild(capsys, tmp_path, llama_checkpoint, previous_build,
                     "NOTES.txt, myapp/", "did not write")


def test_rebuild_keeps_an_edited_output(capsys, tmp_path, llama_checkpoint, previous_build):
    with open(previous_build / "genai_config.json", "a") as f:
        f.write("\n")
    _refused_rebuild(capsys, tmp_path, llama_checkpoint, previous_build,
                     "genai_config.json changed since the previous build")


def test_rebuild_keeps_an_edit_of_the_same_size(capsys, tmp_path, llama_checkpoint,
                                                previous_build):
    """An edit that keeps the file's size (a temperature 1.0 → 0.7) is seen by its content:
    the manifest keeps each output's SHA-256."""
    config = previous_build / "genai_config.json"
    text = config.read_text()
    assert '"temperature": 1.0' in text
    config.write_text(text.replace('"temperature": 1.0', '"temperature": 0.7'))
    _refused_rebuild(capsys, tmp_path, llama_checkpoint, previous_build,
                     "genai_config.json changed since the previous build")
    assert '"temperature": 0.7' in config.read_text()


def test_folder_with_a_fake_manifest_is_not_a_build(capsys, tmp_path, llama_checkpoint):
    f = tmp_path / "out"
    f.mkdir()
    (f / "thesis.txt").write_text("x")
    (f / "build_manifest.json").touch()
    _refused_rebuild(capsys, tmp_path, llama_checkpoint, f, "build_manifest.json",
                     "not a manifest a build wrote")
    assert (f / "thesis.txt").read_text() == "x"


def test_rebuild_of_a_real_build_replaces_it(tmp_path, qwen3_checkpoint, previous_build):
    stale = previous_build / "model.onnx.data"
    assert main(["-m", str(qwen3_checkpoint), "-o", str(previous_build)]) == 0
    assert json.loads((previous_build / "genai_config.json").read_text())["model"]["type"] \
        == "qwen3"
    assert stale.is_file()  # the new build's, listed in its manifest
    manifest = json.loads((previous_build / "build_manifest.json").read_text())
    assert sorted(o["name"] for o in manifest["outputs"]) == sorted(
        p.name for p in previous_build.iterdir() if p.name != "build_manifest.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- 3. sizes are confirmed before anything is allocated ---------------------------------------
def _limited(limit_bytes):
    def _apply():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return _apply


@pytest.mark.parametrize("key, value, needle", [
    ("num_hidden_layers", 1_000_000_000, "num_hidden_layers=1000000000, but the checkpoint "
                                         "holds only"),
    ("num_hidden_layers", 1_000_000, "num_hidden_layers=1000000, but the checkpoint holds"),
    ("num_hidden_layers", 3, "no tensors of layer 2"),
    ("max_position_embeddings", 1_000_000_000, "max_position_embeddings=1000000000 is above"),
    ("vocab_size", 10_000_000, "'model.embed_tokens.weight' has shape [256, 128]; the config "
                               "implies [10000000, 128]"),
])
def test_sizes_checked_before_allocating(tmp_path, copy_checkpoint, llama_checkpoint, key,
                                         value, needle):
    ck = copy_checkpoint(llama_checkpoint)
    _edit_config(ck, **{key: value})
    out = tmp_path / "out"
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "builder", "-m", str(ck), "-o", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120,
                       preexec_fn=_limited(3 << 30))
    assert time.monotonic() - start < 30, "not prompt"
    assert r.returncode == 2, r.stderr[-2000:]
    assert needle in r.stderr.splitlines()[-1], r.stderr[-2000:]
    assert not out.exists() and _leftovers(tmp_path) == []


# -- 4. one build per folder; dead builds' staging is cleaned ----------------------------------
def test_concurrent_build_is_refused(capsys, tmp_path, llama_checkpoint):
    lock = FileLock(tmp_path / ".out.lock")
    with lock:
        (tmp_path / ".out.lock").write_text("4242\n")
        line = refused(capsys, tmp_path, ["-m", llama_checkpoint], "another build into this "
                       "folder is running (pid 4242)", "wait for it", left=[".out.lock"])
    assert ".out.lock" in line
    assert main(["-m", str(llama_checkpoint), "-o", str(tmp_path / "out")]) == 0
    assert _leftovers(tmp_path) == []  # the lock file goes with its build


def test_racing_builds(tmp_path, llama_checkpoint):
    """Three builds into one folder at once: each finishes or is refused for the lock, and the
    folder ends as one complete build with nothing beside it."""
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "builder", "-m", str(llama_checkpoint),
                               "-o", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for code, err in results:
        assert code == 0 or (code == 2 and "another build into this folder is running"
                             in err.splitlines()[-1]), err[-2000:]
    assert any(code == 0 for code, _ in results)
    manifest = json.loads((out / "build_manifest.json").read_text())
    assert sorted(o["name"] for o in manifest["outputs"]) == sorted(
        p.name for p in out.iterdir() if p.name != "build_manifest.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_staging_of_a_killed_build_is_removed(tmp_path, llama_checkpoint, caplog):
    out = tmp_path / "out"
    # a build killed with SIGKILL mid-way: its staging folder stays behind
    proc = subprocess.Popen([sys.executable, "-m", "builder", "-m", str(llama_checkpoint),
                             "-o", str(out), "-e", "qnn", "-p", "w8a16"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any((p / "context.onnx").exists() for p in tmp_path.glob(".out.building-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "build ended too soon"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    stale = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.building-")]
    assert len(stale) == 1
    assert (tmp_path / stale[0] / ".builder-staging").is_file()  # its mark
    # a build killed between its two final renames: the previous build moved aside, marked
    assert main(["-m", str(llama_checkpoint), "-o", str(tmp_path / "elsewhere")]) == 0
    (tmp_path / ".out.old-abcd1234").mkdir()
    (tmp_path / ".out.old-abcd1234" / ".builder-staging").write_text("1\n")
    (tmp_path / "elsewhere").rename(tmp_path / ".out.old-abcd1234" / "previous")
    (tmp_path / ".outer.building-abcd1234").mkdir()  # another target's: not ours to touch
    (tmp_path / ".out.building-mine1234").mkdir()  # a user's own folder, unmarked: kept
    (tmp_path / ".out.building-mine1234" / "notes.txt").write_text("mine")
    caplog.set_level("WARNING")
    assert main(["-m", str(llama_checkpoint), "-o", str(out)]) == 0
    assert _leftovers(tmp_path) == [".out.building-mine1234", ".outer.building-abcd1234"]
    assert (tmp_path / ".out.building-mine1234" / "notes.txt").read_text() == "mine"
    assert f"removed {tmp_path / stale[0]}, left by a build into {out}" in caplog.text
    # (the moved-aside "previous" was put back as the target, then replaced by this build)
    assert f"put back the previous build into {out}" in caplog.text
    assert not (out / ".builder-staging").exists() and (out / "model.onnx").is_file()


def test_signal_between_the_final_renames_keeps_the_previous_build(tmp_path, llama_checkpoint,
                                                                    previous_build, monkeypatch):
    """Ctrl-C after the previous build was moved aside and before the new one took its place:
    the previous build is put back, byte for byte, and no staging is left."""
    from pathlib import Path

    before = {p.name: p.read_bytes() for p in previous_build.iterdir()}
    rename = Path.rename

    def interrupted(self, target):
        if self.name.startswith(".out.building-"):
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    assert main(["-m", str(llama_checkpoint), "-o", str(previous_build)]) == 130
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in previous_build.iterdir()} == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("sig, times", [(signal.SIGHUP, 1), (signal.SIGTERM, 1),
                                        (signal.SIGINT, 1), (signal.SIGINT, 5)],
                         ids=["SIGHUP", "SIGTERM", "SIGINT", "SIGINT-five-times"])
def test_signal_leaves_nothing(tmp_path, llama_checkpoint, sig, times):
    """A signal while the build writes; pressed five times, the later ones are ignored while
    the first one's cleanup runs."""
    out = tmp_path / "deep" / "out"

    def as_in_a_terminal():  # a background job (CI) inherits SIGINT ignored, a run under
        # nohup SIGHUP (which the build then leaves ignored, as nohup asks); a terminal's not
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-m", "builder", "-m", str(llama_checkpoint),
                             "-o", str(out), "-e", "qnn", "-p", "w8a16"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_in_a_terminal)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "deep").glob(".out.building-*/context.onnx")):
        assert proc.poll() is None and time.monotonic() < deadline, "build ended too soon"
        time.sleep(0.05)
    for _ in range(times):
        proc.send_signal(sig)
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.splitlines()[-1] == "error: interrupted; nothing was written"
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # not even the folder it created for -o


def _loaded(pid, library):
    try:
        return library in open(f"/proc/{pid}/maps").read()
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc/<pid>/maps")
@pytest.mark.parametrize("moment", ["numpy", "ml_dtypes", "onnx_cpp2py", "lock"])
def test_ctrl_c_while_it_starts(tmp_path, llama_checkpoint, moment):
    """Ctrl-C while the libraries load (the first seconds: numpy, ml_dtypes, onnx, as the
    plugins import them for the parser) and once the output is locked: one line, exit 130,
    nothing left. (Before python -m builder's first instruction, Python is still starting:
    what it prints then is its own.)"""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "builder", "-m", str(llama_checkpoint),
                             "-o", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not ((tmp_path / ".out.lock").exists() if moment == "lock"
               else _loaded(proc.pid, moment)):
        assert proc.poll() is None and time.monotonic() < deadline, "build ended too soon"
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err[-2000:]
    assert proc.returncode == 130, err[-2000:]
    assert err.splitlines()[-1] == "error: interrupted; nothing was written"
    assert list(tmp_path.iterdir()) == []


# -- 5. types, OS errors, damaged tokenizers ---------------------------------------------------
@pytest.mark.parametrize("key, value, needle", [
    ("rope_scaling", "linear", "rope_scaling must be an object (or null), got 'linear'"),
    ("rope_theta", "ten thousand", "rope_theta must be a positive number, got 'ten thousand'"),
    ("rms_norm_eps", "tiny", "rms_norm_eps must be a positive number, got 'tiny'"),
    ("rms_norm_eps", -1, "rms_norm_eps must be a positive number, got -1"),
    ("sliding_window", "big", "sliding_window must be a positive integer, got 'big'"),
    ("num_hidden_layers", True, "num_hidden_layers must be a positive integer, got True"),
    ("hidden_size", 64.0, "hidden_size must be a positive integer, got 64.0"),
    ("tie_word_embeddings", "no", "tie_word_embeddings must be true or false, got 'no'"),
    ("eos_token_id", "</s>", "eos_token_id must be a token id or a list of token ids"),
    ("rope_scaling", {"rope_type": "llama3", "factor": "8"}, "rope_scaling.factor has the "
                                                              "wrong type: '8'"),
    ("model_type", _DELETE, "'model_type' must name the model family"),
    ("model_type", "lama", "model_type 'lama' is not a model type onnxruntime-genai runs"),
    # a field that changes the math is read or refused, never dropped (Gemma's key)
    ("hidden_activation", "gelu_pytorch_tanh", "hidden_act='silu' and "
                                               "hidden_activation='gelu_pytorch_tanh' disagree"),
    ("hidden_act", "relu2", "hidden_act 'relu2' is not supported yet"),
    ("rope_parameters", {"full_attention": {"rope_type": "default", "rope_theta": 1e6}},
     "rope_parameters is given per layer type, but layer_types is not given"),
    ("rope_parameters", {"rope_theta": {"value": 1e6}},
     "rope_parameters.rope_theta has the wrong type"),
    ("rope_parameters", {"full_attention": {"rope_theta": "big"}},
     "rope_parameters.full_attention.rope_theta has the wrong type"),
    ("num_hidden_layers", None, "missing required key(s) num_hidden_layers (num_hidden_layers: "
                                "null)"),
    ("intermediate_size", None, "missing required key(s) intermediate_size"),
    ("partial_rotary_factor", 0.3, "partial_rotary_factor=0.3 of head_dim=16 is 4.8 rotary "
                                   "dimensions"),
    ("partial_rotary_factor", 0.1875, "is 3 rotary dimensions; rotary embeddings turn pairs"),
])
def test_config_field_types(capsys, tmp_path, copy_checkpoint, llama_checkpoint, key, value,
                            needle):
    ck = copy_checkpoint(llama_checkpoint)
    _edit_config(ck, **{key: value})
    refused(capsys, tmp_path, ["-m", ck], "config.json", needle)


def test_an_epsilon_under_another_name(capsys, tmp_path, copy_checkpoint, llama_checkpoint):
    """layer_norm_eps without rms_norm_eps would silently be 1e-6: refused, naming it."""
    ck = copy_checkpoint(llama_checkpoint)
    _edit_config(ck, rms_norm_eps=_DELETE, layer_norm_eps=1e-5)
    refused(capsys, tmp_path, ["-m", ck], "config.json: the norms' epsilon is given as "
                                          "layer_norm_eps=1e-05, and builder reads rms_norm_eps")


def test_index_with_a_non_string_shard(capsys, tmp_path, copy_checkpoint, qwen3_checkpoint):
    ck = copy_checkpoint(qwen3_checkpoint)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = 3
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(capsys, tmp_path, ["-m", ck], "model.safetensors.index.json",
            "'weight_map' must map tensor names to shard file names")


def _file_size_limit(limit):
    def _apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it: EFBIG
    return _apply


@pytest.mark.parametrize("flags", [[], ["-e", "qnn", "-p", "w8a16"]], ids=["cpu", "qnn"])
def test_disk_full(tmp_path, llama_checkpoint, flags):
    """A write that the file system refuses (here: a file size limit, as a full disk would)."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "builder", "-m", str(llama_checkpoint),
                        "-o", str(out), *flags], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, preexec_fn=_file_size_limit(64 << 10))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith(f"error: {tmp_path}/.out.building-") and "File too large" in last \
        and last.endswith(f"while building {out}; nothing was written"), last
    assert not out.exists() and _leftovers(tmp_path) == []


def test_disk_full_before_the_start(tmp_path, llama_checkpoint):
    """Not even the lock file's pid can be written: one line, and no lock or staging left."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "builder", "-m", str(llama_checkpoint),
                        "-o", str(out)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, preexec_fn=_file_size_limit(0))
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.splitlines()[-1] == f"error: {out}: cannot write there (File too large)"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("errno_, filename", [(28, None), (28, "checkpoint/tokenizer.json"),
                                              (122, "checkpoint/tokenizer.json")])
def test_a_write_without_room_names_the_file_written(tmp_path, errno_, filename):
    """A write to an open file names no file, and a copy names its source: a full disk names
    the file being written."""
    from builder.output import writing

    target = tmp_path / "out" / "tokenizer.json"
    with pytest.raises(OSError) as e, writing(target):
        raise OSError(errno_, os.strerror(errno_), filename)
    assert (e.value.errno, e.value.filename) == (errno_, str(target))
    with pytest.raises(OSError) as e, writing(target):  # (a read error keeps its own file)
        raise OSError(5, "Input/output error", "checkpoint/tokenizer.json")
    assert e.value.filename == "checkpoint/tokenizer.json"


@pytest.mark.parametrize("name, text, flags, needle", [
    ("tokenizer.json", "{ broken", [], "tokenizer.json: not valid JSON"),
    ("generation_config.json", "[1, 2]", [], "generation_config.json: expected a JSON object"),
    ("tokenizer.json", '{"version": "1.0"}', ["-e", "qnn", "-p", "w8a16"],
     "tokenizer.json: not a tokenizer the tokenizers package can load"),
    ("tokenizer.json", "{}", [], "tokenizer.json: not a tokenizer the tokenizers package can "
                                 "load"),
])
def test_damaged_tokenizer_files(capsys, tmp_path, copy_checkpoint, llama_checkpoint, name,
                                 text, flags, needle):
    ck = copy_checkpoint(llama_checkpoint)
    (ck / name).write_text(text)
    refused(capsys, tmp_path, ["-m", ck, *flags], needle, "fix the file or remove it")


@pytest.mark.parametrize("file, key, value, needle", [
    ("generation_config.json", "eos_token_id", "two",
     "generation_config.json: eos_token_id must be a token id or a list of token ids"),
    ("generation_config.json", "temperature", "hot", "temperature must be a number, 0 or more"),
    ("generation_config.json", "top_p", 1.5, "top_p must be a number in (0, 1]"),
    ("generation_config.json", "top_k", 2.5, "top_k must be a whole number, 0 or more"),
    ("generation_config.json", "bos_token_id", 300,
     "generation_config.json: bos_token_id=300 is outside the vocabulary of 256 tokens"),
    ("config.json", "pad_token_id", 256,
     "config.json: pad_token_id=256 is outside the vocabulary of 256 tokens (ids 0 to 255)"),
])
def test_generation_values_onnxruntime_genai_could_not_use(capsys, tmp_path, copy_checkpoint,
                                                           llama_checkpoint, file, key, value,
                                                           needle):
    """What would be copied into genai_config.json is checked as onnxruntime-genai reads it."""
    ck = copy_checkpoint(llama_checkpoint)
    if file == "config.json":  # (generation_config.json's ids win over config.json's)
        (ck / "generation_config.json").unlink()
    path = ck / file
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))
    refused(capsys, tmp_path, ["-m", ck], needle)


def test_tokenizer_ids_outside_the_vocabulary(capsys, tmp_path, copy_checkpoint,
                                              llama_checkpoint):
    """A tokenizer.json with an added token 300 on a vocabulary of 256: calibration's prompts
    would index past the embedding table; refused, naming the id."""
    ck = copy_checkpoint(llama_checkpoint)
    tok = json.loads((ck / "tokenizer.json").read_text())
    tok.setdefault("added_tokens", []).append({
        "id": 300, "content": "<extra>", "single_word": False, "lstrip": False,
        "rstrip": False, "normalized": False, "special": True})
    (ck / "tokenizer.json").write_text(json.dumps(tok))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the boat <extra> sailed\n")
    refused(capsys, tmp_path, ["-m", ck, "-p", "int4", "--extra_options",
                               "int4_algo_config=gptq", f"qnn_calibration={prompts}"],
            "tokenizer.json: encodes the prompts to token id 2",  # (256: renumbered on load)
            "outside the model's vocabulary of 256")


def test_tokenizer_that_cannot_encode_the_prompts(capsys, tmp_path, copy_checkpoint,
                                                  llama_checkpoint):
    """A WordLevel tokenizer whose unknown token is not in its vocabulary loads, but cannot
    encode a word it lacks: named, not a traceback."""
    ck = copy_checkpoint(llama_checkpoint)
    (ck / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "vocab": {"the": 0, "boat": 1},
                                   "unk_token": "<unk>"}}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the boat sailed\n")
    refused(capsys, tmp_path, ["-m", ck, "-p", "int4", "--extra_options",
                               "int4_algo_config=gptq", f"qnn_calibration={prompts}"],
            "tokenizer.json: cannot encode the prompts of", "fix the tokenizer")


def test_a_broken_quantized_build_is_not_written(capsys, tmp_path, monkeypatch):
    """A build whose own accuracy report falls below the floor stops with the figures; here
    the floor is raised above what any build reaches, so the real report of a real build
    trips it; quant_accuracy_check=false writes the folder."""
    import builder.quant.report as report

    monkeypatch.setattr(report, "FLOOR", {"mean_cosine": 1.5})
    args = ["-m", ROOT / "examples/tiny-qwen3", "-p", "int4", "--extra_options",
            "int4_algo_config=gptq"]
    line = refused(capsys, tmp_path, args, "the quantized model disagrees with the float one",
                   "prefill mean logit cosine 0.", "decode mean logit cosine 0.", "(floor 1.5)",
                   "quant_accuracy_check=false writes it anyway")
    out = tmp_path / "anyway"
    assert main([*map(str, args), "quant_accuracy_check=false", "-o", str(out)]) == 0
    assert (out / "model.onnx").is_file()


def test_accuracy_floor_on_reports():
    from builder.errors import AccuracyError
    from builder.quant.report import check_accuracy

    phase = {"mean_cosine": 0.999, "top1_agreement": 1.0}
    check_accuracy({"prefill": phase, "decode": phase})
    check_accuracy({"prefill": {"mean_cosine": 0.84, "top1_agreement": 0.25}, "decode": phase})
    with pytest.raises(AccuracyError, match=r"decode mean logit cosine 0.057 \(floor 0.5\)"):
        check_accuracy({"prefill": phase, "decode": {**phase, "mean_cosine": 0.057}})
    with pytest.raises(AccuracyError, match=r"prefill mean logit cosine -0.99997 \(floor 0.5\)"):
        check_accuracy({"prefill": {**phase, "mean_cosine": -0.99997}, "decode": phase})


UTF8 = "save the prompts as UTF-8"
CALIBRATION_FILES = {  # what an editor may write for "the boat sailed" prompts: (the file's
    # suffix, its bytes, what the error line says after its path, and more)
    "cp1252": (".txt", "caf\u00e9 at the harbour\nthe boat sailed\n".encode("cp1252"),
               "not UTF-8 text (byte 0xe9 at offset 3)", UTF8),
    "binary": (".txt", bytes(range(256)) * 4, "not UTF-8 text (byte 0x80 at offset 128)", UTF8),
    "nul": (".txt", b"the boat\x00 sailed\n", "holds a NUL character (offset 8)", UTF8),
    # and a .json file of token ids
    "not json": (".json", b"[[1, 2, 3],", "not JSON (Expecting value at line 1 column 12)"),
    "object": (".json", b'{"input_ids": [1, 2]}',
               "expected a list of prompts, each a list of token ids"),
    "empty": (".json", b"[]", "expected a list of prompts, each a list of token ids ([[1, 2, 3], "
              "[4, 5]]), got an empty list"),
    "text": (".json", b'["the boat sailed"]', "prompt 0 is not a list of token ids"),
    "float": (".json", b"[[1, 2], [3.0]]", "prompt 1 is not a list of token ids"),
    "bool": (".json", b"[[true]]", "prompt 0 is not a list of token ids"),
    "no ids": (".json", b'[{"text": "the boat"}]', "prompt 0 is not a list of token ids "
               "(integers), nor an object whose input_ids is one"),
    "empty prompt": (".json", b"[[1], []]", "prompt 1 is empty"),
    "outside": (".json", b"[[1, 2], [3, 256]]",
                "prompt 1 holds token id 256, not one of the tokenizer's 256 ids (0..255)"),
    "negative": (".json", b"[[-1]]", "prompt 0 holds token id -1"),
}


@pytest.mark.parametrize("kind", sorted(CALIBRATION_FILES))
def test_calibration_file_that_is_wrong(capsys, tmp_path, kind):
    suffix, data, needle, *more = CALIBRATION_FILES[kind]
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(data)
    refused(capsys, tmp_path, ["-m", ROOT / "examples/tiny-qwen3", "-p", "int4",
                               "--extra_options", "int4_algo_config=gptq",
                               f"qnn_calibration={path}"], f"{path}: {needle}", *more)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_calibration_file_with_a_byte_order_mark(tmp_path, encoding):
    """UTF-16 with its byte-order mark (Windows Notepad, PowerShell) and UTF-8 with one read as
    the same prompts: the calibrated builds are the same bytes."""
    built = {}
    for name, codec in (("plain", "utf-8"), ("bom", encoding)):
        path = tmp_path / f"{name}.txt"
        path.write_bytes("The boat sailed at dawn.\nCaf\u00e9 au lait, s'il vous pla\u00eet.\n"
                         .encode(codec))
        out = tmp_path / name
        assert main(["-m", str(ROOT / "examples/tiny-qwen3"), "-o", str(out), "-p", "int4",
                     "--extra_options", "int4_algo_config=gptq", f"qnn_calibration={path}"]) == 0
        built[name] = (out / "model.onnx.data").read_bytes()
    assert built["bom"] == built["plain"]


# -- 6. files come from the checkpoint folder only ---------------------------------------------
def test_symlink_out_of_the_checkpoint(capsys, tmp_path, copy_checkpoint, llama_checkpoint):
    ck = copy_checkpoint(llama_checkpoint)
    secret = tmp_path / "secret.json"
    secret.write_text('{"password": "hunter2"}')
    (ck / "tokenizer.json").unlink()
    (ck / "tokenizer.json").symlink_to(secret)
    refused(capsys, tmp_path, ["-m", ck], f"{ck / 'tokenizer.json'}: resolves to {secret}, "
            "outside the checkpoint folder")


@pytest.mark.parametrize("shard", ["../outside/x.safetensors", "/etc/passwd"])
def test_index_naming_a_file_outside(capsys, tmp_path, copy_checkpoint, qwen3_checkpoint,
                                     shard):
    ck = copy_checkpoint(qwen3_checkpoint)
    outside = tmp_path / "outside"
    outside.mkdir()
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    (outside / "x.safetensors").write_bytes((ck / index["weight_map"][first]).read_bytes())
    index["weight_map"][first] = shard
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(capsys, tmp_path, ["-m", ck], "outside the checkpoint folder")


# -- 7. accepted but meaningless ---------------------------------------------------------------
@pytest.mark.parametrize("flags, needle", [
    (["--extra_options", "int4_block_size=64"], "int4_block_size applies to -p int4 and int8 "
                                                "only, not -p fp32"),
    (["-p", "fp16", "--extra_options", "int4_algo_config=k_quant"],
     "int4_algo_config applies to -p int4 and int8 only, not -p fp16"),
    (["-e", "qnn", "-p", "w8a16", "--extra_options", "int4_block_size=64"],
     "int4_block_size applies on -e qnn to -p w4a16 (int4) only"),
    (["-e", "qnn", "-p", "w4a16", "--extra_options", "int4_block_size=64", "qnn_linear=conv"],
     "int4_block_size applies on -e qnn to MatMul projections only"),
    (["-e", "qnn", "-p", "int4", "--extra_options", "int4_algo_config=k_quant"],
     "int4_algo_config=k_quant does not apply on -e qnn"),
    (["-e", "qnn", "-p", "w8a16", "--extra_options", "qnn_int4_format=float_block"],
     "qnn_int4_format applies on -e qnn to -p w4a16 (int4) only"),
    (["-e", "qnn", "-p", "w4a16", "--extra_options", "qnn_int4_format=float_block",
               "qnn_linear=conv"],
     "qnn_int4_format applies to MatMul projections only"),
    (["-e", "qnn", "-p", "w4a16", "--extra_options", "int4_block_size=128"],  # (the HTP
     "int4_block_size=128 does not divide the projections' input sizes on -e qnn "  # is wrong)
     "(intermediate_size 192): the HTP computes a block cut short at the end of a row wrongly; "
     "choose int4_block_size=64"),
    (["-e", "qnn", "-p", "fp16", "--extra_options", "int4_algo_config=gptq"],
     "int4_algo_config applies on -e qnn to -p w8a16, w4a16"),
    (["-e", "qnn", "-p", "fp16", "--extra_options", "qnn_calibration_steps=4"],
     "qnn_calibration_steps applies to quantized -e qnn builds only"),
    (["--extra_options", "qnn_prefill_length=32"], "qnn_prefill_length applies to -e qnn only"),
    (["-p", "int4", "--extra_options", "quant_budget=0.2"],
     "quant_budget applies to int4_algo_config=rtn_mixed or gptq_mixed (the default at -e qnn "
     "-p w4a16) only"),
    (["-e", "qnn", "-p", "w8a16", "--extra_options", "quant_budget=0.2"],  # (gptq: no promoting)
     "quant_budget applies to int4_algo_config=rtn_mixed or gptq_mixed"),
    (["-p", "int8", "--extra_options", "int4_algo_config=rtn_mixed"],
     "int4_algo_config=rtn_mixed promotes 4-bit projections to 8 bits: it applies to -p int4"),
    (["-e", "qnn", "-p", "w8a16", "--extra_options", "int4_algo_config=gptq_mixed"],
     "it applies on -e qnn to -p w4a16 only, not -p w8a16"),
    (["-p", "int4", "--extra_options", "int4_algo_config=rtn_mixed", "quant_budget=-1"],
     "quant_budget='-1' must be at least 0"),
    # given at its default value: still asked for, still refused
    (["--extra_options", "int4_block_size=32"], "int4_block_size applies to -p int4 and int8 "
                                                "only, not -p fp32"),
    (["--extra_options", "qnn_prefill_length=64"], "qnn_prefill_length applies to -e qnn only"),
    (["--extra_options", "exclude_lm_head=true", "prune_lm_head=true"],
     "prune_lm_head does nothing with exclude_lm_head=true"),
    (["--extra_options", "exclude_lm_head=true", "include_hidden_states=true"],
     "include_hidden_states does nothing with exclude_lm_head=true"),
    (["-p", "int4", "--extra_options", "int4_is_symmetric=true"],
     "int4_is_symmetric does nothing with k_quant"),
    (["--extra_options", "hf_token=hf_abc"], "hf_token applies to hub downloads only"),
    (["-p", "int4", "--extra_options", "quant_accuracy_check=false"],
     "quant_accuracy_check applies to builds with an accuracy report"),
    (["-p", "int4", "--extra_options", "config_only=true", "int4_block_size=64"],
     "int4_block_size does nothing with config_only=true (no model is written)"),
    (["-e", "qnn", "-p", "w8a16", "--extra_options", "config_only=true",
      "qnn_calibration_samples=4"], "qnn_calibration_samples does nothing with config_only"),
    (["--extra_options", "config_only=true", "run_check=true"],
     "run_check does nothing with config_only=true"),
    (["-p", "int4", "--extra_options", "exclude_embeds=true",
      "int4_op_types_to_quantize=MatMul,Gather"],
     "int4_op_types_to_quantize=...,Gather does nothing with exclude_embeds=true"),
])
def test_option_that_would_do_nothing(capsys, tmp_path, llama_checkpoint, flags, needle):
    refused(capsys, tmp_path, ["-m", llama_checkpoint, *flags], needle)


def test_gather_with_a_shared_table_would_do_nothing(capsys, tmp_path, qwen3_checkpoint):
    """Qwen3's table is tied: quantized once for lm_head, read quantized by the lookup."""
    refused(capsys, tmp_path, ["-m", qwen3_checkpoint, "-p", "int4", "--extra_options",
                               "int4_op_types_to_quantize=MatMul,Gather"],
            "int4_op_types_to_quantize=...,Gather does nothing with shared embeddings")


# -- 8. smaller ones ---------------------------------------------------------------------------
def test_mistyped_local_folder(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    r = run_cli("-m", "nope", "-o", str(tmp_path / "out"), env=env)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1].startswith(
        "error: nope: no such local folder, and as a hub repository id it is not in the "
        "Hugging Face cache"), r.stderr


def test_run_beside_a_clone_named_builder(tmp_path, llama_checkpoint):
    """From the folder that holds a clone named builder, Python takes the clone for the
    package (with an editable install); python -m builder still runs."""
    for sub in ("builder/plugins/builder-seed-oss", "builder/builder", "builder/tests"):
        (tmp_path / sub).mkdir(parents=True)
    r = subprocess.run([sys.executable, "-m", "builder", "--help"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "extra options" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "builder", "-m", str(llama_checkpoint), "-o",
                        "out"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and (tmp_path / "out" / "model.onnx").is_file(), r.stderr[-2000:]


def test_mistyped_flag(capsys, tmp_path, llama_checkpoint):
    with pytest.raises(SystemExit) as e:
        main(["-m", str(llama_checkpoint), "-o", str(tmp_path / "out"), "--precison", "fp16"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: unrecognized argument '--precison' (did you "
                                       "mean '--precision'?) (see --help)\n")


def test_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "99.999% on each side" in text and "%%" not in text
    assert "{cpu,cuda,qnn}" in text and "dml" not in text and "webgpu" not in text


def test_out_of_memory_is_one_line(tmp_path, llama_checkpoint):
    r = subprocess.run([sys.executable, "-c", (
        "import sys, numpy as np\n"
        "def hungry(*a, **k): return np.ones(1 << 55, np.uint8)\n"
        "import builder.models.decoder as d; d.rope_cache = hungry\n"
        "from builder.cli import main\n"
        f"sys.exit(main(['-m', {str(llama_checkpoint)!r}, '-o', {str(tmp_path / 'out')!r}]))")],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.splitlines()[-1].startswith("error: out of memory; nothing was written")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where, failure", [
    # onnxruntime's allocator (calibration's sessions), in its own exception type
    ("import onnxruntime as ort\n"
     "class Hungry(ort.InferenceSession):\n"
     "    def __init__(self, *a, **k): raise ort.capi.onnxruntime_pybind11_state.RuntimeException("
     "'Failed to allocate memory for requested buffer of size 1073741824')\n"
     "ort.InferenceSession = Hungry\n", ["-e", "qnn", "-p", "w8a16"]),
    # the safetensors reader, whose message once blamed the checkpoint file
    ("import builder.weights as w\n"
     "def hungry(*a, **k): raise Exception('Cannot allocate memory (os error 12)')\n"
     "w.safe_open = hungry\n", []),
    # the OS, as ENOMEM on a read
    ("import builder.weights as w, errno\n"
     "def hungry(*a, **k): raise OSError(errno.ENOMEM, 'Cannot allocate memory')\n"
     "w.CheckpointReader.read = hungry\n", []),
], ids=["onnxruntime", "safetensors", "enomem"])
def test_out_of_memory_anywhere_is_one_line(tmp_path, llama_checkpoint, where, failure):
    """Memory running out where another library reports it: the same one line."""
    r = subprocess.run([sys.executable, "-c", (
        "import sys\n" + where + "from builder.cli import main\n"
        f"sys.exit(main(['-m', {str(llama_checkpoint)!r}, '-o', {str(tmp_path / 'out')!r}, "
        f"*{failure!r}]))")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.splitlines()[-1].startswith("error: out of memory; nothing was written"), \
        r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_numbers_in_checkpoint_and_floats_are_checked_lazily():
    """Non-finite detection reads in slices: no temporary as large as the tensor."""
    from builder.weights import CHECK_ELEMENTS, nonfinite

    a = np.zeros(CHECK_ELEMENTS * 2 + 5, np.float32)
    a[[0, CHECK_ELEMENTS, -1]] = [np.nan, np.inf, -np.inf]
    assert nonfinite(a) == 3
    assert nonfinite(torch.zeros(4).numpy()) == 0
