"""The build's last stage opens the folder as its user will and generates one token: a folder
that does not run is not written (every other build test runs the check too, at its default)."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

from builder import BuildOptions, ExtraOptions, build, hookimpl
from builder.errors import OutputError
from builder.models import LlamaBuilder
from builder.plugins import load_plugins
from builder.runcheck import AUTO_LIMIT, skipped


def _with(cls):
    return load_plugins([("mine", types.SimpleNamespace(register_architectures=hookimpl(
        lambda register: register(cls, replace=True))))])


def test_a_folder_onnxruntime_genai_cannot_load_is_not_written(tmp_path, llama_checkpoint):
    """An architecture naming a model type onnxruntime-genai does not know: the folder is
    complete, but loading it fails; the build says so and writes nothing."""
    class Misnamed(LlamaBuilder):
        architectures = ("LlamaForCausalLM",)
        genai_model_type = "lama"

    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"the folder was built but does not run: .*"
                                          r"Unsupported model_type in config.json: lama"):
        build(BuildOptions(model_name=str(llama_checkpoint), output=out), _with(Misnamed))
    assert list(tmp_path.iterdir()) == []


def test_a_folder_whose_logits_are_not_finite_is_not_written(tmp_path, llama_checkpoint):
    class Broken(LlamaBuilder):
        architectures = ("LlamaForCausalLM",)

        def attention_scale(self):
            return float("nan")

    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"does not run: the logits hold \d+ NaN or infinite"):
        build(BuildOptions(model_name=str(llama_checkpoint), output=out), _with(Broken))
    assert list(tmp_path.iterdir()) == []
    # run_check=false writes it anyway, and the manifest says the check did not run
    build(BuildOptions(model_name=str(llama_checkpoint), output=out,
                       extra=ExtraOptions.parse(["run_check=false"])), _with(Broken))
    assert json.loads((out / "build_manifest.json").read_text())["run_check"] == {
        "ran": False, "why": "run_check=false"}


_NO_GENAI = ("import runpy, sys; sys.modules['onnxruntime_genai'] = None; "
             "runpy.run_path(sys.argv[1], run_name='__main__')")


@pytest.mark.parametrize("flags", [[], ["-e", "qnn", "-p", "w4a16"]], ids=["cpu", "qnn"])
def test_the_check_at_the_defaults_and_without_onnxruntime_genai(tmp_path, qwen3_checkpoint,
                                                                 flags):
    """The default build ran onnxruntime-genai on the folder (the manifest holds what it
    generated); without onnxruntime-genai onnxruntime runs the graphs the same way and picks
    the same token after the same prompt ids."""
    import builder.runcheck

    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "builder", "-m", str(qwen3_checkpoint), "-o",
                        str(out), *flags], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    checked = json.loads((out / "build_manifest.json").read_text())["run_check"]
    assert checked["ran"] and checked["runtime"].startswith("onnxruntime-genai ")
    assert "run check: onnxruntime-genai" in r.stderr
    assert any(s["stage"] == "run check" for s in
               json.loads((out / "build_manifest.json").read_text())["stages"])
    r = subprocess.run([sys.executable, "-c", _NO_GENAI, builder.runcheck.__file__, str(out)],
                       capture_output=True, text=True, timeout=600, cwd=out)
    assert r.returncode == 0, r.stderr[-2000:]
    alone = json.loads(r.stdout.splitlines()[-1])
    assert alone["runtime"].startswith("onnxruntime ") and alone["error"] is None
    assert (alone["prompt"], alone["token"]) == (checked["prompt"], checked["token"])


def test_what_is_skipped_and_why():
    """auto opens folders up to 2 GiB; bf16 and folders genai cannot generate from are
    skipped with the reason (logged and in the manifest)."""
    def options(*items, precision="fp32"):
        return BuildOptions(model_name="x", output="o", precision=precision,
                            extra=ExtraOptions.parse(list(items)))

    assert skipped(options(), AUTO_LIMIT) is None
    assert "run_check=true runs it" in skipped(options(), AUTO_LIMIT + 1)
    assert skipped(options("run_check=true"), 10 * AUTO_LIMIT) is None
    assert "bf16" in skipped(options(precision="bf16"), 1)
    assert "exclude_lm_head" in skipped(options("exclude_lm_head=true"), 1)


def test_tokenizer_files_onnxruntime_genai_reads_together(capsys, tmp_path, copy_checkpoint,
                                                          llama_checkpoint):
    """tokenizer.json without tokenizer_config.json loads nothing in onnxruntime-genai: refused
    before the build starts. Without any tokenizer the folder is built (with a warning) and
    the run check generates from the bos token."""
    from test_bad_input import refused

    ck = copy_checkpoint(llama_checkpoint)
    (ck / "tokenizer_config.json").unlink()
    refused(capsys, tmp_path, ["-m", ck], "tokenizer.json has no tokenizer_config.json beside "
                                          "it, and onnxruntime-genai reads both")
    (ck / "tokenizer.json").unlink()
    out = tmp_path / "out"
    build(BuildOptions(model_name=str(ck), output=out))
    checked = json.loads((out / "build_manifest.json").read_text())["run_check"]
    bos = json.loads((out / "genai_config.json").read_text())["model"]["bos_token_id"]
    assert checked["ran"] and checked["prompt"] == [bos] and checked["text"] is None
