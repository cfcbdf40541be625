"""Plugins: entry points, the three hooks, clashes and failures. One test per hookspec."""

from __future__ import annotations

import importlib.metadata
import types

import pytest

from builder import hookimpl, hookspecs
from builder.errors import PluginError
from builder.models import LlamaBuilder
from builder.plugins import load_plugins
from builder.targets import TargetCaps
from conftest import ROOT


def _plugin(**hooks):
    return types.SimpleNamespace(**{k: hookimpl(v) for k, v in hooks.items()})


def _replacing(cls):
    """The plugins, with ``cls`` registered in place of the built-in architecture it names."""
    return load_plugins([("mine", _plugin(register_architectures=lambda register:
                                          register(cls, replace=True)))])


def _llama_with(folder, name: str, copy_of: str):
    """A tiny Llama checkpoint holding one more tensor per layer, ``model.layers.{i}.<name>
    .weight``, a copy of that layer's ``copy_of`` tensor."""
    from safetensors.torch import load_file, save_file

    from checkpoints import make_checkpoint

    ck = make_checkpoint(folder, "llama")
    tensors = load_file(ck / "model.safetensors")
    for i in range(2):
        tensors[f"model.layers.{i}.{name}.weight"] = tensors[
            f"model.layers.{i}.{copy_of}.weight"].clone()
    save_file(tensors, str(ck / "model.safetensors"), metadata={"format": "pt"})
    return ck


def test_builtins_register_through_our_entry_points():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="builder")}
    assert eps["models"] == "builder.models" and eps["targets"] == "builder.targets"
    plugins = load_plugins()
    assert {"LlamaForCausalLM", "Qwen3ForCausalLM"} <= set(plugins.architectures.names())
    assert plugins.architectures.owner("Qwen3ForCausalLM") == "models"
    assert plugins.targets.owner("cpu") == "targets"


def test_env_narrows_loaded_plugins(monkeypatch):
    monkeypatch.setenv("BUILDER_LOAD_PLUGINS", "targets")
    plugins = load_plugins()
    assert plugins.architectures.names() == [] and plugins.targets.names() == ["cpu", "cuda", "qnn"]


def test_env_naming_no_installed_plugin_is_refused(monkeypatch):
    monkeypatch.setenv("BUILDER_LOAD_PLUGINS", "modles,targets")
    with pytest.raises(PluginError, match="BUILDER_LOAD_PLUGINS names 'modles', which no "
                                          "installed plugin is; installed: models, quant, "):
        load_plugins()


def test_env_leaving_out_the_quantizers_says_so(tmp_path):
    """The README's narrowing without 'quant': -p int4 names the missing plugin."""
    import os

    from conftest import run_cli

    r = run_cli("-m", "examples/tiny-qwen3", "-o", str(tmp_path / "o"), "-p", "int4",
                env={**os.environ, "BUILDER_LOAD_PLUGINS": "models,targets"})
    assert r.returncode == 2, r.stderr
    assert ("quantizer 'k_quant' is not registered; known: none (BUILDER_LOAD_PLUGINS="
            "models,targets leaves out the plugin that registers it") in r.stderr, r.stderr
    r = run_cli("-m", "examples/tiny-qwen3", "-o", str(tmp_path / "o"), "-p", "int4",
                env={**os.environ, "BUILDER_LOAD_PLUGINS": "models,quant,targets"})
    assert r.returncode == 0, r.stderr[-2000:]


def test_hook_register_architectures():
    class GemmaLike(LlamaBuilder):
        architectures = ("GemmaLikeForCausalLM",)

    plugins = load_plugins([("mine", _plugin(register_architectures=lambda register:
                                             register(GemmaLike)))])
    assert plugins.architectures.get("GemmaLikeForCausalLM") is GemmaLike
    assert plugins.architectures.owner("GemmaLikeForCausalLM") == "mine"


def test_hook_register_quantizers():
    class Fake:
        name = "fake"

    plugins = load_plugins([("q", _plugin(register_quantizers=lambda register: register(Fake)))],
                           entry_points=False)
    assert plugins.quantizers.get("fake") is Fake


def test_hook_register_targets():
    npu = TargetCaps(name="my_npu", precisions=())
    plugins = load_plugins([("t", _plugin(register_targets=lambda register: register(npu)))])
    assert plugins.targets.get("my_npu") is npu and "cpu" in plugins.targets


def test_hook_register_options():
    """A plugin's own option: typed by its default, validated like a built-in one, listed in
    --help with the plugin that declares it, read with ExtraOptions.plugin; a built-in name is
    refused, and so is an option no loaded plugin declares."""
    from builder import ExtraOptions, PluginOption
    from builder.errors import OptionError
    from builder.options import options_help

    option = PluginOption("mine_level", 2, "How much.", choices=(1, 2, 3))
    plugins = load_plugins([("mine", _plugin(register_options=lambda register:
                                             register(option)))])
    assert plugins.options.get("mine_level") is option
    declared = plugins.options.values()
    assert ExtraOptions.parse(["mine_level=3"], declared).plugin("mine_level") == 3
    assert ExtraOptions.parse([], declared).plugin("mine_level") == 2  # the default
    with pytest.raises(OptionError, match=r"extra option mine_level='5' is not one of: 1, 2, 3"):
        ExtraOptions.parse(["mine_level=5"], declared)
    with pytest.raises(OptionError, match=r"extra option mine_level='x': invalid literal"):
        ExtraOptions.parse(["mine_level=x"], declared)
    with pytest.raises(OptionError, match=r"unknown extra option 'mine_level'"):
        ExtraOptions.parse(["mine_level=3"], [])
    with pytest.raises(OptionError, match=r"extra option 'mine_level' is not declared"):
        ExtraOptions.parse([], []).plugin("mine_level")
    help_text = options_help(plugin_options=[("mine", option)])
    assert "  mine_level = 2 [1 | 2 | 3] (plugin mine)\n      How much." in help_text
    with pytest.raises(PluginError, match=r"plugin 'bad' failed in register_options: "
                                          r"ValueError: .*an int option without choices"):
        load_plugins([("bad", _plugin(register_options=lambda register: register(
            PluginOption("bad_level", 0, "not positive"))))])
    with pytest.raises(PluginError, match=r"extra option 'shared_embeddings' is built in"):
        load_plugins([("bad", _plugin(register_options=lambda register: register(
            PluginOption("shared_embeddings", True, "clash"))))])


def test_a_plugin_option_read_by_its_architecture(tmp_path):
    """The builder reads its plugin's option: the value given, or the default when the options
    were parsed without that plugin (a library caller passing its own plugins to build)."""
    from builder import BuildOptions, ExtraOptions, PluginOption, build
    from builder.errors import OptionError
    from checkpoints import make_checkpoint

    seen = []

    class Reads(LlamaBuilder):
        architectures = ("LlamaForCausalLM",)

        def attention_scale(self):
            seen.append(self.extra.plugin("reads_scale"))
            return seen[-1]

    option = PluginOption("reads_scale", 0.25, "The attention scale.")
    plugins = load_plugins([("reads", _plugin(
        register_architectures=lambda register: register(Reads, replace=True),
        register_options=lambda register: register(option)))])
    ck = make_checkpoint(tmp_path / "ck", "llama")
    for items, declared, value in ((["reads_scale=0.5"], plugins.options.values(), 0.5),
                                   ([], [], 0.25)):
        seen.clear()
        build(BuildOptions(model_name=str(ck), output=tmp_path / f"o{value}",
                           extra=ExtraOptions.parse(items, declared)), plugins)
        assert seen and set(seen) == {value}
    # given to a build of an architecture that is not the plugin's: it would do nothing
    qwen3 = make_checkpoint(tmp_path / "q", "qwen3")
    with pytest.raises(OptionError, match=r"extra option reads_scale is plugin 'reads''s, read "
                                          r"by its architectures \(LlamaForCausalLM\); this "
                                          r"build's Qwen3ForCausalLM does not read it"):
        build(BuildOptions(model_name=str(qwen3), output=tmp_path / "oq", extra=ExtraOptions.parse(
            ["reads_scale=0.5"], plugins.options.values())), plugins)
    assert not (tmp_path / "oq").exists()


def test_every_hookspec_has_a_test():
    specs = {n for n in dir(hookspecs) if n.startswith("register_")}
    tested = {n.removeprefix("test_hook_") for n in globals() if n.startswith("test_hook_")}
    assert specs == tested


def test_clash_names_both_plugins():
    class Other(LlamaBuilder):
        architectures = ("LlamaForCausalLM",)

    with pytest.raises(PluginError, match="'LlamaForCausalLM' registered by both models and x"):
        load_plugins([("x", _plugin(register_architectures=lambda register: register(Other)))])


def test_replace_overrides_on_purpose():
    class Other(LlamaBuilder):
        architectures = ("LlamaForCausalLM",)

    plugins = load_plugins([("x", _plugin(
        register_architectures=lambda register: register(Other, replace=True)))])
    assert plugins.architectures.get("LlamaForCausalLM") is Other


def test_broken_plugin_is_named(monkeypatch):
    ep = importlib.metadata.EntryPoint("broken", "no_such_module_xyz", "builder")
    monkeypatch.setattr("builder.plugins._entry_points", lambda: [ep])
    with pytest.raises(PluginError, match="plugin 'broken' .*no_such_module_xyz.* failed to load"):
        load_plugins()


def test_unknown_hook_is_refused():
    bad = types.SimpleNamespace(register_widgets=hookimpl(lambda register: None))
    with pytest.raises(PluginError, match="register_widgets"):
        load_plugins([("bad", bad)], entry_points=False)


def test_a_hook_override_accepts_what_the_base_would_refuse(tmp_path):
    """check_supported asks the hooks: an architecture that maps its own activation name in
    mlp_activation builds (the base alone refuses the name), and computes what the built-in
    name for that activation computes."""
    import json
    import shutil

    import numpy as np

    from builder import BuildOptions, build
    from builder.errors import ConfigError
    from builder.testing import max_abs_diff, run_decoder
    from checkpoints import make_checkpoint

    class MyGelu(LlamaBuilder):
        architectures = ("MyGeluForCausalLM",)

        def mlp_activation(self):
            return "gelu_tanh" if self.config.hidden_act == "my_gelu" else super().mlp_activation()

    plugins = load_plugins([("mine", _plugin(register_architectures=lambda register:
                                             register(MyGelu)))])
    ck = make_checkpoint(tmp_path / "ck", "llama", hidden_act="gelu_pytorch_tanh")
    mine = shutil.copytree(ck, tmp_path / "mine")
    config = json.loads((mine / "config.json").read_text())
    (mine / "config.json").write_text(json.dumps(
        {**config, "architectures": ["MyGeluForCausalLM"], "hidden_act": "my_gelu"}))
    ids = np.arange(3, 13)[None]
    ours = run_decoder(build(BuildOptions(model_name=str(mine), output=tmp_path / "o"), plugins),
                       ids, steps=3)
    builtin = run_decoder(build(BuildOptions(model_name=str(ck), output=tmp_path / "b")), ids,
                          steps=3)
    assert max_abs_diff(ours.prefill_logits, builtin.prefill_logits) == 0.0
    (mine / "config.json").write_text(json.dumps(
        {**config, "architectures": ["LlamaForCausalLM"], "hidden_act": "my_gelu"}))
    with pytest.raises(ConfigError, match="hidden_act 'my_gelu' is not supported yet"):
        build(BuildOptions(model_name=str(mine), output=tmp_path / "r"))


def test_an_architecture_declares_roles_of_its_own(tmp_path):
    """A plugin names a tensor role of its own (a string key of weight_names, its shape from
    role_shape) and uses it in a decoder-layer step: the tensors are read and counted as used,
    those of layers not built (num_hidden_layers) are ignored, and a role without a shape is
    one clear error."""
    import onnx

    from builder import BuildOptions, ExtraOptions, build
    from builder.errors import ConfigError
    from builder.models.base import LLAMA_WEIGHT_NAMES
    from builder.ops import rms_norm

    class PostNorm(LlamaBuilder):
        architectures = ("LlamaForCausalLM",)
        weight_names = {**LLAMA_WEIGHT_NAMES,
                        "post_attn_norm": "model.layers.{i}.post_attn_norm.weight"}

        @classmethod
        def role_shape(cls, c, role):
            return (c.hidden_size,) if role == "post_attn_norm" else super().role_shape(c, role)

        def attention_output(self, layer, a):
            return rms_norm(self.gb, "post_attn_norm", a, self.weight("post_attn_norm", layer),
                            self.weight_name("post_attn_norm", layer), self.config.rms_norm_eps)

    ck = _llama_with(tmp_path / "ck", "post_attn_norm", "input_layernorm")
    plugins = _replacing

    out = build(BuildOptions(model_name=str(ck), output=tmp_path / "o"), plugins(PostNorm))
    names = {n.name for n in onnx.load(str(out / "model.onnx"), load_external_data=False)
             .graph.node}
    assert {"/model/layers.0/post_attn_norm/RMSNormalization",
            "/model/layers.1/post_attn_norm/RMSNormalization"} <= names
    build(BuildOptions(model_name=str(ck), output=tmp_path / "one",
                       extra=ExtraOptions.parse(["num_hidden_layers=1"])), plugins(PostNorm))

    class NoShape(PostNorm):
        @classmethod
        def role_shape(cls, c, role):
            return LlamaBuilder.role_shape.__func__(cls, c, role)

    with pytest.raises(ConfigError, match="NoShape.weight_names has role 'post_attn_norm', "
                                          "whose shape NoShape.role_shape does not give"):
        build(BuildOptions(model_name=str(ck), output=tmp_path / "x"), plugins(NoShape))


def test_an_own_role_that_projects_is_declared(tmp_path):
    """A projection under an architecture's own role: quantized at -p int4 and counted at the
    precision's bits by the QNN sizing when declared in linear_roles, kept in float when in
    float_roles, and an error when in neither (it was silently left in float)."""
    import onnx

    from builder import BuildOptions, ExtraOptions, build
    from builder.config import DecoderConfig
    from builder.errors import ConfigError
    from builder.models.base import LLAMA_WEIGHT_NAMES
    from builder.options import Precision
    from builder.pipeline import layer_weight_bytes

    class Mixer(LlamaBuilder):  # a square projection after attention, of its own
        architectures = ("LlamaForCausalLM",)
        weight_names = {**LLAMA_WEIGHT_NAMES, "mixer": "model.layers.{i}.mixer.weight"}

        @classmethod
        def role_shape(cls, c, role):
            return (c.hidden_size, c.hidden_size) if role == "mixer" \
                else super().role_shape(c, role)

        def attention_output(self, layer, a):
            return self.project("mixer", a, "mixer", layer, self.weight("mixer", layer).T,
                                self.weight_name("mixer", layer))

    ck = _llama_with(tmp_path / "ck", "mixer", "self_attn.o_proj")

    def ops(cls, name):
        plugins = _replacing(cls)
        out = build(BuildOptions(model_name=str(ck), output=tmp_path / name, precision=
                                 Precision.INT4, extra=ExtraOptions.parse(
                                     ["int4_algo_config=rtn"], [])), plugins)
        graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        return {n.op_type for n in graph.node if n.name.startswith("/model/layers.0/mixer/")}

    with pytest.raises(ConfigError, match=r"Mixer projects with its own role 'mixer', which it "
                                          r"declares neither in Mixer.linear_roles"):
        ops(Mixer, "neither")

    class Linear(Mixer):
        linear_roles = frozenset({"mixer"})

    class Float(Mixer):
        float_roles = frozenset({"mixer"})

    assert ops(Linear, "linear") == {"MatMulNBits"}
    assert ops(Float, "float") == {"MatMul"}
    config = DecoderConfig.from_file(ck / "config.json")
    shapes = Linear.layer_weight_shapes(config, 0)
    h = config.hidden_size  # at 8 bits plus a scale per row, where it counted 16 bits
    assert layer_weight_bytes(shapes, Precision.W8A16, 32, False) - layer_weight_bytes(
        shapes, Precision.W8A16, 32, False, Linear.linear_roles) == 2 * h * h - (h * h + 5 * h)


def test_a_packed_table_needs_no_names_for_its_parts(tmp_path):
    """A table that names the stored qkv_proj and gate_up_proj only (not q, k, v, gate, up,
    which the checkpoint does not hold): packed and unpacked builds match transformers' Phi-3;
    a table naming neither a part nor its packed tensor is one error (it was a KeyError)."""
    import numpy as np

    from builder import BuildOptions, ExtraOptions, build
    from builder.errors import ConfigError
    from builder.models import Phi3Builder
    from builder.roles import TensorRole as R
    from builder.testing import hf_logits, run_decoder
    from checkpoints import make_checkpoint

    class Packed(Phi3Builder):
        weight_names = {k: v for k, v in Phi3Builder.weight_names.items()
                        if k not in (R.Q, R.K, R.V, R.GATE, R.UP)}

    class Unnamed(Packed):
        weight_names = {k: v for k, v in Packed.weight_names.items() if k != R.QKV}

    plugins = _replacing
    ck = make_checkpoint(tmp_path / "ck", "phi3")
    ids = np.array([[3, 5, 7, 9, 11, 13]])
    ref = hf_logits(ck, ids, np.ones_like(ids), 6)
    for extra in ([], ["unpack_matmul=true"]):
        out = build(BuildOptions(model_name=str(ck), output=tmp_path / f"o{len(extra)}",
                                 extra=ExtraOptions.parse(extra, [])), plugins(Packed))
        assert np.abs(run_decoder(out, ids, steps=0).prefill_logits - ref).max() < 1e-4
    with pytest.raises(ConfigError, match=r"Unnamed.weight_names has no 'q' \(nor 'qkv', "
                                          r"which holds it\)"):
        build(BuildOptions(model_name=str(ck), output=tmp_path / "x"), plugins(Unnamed))


def test_q_k_norms_chosen_by_the_config(tmp_path, copy_checkpoint, qwen3_checkpoint):
    """has_qk_norm(config) decides per checkpoint (Cohere's use_qk_norm): true gives the
    built-in Qwen3's logits; false leaves q_norm/k_norm unused, an error; a qk_norm property
    (truthy for the class, whatever the config says) is refused."""
    import json

    import numpy as np

    from builder import BuildOptions, build
    from builder.errors import ConfigError, WeightError
    from builder.models import Qwen3Builder
    from builder.testing import run_decoder

    class ByConfig(Qwen3Builder):
        qk_norm = False
        config_keys = frozenset({"use_qk_norm"})

        @classmethod
        def has_qk_norm(cls, config):
            return config.flag("use_qk_norm")

    class Property(Qwen3Builder):
        qk_norm = property(lambda self: self.config.flag("use_qk_norm"))
        config_keys = frozenset({"use_qk_norm"})

    ck = copy_checkpoint(qwen3_checkpoint)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "use_qk_norm": True}))
    ids = np.array([[3, 5, 7, 9]])
    ours = build(BuildOptions(model_name=str(ck), output=tmp_path / "b"), _replacing(ByConfig))
    builtin = build(BuildOptions(model_name=str(qwen3_checkpoint), output=tmp_path / "q"))
    np.testing.assert_array_equal(run_decoder(ours, ids, steps=0).prefill_logits,
                                  run_decoder(builtin, ids, steps=0).prefill_logits)
    with pytest.raises(ConfigError, match=r"Property.qk_norm must be True or False"):
        build(BuildOptions(model_name=str(ck), output=tmp_path / "p"), _replacing(Property))
    (ck / "config.json").write_text(json.dumps({**cfg, "use_qk_norm": False}))
    with pytest.raises(WeightError, match=r"q_norm"):
        build(BuildOptions(model_name=str(ck), output=tmp_path / "f"), _replacing(ByConfig))


TUTORIAL = ROOT / "plugins" / "builder-seed-oss" / "README.md"
PUBLIC = {"builder", "builder.models", "builder.ops", "numpy"}


def _install_example(heading: str, name: str, tmp_path, max_lines: int | None = None) -> dict:
    """The tutorial's code block under ``heading``, as its reader would ship it: a package
    ``builder-<name>`` of its own (entry point ``name``), importing builder's public API only,
    installed into a folder; returns the environment that finds it."""
    import ast
    import os
    import re
    import subprocess
    import sys

    text = TUTORIAL.read_text().split(heading, 1)[1]
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert max_lines is None or len(code.splitlines()) <= max_lines
    imported = {n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(ast.parse(code)) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names}
    assert imported <= PUBLIC, imported - PUBLIC
    package = tmp_path / "pkg"
    (package / f"builder_{name}").mkdir(parents=True)
    (package / f"builder_{name}" / "__init__.py").write_text(code)
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"'
        f'\n[project]\nname = "builder-{name}"\nversion = "0.1"\n'
        f'[project.entry-points.builder]\n{name} = "builder_{name}"\n'
        f'[tool.setuptools]\npackages = ["builder_{name}"]\n')
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--target", str(site), str(package)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


def test_the_tutorials_plugin_installed_as_a_package(tmp_path):
    """The tutorial's second example (a norm, an activation and an option of its own), as its
    reader would ship it: a package of its own, installed, found through its entry point,
    importing builder's public API only; built by the CLI and checked against transformers'
    Llama carrying the same norm (a hook) and squared-ReLU MLP."""
    import json
    import subprocess
    import sys

    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from builder.testing import hf_logits, hf_model, max_abs_diff, run_decoder
    from checkpoints import make_checkpoint

    env = _install_example("## A second example", "tutorial", tmp_path)

    ck = make_checkpoint(tmp_path / "ck", "llama", hidden_act="relu2")
    tensors = load_file(ck / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        tensors[f"model.layers.{i}.post_feedforward_layernorm.weight"] = (
            1 + 0.3 * torch.randn(128, generator=g)).to(torch.bfloat16)
    save_file(tensors, str(ck / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config,
                                                "architectures": ["TutorialForCausalLM"]}))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True,
                              text=True, env=env, cwd=tmp_path)

    r = cli("--help")
    assert "tutorial_relu2 = mul [mul | pow] (plugin tutorial)" in r.stdout
    r = cli("-m", str(ck), "-o", str(tmp_path / "bad"), "--extra_options", "tutorial_relu2=cube")
    assert r.returncode == 2 and "tutorial_relu2='cube' is not one of: mul, pow" in r.stderr
    model = hf_model(ck)
    for layer, i in zip(model.model.layers, range(2)):
        norm = LlamaRMSNorm(128, eps=config["rms_norm_eps"])
        norm.weight.data = tensors[f"model.layers.{i}.post_feedforward_layernorm.weight"].float()
        layer.mlp.register_forward_hook(lambda m, inputs, out, norm=norm: norm(out))
    ids = np.random.default_rng(0).integers(3, 256, (1, 10))
    for way in ("mul", "pow"):
        out = tmp_path / way
        r = cli("-m", str(ck), "-o", str(out), "--extra_options", f"tutorial_relu2={way}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "TutorialBuilder (tutorial)" in r.stderr
        run = run_decoder(out, ids, steps=6)
        ref = hf_logits(None, run.tokens, run.attention_mask, 10, model=model)
        ours = np.concatenate([run.prefill_logits] + [s[:, None] for s in run.step_logits], 1)
        assert max_abs_diff(ours, ref) <= 1e-4, way


def test_the_tutorials_third_example_gptj(tmp_path):
    """The tutorial's third example (GPT-J: LayerNorms, a parallel block, an MLP without a gate,
    interleaved partial rotary, lm_head's bias, GPT-2's key names) under 40 lines, as its reader
    would ship it: installed as a package, importing builder's public API only, built by the
    CLI from a config.json as transformers writes it (n_inner null) and checked against
    transformers' GPT-J (prefill and decode) and its greedy generation through
    onnxruntime-genai."""
    import json
    import subprocess
    import sys

    import numpy as np

    from builder.testing import genai_greedy, hf_greedy, hf_logits, max_abs_diff, run_decoder
    from checkpoints import make_checkpoint

    env = _install_example("## A third example", "gptj", tmp_path, max_lines=39)
    ck = make_checkpoint(tmp_path / "ck", "gptj")
    assert json.loads((ck / "config.json").read_text())["n_inner"] is None
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "builder", "-m", str(ck), "-o", str(out)],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "GPTJBuilder (gptj)" in r.stderr
    ids = np.random.default_rng(0).integers(3, 256, (1, 10))
    run = run_decoder(out, ids, steps=6)
    ref = hf_logits(ck, run.tokens, run.attention_mask, 10)
    ours = np.concatenate([run.prefill_logits] + [s[:, None] for s in run.step_logits], 1)
    assert max_abs_diff(ours, ref) <= 1e-4
    prompt = [int(t) for t in ids[0]]
    assert genai_greedy(out, prompt, 8) == hf_greedy(ck, prompt, 8)
