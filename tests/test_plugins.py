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


def _plugin(**hooks):
    return types.SimpleNamespace(**{k: hookimpl(v) for k, v in hooks.items()})


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
    from safetensors.torch import load_file, save_file

    from builder import BuildOptions, ExtraOptions, build
    from builder.errors import ConfigError
    from builder.models.base import LLAMA_WEIGHT_NAMES
    from builder.ops import rms_norm
    from checkpoints import make_checkpoint

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

    ck = make_checkpoint(tmp_path / "ck", "llama")
    tensors = load_file(ck / "model.safetensors")
    for i in range(2):
        tensors[f"model.layers.{i}.post_attn_norm.weight"] = tensors[
            f"model.layers.{i}.input_layernorm.weight"].clone()
    save_file(tensors, str(ck / "model.safetensors"), metadata={"format": "pt"})

    def plugins(cls):
        return load_plugins([("mine", _plugin(register_architectures=lambda register:
                                              register(cls, replace=True)))])

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
