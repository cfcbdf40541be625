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
    ("qnn_calibration_steps=1", "must be at least 2"),
    ("qnn_calibration_coverage=-1", "must be 0 .the prompts alone. or a positive integer"),
    ("qnn_soc_model=banana", "must be a QNN soc model number"),
    ("qnn_soc_model=-60", "must be a QNN soc model number"),
    ("qnn_htp_arch=99", "is not one of: 68, 69, 73, 75, 79, 81"),
    ("qnn_htp_arch=v73", "did you mean '73'"),
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


def test_repeated_extra_options_all_count(tmp_path):
    """--extra_options given twice: both lists count (argparse's default kept only the last);
    the same option twice with different values is refused."""
    import json

    out = tmp_path / "o"
    r = run_cli("-m", "examples/tiny-qwen3", "-o", str(out), "-p", "int4", "--extra_options",
                "int4_block_size=64", "--extra_options", "int4_accuracy_level=1")
    assert r.returncode == 0, r.stderr[-2000:]
    given = json.loads((out / "build_manifest.json").read_text())["options"]["extra_options"]
    assert (given["int4_block_size"], given["int4_accuracy_level"]) == (64, 1)
    r = run_cli("-m", "examples/tiny-qwen3", "-o", str(tmp_path / "p"), "--extra_options",
                "int4_block_size=64", "--extra_options", "int4_block_size=128", "-p", "int4")
    assert r.returncode == 2 and "'int4_block_size' given twice" in r.stderr, r.stderr


def test_cli_needs_a_model(tmp_path):
    r = run_cli("-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "give a model" in r.stderr


def test_readme_documents_every_option():
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    for f in ExtraOptions.catalogue():
        assert f"`{f.name}`" in readme, f.name
