"""The README's QNN run program, run as written on the shipped example built with the mission
command.

The program is taken from README.md (the first ```python block of the "QNN" section that registers
the QNN EP); only its folder path is substituted. It runs in a subprocess (onnxruntime-genai can
abort the process) under a small driver that executes the file unchanged with runpy and then
reports the generator's state, so the printed text can be checked against the generated ids.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSION = ["-m", "examples/tiny-qwen3", "-p", "int4", "-e", "qnn",
           "--extra_options", "shared_embeddings=true"]
CPU_LINE = "# config.clear_providers()"

pytest.importorskip("onnxruntime_genai", reason="the README program needs onnxruntime-genai")

# Runs the program file unchanged (as __main__), capturing what it prints, then reports the
# generator's sequence and the pad token's text.
_DRIVER = r"""
import contextlib, io, json, runpy, sys
program, report = sys.argv[1], sys.argv[2]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    g = runpy.run_path(program, run_name="__main__")
seq = [int(t) for t in g["generator"].get_sequence(0)]
with open(g["folder"] + "/genai_config.json") as f:
    pad = json.load(f)["model"]["pad_token_id"]
with open(report, "w") as f:
    json.dump({"printed": out.getvalue(), "sequence": seq, "prompt_ids": [int(t) for t in g["ids"]],
               "padded": g["padded"], "max_length": g["max_length"], "new_tokens": g["new_tokens"],
               "pad_id": pad, "pad_text": g["tokenizer"].decode([pad])}, f)
"""


def readme_program() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## QNN")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end > 0 else None]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, re.S | re.M)
    runs = [b for b in blocks if "register_execution_provider_library" in b]
    assert runs, "README's QNN section has no ```python block registering the QNN EP"
    return runs[0]


def substitute(program: str, pattern: str, line: str) -> str:
    new, n = re.subn(pattern, lambda _: line, program, flags=re.M)
    assert n == 1, f"README program: expected one line matching {pattern!r}, found {n}"
    return new


def program_for(folder: Path, *, cpu: bool = False, prompt: str | None = None) -> str:
    program = substitute(readme_program(), r'^folder = ".*"$', f"folder = {str(folder)!r}")
    if cpu:
        assert program.count(CPU_LINE) == 1, f"README program: no single {CPU_LINE!r} line"
        program = program.replace(CPU_LINE, CPU_LINE[2:])
    if prompt is not None:
        program = substitute(program, r'^prompt = ".*"$', f"prompt = {prompt!r}")
    return program


def run_program(program: str, tmp: Path, name: str, *, driver: bool = True):
    path = tmp / f"{name}.py"
    path.write_text(program, encoding="utf-8")
    report = tmp / f"{name}.json"
    cmd = [sys.executable, "-c", _DRIVER, str(path), str(report)] if driver else \
        [sys.executable, str(path)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=600)
    data = json.loads(report.read_text()) if driver and r.returncode == 0 else None
    return r, data


@pytest.fixture(scope="session")  # session: kept when other modules run between
def mission_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("readme_qnn") / "mission"
    cmd = [sys.executable, "-m", "builder", *MISSION[:2], "-o", str(out), *MISSION[2:]]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    (out.parent / "build.log").write_text(r.stderr)
    return out


def test_mission_build_log_is_ours(mission_folder):
    """The quantized QNN build logs its own lines only: not onnxruntime's quantizer advice
    (once per graph) nor a raw Python dict."""
    log = (mission_folder.parent / "build.log").read_text()
    assert "lm_head: int8 per-channel weights, uint16 activations (" in log
    assert "Please consider" not in log and "{'" not in log
    assert all(line[:4].isdigit() for line in log.splitlines()), log[-3000:]


@pytest.fixture(scope="session")  # session: kept when other modules run between
def runs(mission_folder, tmp_path_factory) -> dict:
    """The README program as written (QNN EP, simulated HTP) and with its CPU line switched on."""
    pytest.importorskip("onnxruntime_qnn", reason="the README program imports onnxruntime_qnn")
    tmp = tmp_path_factory.mktemp("readme_qnn_runs")
    out = {}
    for name, cpu in (("qnn", False), ("cpu", True)):
        r, data = run_program(program_for(mission_folder, cpu=cpu), tmp, name)
        assert r.returncode == 0, \
            f"{name}: rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        out[name] = data
    return out


@pytest.mark.parametrize("ep", ["qnn", "cpu"])
def test_readme_program_prints_generated_text_only(runs, mission_folder, ep):
    d = runs[ep]
    cfg = json.loads((mission_folder / "genai_config.json").read_text())["model"]
    P, C = cfg["decoder"]["sliding_window"]["window_size"], cfg["context_length"]
    n = len(d["prompt_ids"])
    assert d["padded"] == math.ceil(n / P) * P
    assert d["max_length"] == d["padded"] + d["new_tokens"] <= C
    seq = d["sequence"]
    # the runtime's layout, which the program relies on: prompt, pads up to a multiple of P, new
    assert seq[:n] == d["prompt_ids"]
    assert seq[n:d["padded"]] == [d["pad_id"]] * (d["padded"] - n)
    generated = seq[d["padded"]:]
    assert 1 <= len(generated) <= d["new_tokens"]
    printed = d["printed"].rstrip("\n")
    assert printed.strip(), "the program printed no text"
    assert d["pad_text"] * 2 not in printed, f"padding in the printed text: {printed!r}"


def test_readme_program_same_token_count_on_qnn_and_cpu(runs):
    qnn, cpu = runs["qnn"], runs["cpu"]
    assert qnn["padded"] == cpu["padded"]
    assert len(qnn["sequence"]) - qnn["padded"] == len(cpu["sequence"]) - cpu["padded"]


def test_readme_program_refuses_prompt_over_context(mission_folder, tmp_path):
    """A prompt whose padded length + new tokens exceeds C gets the program's ValueError, not
    onnxruntime-genai's crash (the CPU line switched on: the check runs before any generation)."""
    pytest.importorskip("onnxruntime_qnn", reason="the README program imports onnxruntime_qnn")
    C = json.loads((mission_folder / "genai_config.json").read_text())["model"]["context_length"]
    program = program_for(mission_folder, cpu=True, prompt="a" * (C - 1))
    r, _ = run_program(program, tmp_path, "long", driver=False)
    assert r.returncode == 1, \
        f"rc {r.returncode} (negative: killed by a signal)\n{r.stderr[-3000:]}"
    assert "ValueError" in r.stderr and f"exceeds context_length {C}" in r.stderr, r.stderr[-3000:]
    assert not r.stdout.strip()
