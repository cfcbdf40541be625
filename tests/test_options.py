"""The extra options catalogue and the CLI's flags."""

from __future__ import annotations

import dataclasses

import pytest

from builder.errors import OptionError
from builder.options import ExtraOptions, _opt, options_help
from conftest import run_cli


def test_defaults_and_types():
    opts = ExtraOptions.parse(["shared_embeddings=false", "hf_token=abc"])
    assert opts.shared_embeddings is False and opts.hf_token == "abc"
    assert ExtraOptions.parse([]).shared_embeddings is None  # follows tie_word_embeddings


@pytest.mark.parametrize("value, expected", [("true", True), ("1", True), ("No", False)])
def test_booleans(value, expected):
    assert ExtraOptions.parse([f"shared_embeddings={value}"]).shared_embeddings is expected


@pytest.mark.parametrize("item, message", [
    ("shared_embedings=true", "did you mean 'shared_embeddings'"),
    ("shared_embeddings", "is not KEY=VALUE"),
    ("shared_embeddings=2", "expected true or false"),
    ("int4_block_size=48", "is not one of: 16, 32, 64, 128, 256"),
    ("int4_algo_config=k_qant", "did you mean 'k_quant'"),
    ("int4_block_size=abc", "invalid literal"),
    ("num_hidden_layers=0", "positive integer"),
    ("qnn_calibration_headroom=0.5", "must be at least 1"),
    ("qnn_calibration_headroom=wide", "could not convert"),
    ("qnn_calibration_headroom=inf", "expected a finite number"),
])
def test_bad_items(item, message):
    with pytest.raises(OptionError, match=message):
        ExtraOptions.parse([item])


def test_declared_but_unimplemented_options_are_refused():
    """An option may be declared before it is built: it is then refused, never ignored."""
    @dataclasses.dataclass(frozen=True)
    class Future(ExtraOptions):
        future_thing: bool = _opt(False, "Not built yet.", implemented=False)

    assert "not supported yet" in options_help(Future)
    with pytest.raises(OptionError, match="'future_thing' is not supported yet"):
        Future.parse(["future_thing=true"])
    assert Future.parse(["shared_embeddings=true"]).shared_embeddings is True


def test_aliases():
    assert ExtraOptions.parse(["algo_config=k_quant"]).int4_algo_config == "k_quant"
    assert ExtraOptions.parse(["fuse_qkv=false"]).unpack_matmul is True
    assert ExtraOptions.parse(["fuse_qkv=true"]).unpack_matmul is False
    with pytest.raises(OptionError, match="given twice"):
        ExtraOptions.parse(["fuse_qkv=true", "unpack_matmul=true"])


def test_every_option_has_help():
    for f in ExtraOptions.catalogue():
        assert f.metadata["help"].strip(), f.name
        assert f.name in options_help()


def test_cli_help_prints_the_catalogue():
    r = run_cli("--help")
    assert r.returncode == 0
    for f in ExtraOptions.catalogue():
        assert f.name in r.stdout
    assert "--extra_options" in r.stdout and "-e {cpu" in r.stdout


def test_cli_needs_a_model(tmp_path):
    r = run_cli("-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "give a model" in r.stderr


def test_readme_documents_every_option():
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    for f in ExtraOptions.catalogue():
        assert f"`{f.name}`" in readme, f.name
