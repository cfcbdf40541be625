"""LoRA adapters from PEFT folders: merged into the weights (every target) or kept apart as
graph inputs and adapter files that onnxruntime-genai switches at run time (cpu, cuda); checked
against PEFT's own model with the adapter, merged by PEFT."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from builder import BuildOptions, build
from builder.errors import BuilderError
from builder.options import ExecutionProvider, ExtraOptions, Precision
from builder.testing import max_abs_diff, run_decoder
from checkpoints import hf_logits, hf_model, make_checkpoint

TOL = 1e-4


def make_adapter(base, folder, targets, seed, save_embedding_layers=False, **config):
    """A PEFT LoRA adapter of ``base`` on ``targets``, its B weights random (PEFT starts them
    at zero: an adapter that changes nothing)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_model(base), LoraConfig(
        r=config.pop("r", 4), lora_alpha=config.pop("lora_alpha", 8), target_modules=targets,
        lora_dropout=0.0, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(folder, save_embedding_layers=save_embedding_layers)
    return folder


def peft_merged(base, adapter):
    """PEFT's model with ``adapter``, merged by PEFT into a plain transformers model."""
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_model(base), adapter).eval().merge_and_unload()


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    """GLM: interleaved rotary (q and k rows reordered by the build), gate/up stored fused."""
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "glm", "glm")


@pytest.fixture(scope="module")
def adapters(llama_checkpoint, tmp_path_factory):
    """Two adapters of the tiny Llama on different modules; the second with rank-stabilized
    scaling and its own rank and alpha for down_proj."""
    root = tmp_path_factory.mktemp("adapters")
    return (make_adapter(llama_checkpoint, root / "chat", ["q_proj", "v_proj", "down_proj"], 1),
            make_adapter(llama_checkpoint, root / "code", ["k_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"], 2,
                         use_rslora=True, rank_pattern={"down_proj": 2},
                         alpha_pattern={"down_proj": 3}))


def _build(ck, out, *extra, precision=Precision.FP32, ep=ExecutionProvider.CPU):
    return build(BuildOptions(model_name=str(ck), output=out, precision=precision,
                              execution_provider=ep, extra=ExtraOptions.parse(list(extra))))


def _logits(run):
    return np.concatenate([run.prefill_logits, np.stack(run.step_logits, 1)], 1)


@pytest.mark.parametrize("which", [0, 1])
def test_merged_adapter_matches_peft(which, llama_checkpoint, adapters, tmp_path):
    out = _build(llama_checkpoint, tmp_path / "out", f"adapter_path={adapters[which]}",
                 "lora_merge=true")
    assert not (out / "adapters").exists()
    ids = np.random.default_rng(which).integers(3, 256, (1, 10))
    run = run_decoder(out, ids, steps=4)
    want = hf_logits(None, run.tokens, run.attention_mask, 10,
                     model=peft_merged(llama_checkpoint, adapters[which]))
    assert max_abs_diff(_logits(run), want) <= TOL


def test_adapters_kept_apart_are_switched(llama_checkpoint, adapters, tmp_path):
    """Two adapters against one base folder: the graph runs the base model with none active,
    and each adapter's model (PEFT's) with its file active, prefill and decode."""
    paths = ",".join(str(a) for a in adapters)
    out = _build(llama_checkpoint, tmp_path / "out", f"adapter_path={paths}")
    files = sorted(p.name for p in (out / "adapters").iterdir())
    assert files == ["chat.onnx_adapter", "code.onnx_adapter"]
    ids = np.random.default_rng(5).integers(3, 256, (1, 9))
    base = run_decoder(out, ids, steps=3)
    want = hf_logits(llama_checkpoint, base.tokens, base.attention_mask, 9)
    assert max_abs_diff(_logits(base), want) <= TOL
    for adapter in adapters:
        run = run_decoder(out, ids, steps=3, adapter=out / "adapters" /
                          f"{adapter.name}.onnx_adapter")
        want = hf_logits(None, run.tokens, run.attention_mask, 9,
                         model=peft_merged(llama_checkpoint, adapter))
        assert max_abs_diff(_logits(run), want) <= TOL, adapter.name


def _genai(folder, prompt, adapter=None):
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    length = len(prompt) + 10
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    if adapter is not None:
        loaded = og.Adapters(model)
        loaded.load(str(folder / "adapters" / f"{adapter}.onnx_adapter"), adapter)
        generator.set_active_adapter(loaded, adapter)
    generator.append_tokens(np.asarray([prompt], np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


def _greedy(model, prompt):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=10, min_new_tokens=10)[0].tolist()


def test_genai_switches_between_adapters(llama_checkpoint, adapters, tmp_path):
    """onnxruntime-genai's Adapters API on one built folder: each adapter generates PEFT's
    tokens for it, none the base model's, and the three differ."""
    paths = ",".join(str(a) for a in adapters)
    out = _build(llama_checkpoint, tmp_path / "out", f"adapter_path={paths}")
    prompt = [5, 17, 99, 4, 200, 31, 8]
    expected = {None: _greedy(hf_model(llama_checkpoint), prompt)}
    expected.update({a.name: _greedy(peft_merged(llama_checkpoint, a), prompt)
                     for a in adapters})
    assert len({tuple(v) for v in expected.values()}) == 3
    for name, tokens in expected.items():
        assert _genai(out, prompt, name) == tokens, name


def test_apart_on_reordered_and_fused_rows(glm, tmp_path):
    """GLM: q and k rows reordered for interleaved rotary, gate_up stored fused and built as
    two MatMuls: each LoRA branch's B rows follow its projection's rows."""
    adapter = make_adapter(glm, tmp_path / "glm-lora", ["q_proj", "k_proj", "gate_up_proj"], 3)
    out = _build(glm, tmp_path / "out", f"adapter_path={adapter}")
    ids = np.random.default_rng(6).integers(3, 256, (1, 8))
    run = run_decoder(out, ids, steps=3, adapter=out / "adapters" / "glm-lora.onnx_adapter")
    want = hf_logits(None, run.tokens, run.attention_mask, 8, model=peft_merged(glm, adapter))
    assert max_abs_diff(_logits(run), want) <= TOL
    out = _build(glm, tmp_path / "merged", f"adapter_path={adapter}", "lora_merge=true")
    run = run_decoder(out, ids, steps=3)
    assert max_abs_diff(_logits(run), want) <= TOL


def test_int4_base_with_adapters_apart(llama_checkpoint, adapters, tmp_path):
    """-p int4: the base projections are MatMulNBits, the LoRA branches float beside them."""
    import onnx

    out = _build(llama_checkpoint, tmp_path / "out", f"adapter_path={adapters[0]}",
                 precision=Precision.INT4)
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 7 * 2 + 1  # lm_head
    lora_inputs = [i.name for i in graph.input if ".lora_" in i.name]
    assert len(lora_inputs) == 2 * 3 * 2  # A and B, 3 modules, 2 layers
    prompt = [5, 17, 99, 4, 200, 31, 8]
    assert _genai(out, prompt, "chat") != _genai(out, prompt)


def test_cuda_fp16_adapter_apart(llama_checkpoint, adapters, tmp_path):
    """-e cuda (fp16): the LoRA inputs and the adapter file in fp16; onnxruntime's CPU EP runs
    the graph with the adapter within fp16's error of PEFT's model."""
    out = _build(llama_checkpoint, tmp_path / "out", f"adapter_path={adapters[1]}",
                 precision=Precision.FP16, ep=ExecutionProvider.CUDA)
    ids = np.random.default_rng(9).integers(3, 256, (1, 8))
    run = run_decoder(out, ids, steps=2, adapter=out / "adapters" / "code.onnx_adapter")
    want = hf_logits(None, run.tokens, run.attention_mask, 8,
                     model=peft_merged(llama_checkpoint, adapters[1]))
    assert max_abs_diff(_logits(run).astype(np.float32), want) <= 3e-2


@pytest.mark.xdist_group("qnn_lora")
def test_qnn_merges_by_default(llama_checkpoint, adapters, tmp_path, caplog):
    from qnn_helpers import qnn_build

    from builder.runner import run_pipeline

    with caplog.at_level(logging.INFO):
        out = qnn_build(llama_checkpoint, tmp_path / "out", "fp16",
                        f"adapter_path={adapters[0]}")
    assert "merged into the weights" in caplog.text
    prompt = [int(t) for t in np.random.default_rng(7).integers(3, 256, 11)]
    run = run_pipeline(out, prompt, 4)
    ids = np.asarray([prompt + run.tokens[:-1]])
    want = hf_logits(None, ids, np.ones_like(ids), len(prompt),
                     model=peft_merged(llama_checkpoint, adapters[0]))[0, len(prompt) - 1:]
    got = np.stack(run.step_logits)
    assert max_abs_diff(got, want) <= 0.05 * np.abs(want).max()  # fp16
    assert [int(t) for t in got.argmax(-1)] == [int(t) for t in want.argmax(-1)]


def test_refusals(llama_checkpoint, adapters, tmp_path):
    with pytest.raises(BuilderError, match="lora_merge=false: -e qnn"):
        _build(llama_checkpoint, tmp_path / "a", f"adapter_path={adapters[0]}",
               "lora_merge=false", precision=Precision.FP16, ep=ExecutionProvider.QNN)
    with pytest.raises(BuilderError, match="merges one"):
        _build(llama_checkpoint, tmp_path / "b", f"adapter_path={adapters[0]},{adapters[1]}",
               "lora_merge=true")
    with pytest.raises(BuilderError, match="applies with adapter_path only"):
        _build(llama_checkpoint, tmp_path / "c", "lora_merge=true")
    dora = make_adapter(llama_checkpoint, tmp_path / "dora", ["q_proj"], 4, use_dora=True)
    with pytest.raises(BuilderError, match="use_dora=True"):
        _build(llama_checkpoint, tmp_path / "d", f"adapter_path={dora}")
    embed = make_adapter(llama_checkpoint, tmp_path / "embed", ["embed_tokens"], 5)
    with pytest.raises(BuilderError, match="embed_tokens.lora_embedding_A"):
        _build(llama_checkpoint, tmp_path / "e", f"adapter_path={embed}")
    wrong = make_adapter(llama_checkpoint, tmp_path / "wrong", ["q_proj"], 6)
    config = json.loads((wrong / "adapter_config.json").read_text())
    config["r"] = 8
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(BuilderError, match="rank 4; adapter_config.json says r=8"):
        _build(llama_checkpoint, tmp_path / "f", f"adapter_path={wrong}")
    renamed = make_adapter(llama_checkpoint, tmp_path / "renamed", ["q_proj"], 7)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(renamed / "adapter_model.safetensors")
    save_file({k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.x_proj"): v
               for k, v in tensors.items()}, renamed / "adapter_model.safetensors")
    with pytest.raises(BuilderError, match="layers.1.self_attn.x_proj is adapted, but the "
                                           "checkpoint has no"):
        _build(llama_checkpoint, tmp_path / "g", f"adapter_path={renamed}")
    misfit = make_adapter(llama_checkpoint, tmp_path / "misfit", ["v_proj"], 10)
    tensors = load_file(misfit / "adapter_model.safetensors")
    save_file({k.replace("v_proj", "q_proj"): v for k, v in tensors.items()},
              misfit / "adapter_model.safetensors")  # B gives v's 32 features; q has 128
    for merge, name in (("true", "m"), ("false", "n")):
        with pytest.raises(BuilderError, match="q_proj's lora_B gives|q_proj's LoRA gives"):
            _build(llama_checkpoint, tmp_path / name, f"adapter_path={misfit}",
                   f"lora_merge={merge}")
    head = make_adapter(llama_checkpoint, tmp_path / "head", ["lm_head"], 9,
                        save_embedding_layers=True)
    with pytest.raises(BuilderError, match="save_embedding_layers=False"):
        _build(llama_checkpoint, tmp_path / "h", f"adapter_path={head}")
    for name in ("a", "b", "c", "d", "e", "f", "g", "h", "m", "n"):
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("merge", ["true", "false"])
def test_lm_head_adapter(merge, llama_checkpoint, tmp_path):
    """An adapter on lm_head too (untied): merged or apart, PEFT's logits."""
    adapter = make_adapter(llama_checkpoint, tmp_path / "head", ["v_proj", "lm_head"], 8)
    out = _build(llama_checkpoint, tmp_path / "out", f"adapter_path={adapter}",
                 f"lora_merge={merge}")
    ids = np.random.default_rng(10).integers(3, 256, (1, 8))
    run = run_decoder(out, ids, steps=2, adapter=None if merge == "true" else
                      out / "adapters" / "head.onnx_adapter")
    want = hf_logits(None, run.tokens, run.attention_mask, 8,
                     model=peft_merged(llama_checkpoint, adapter))
    assert max_abs_diff(_logits(run), want) <= TOL


def test_readme_adapter_program(llama_checkpoint, adapters, tmp_path):
    """README's adapter program, as written (its folder path substituted), on a folder built
    with the two adapters: it prints each adapter's and the base model's tokens, which are
    PEFT's and transformers' greedy ones."""
    import re
    import subprocess
    import sys

    from conftest import ROOT

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("\n### LoRA adapters"):text.index("\n## QNN")]
    program = re.findall(r"^```python\n(.*?)^```$", section, re.S | re.M)[0]
    out = _build(llama_checkpoint, tmp_path / "out",
                 f"adapter_path={','.join(str(a) for a in adapters)}")
    program, n = re.subn(r'^folder = ".*"$', f'folder = "{out}"', program, flags=re.M)
    assert n == 1
    (tmp_path / "program.py").write_text(program)
    r = subprocess.run([sys.executable, str(tmp_path / "program.py")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    printed = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    prompt = [5, 17, 99, 4]
    for name, model in (("chat", peft_merged(llama_checkpoint, adapters[0])),
                        ("code", peft_merged(llama_checkpoint, adapters[1])),
                        ("None", hf_model(llama_checkpoint))):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_length=24)[0].tolist()
        got = [int(t) for t in re.findall(r"\d+", printed[name])]
        assert got[:len(want)] == want, name


_NO_GENAI = ("import runpy, sys; sys.modules['onnxruntime_genai'] = None; "
             "runpy.run_path(sys.argv[1], run_name='__main__')")


def test_the_run_check_activates_each_adapter(llama_checkpoint, adapters, tmp_path):
    """The build's run check generates with each adapter file active too (onnxruntime-genai's
    Adapters API; onnxruntime alone picks the same tokens); an adapter whose logits overflow
    fails the build, naming it."""
    import subprocess
    import sys

    import builder.runcheck
    from builder.errors import OutputError

    paths = ",".join(str(a) for a in adapters)
    out = _build(llama_checkpoint, tmp_path / "out", f"adapter_path={paths}")
    checked = json.loads((out / "build_manifest.json").read_text())["run_check"]
    assert checked["runtime"].startswith("onnxruntime-genai ")
    assert set(checked["adapters"]) == {"chat", "code"}
    r = subprocess.run([sys.executable, "-c", _NO_GENAI, builder.runcheck.__file__, str(out)],
                       capture_output=True, text=True, timeout=600, cwd=out)
    alone = json.loads(r.stdout.splitlines()[-1])
    assert alone["error"] is None and alone["adapters"] == checked["adapters"]
    loud = make_adapter(llama_checkpoint, tmp_path / "loud", ["o_proj"], 11)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(loud / "adapter_model.safetensors")
    save_file({k: v * 1e20 for k, v in tensors.items()},
              loud / "adapter_model.safetensors")
    with pytest.raises(OutputError, match="with adapter loud.onnx_adapter: the logits hold"):
        _build(llama_checkpoint, tmp_path / "broken", f"adapter_path={loud}")
    assert not (tmp_path / "broken").exists()


def test_an_adapter_from_the_hub(llama_checkpoint, adapters, tmp_path):
    """adapter_path takes a hub id as -m does (here offline, from a cache laid out as
    huggingface_hub stores one): its two files are read, the repository names the adapter."""
    import os

    from conftest import run_cli
    from test_hub import _fake_cache

    cache = tmp_path / "cache"
    _fake_cache(cache, adapters[0], repo="some-org/chat-lora")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    out = tmp_path / "out"
    r = run_cli("-m", str(llama_checkpoint), "-c", str(cache), "-o", str(out),
                "--extra_options", "adapter_path=some-org/chat-lora", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "adapters" / "chat-lora.onnx_adapter").is_file()
    r = run_cli("-m", str(llama_checkpoint), "-c", str(cache), "-o", str(tmp_path / "absent"),
                "--extra_options", "adapter_path=some-org/absent-lora", env=env)
    assert r.returncode == 2 and "some-org/absent-lora: no such local folder" in r.stderr
