"""CheckpointReader: sharded and single-file, lazy, strict about what it reads."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from builder.errors import WeightError
from builder.weights import CheckpointReader


def _write(folder, tensors, name="model.safetensors"):
    folder.mkdir(exist_ok=True)
    save_file(tensors, str(folder / name))
    return folder


def test_dtypes_are_read_as_stored(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    ck = _write(tmp_path / "ck", {"bf16": a.astype(ml_dtypes.bfloat16),
                                  "f16": a.astype(np.float16), "f32": a})
    with CheckpointReader(ck) as r:
        for name in ("bf16", "f16", "f32"):
            out = r.read(name, (2, 3))
            expected = {"bf16": ml_dtypes.bfloat16, "f16": np.float16, "f32": np.float32}[name]
            assert out.dtype == expected and (out.astype(np.float32) == a).all()
        assert r.unused() == []


def test_sharded_index_and_unused_tracking(qwen3_checkpoint):
    index = json.loads((qwen3_checkpoint / "model.safetensors.index.json").read_text())
    with CheckpointReader(qwen3_checkpoint) as r:
        assert len(r.files()) > 1
        assert r.names() == sorted(index["weight_map"])
        r.read("model.norm.weight")
        assert "model.norm.weight" not in r.unused()
        assert len(r.unused()) == len(index["weight_map"]) - 1
        assert r.unused(ignored=("model.layers.*",)) == ["model.embed_tokens.weight"]
        with pytest.raises(WeightError, match="not used by the build"):
            r.check_all_consumed()


def test_reads_lazily(qwen3_checkpoint, monkeypatch):
    """Opening reads headers only; each read materialises exactly the tensor asked for."""
    from builder import weights

    calls = []
    real_open = weights.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def get_tensor(self, name):
            calls.append(name)
            return self.handle.get_tensor(name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def __getattr__(self, attr):
            return getattr(self.handle, attr)

    monkeypatch.setattr(weights, "safe_open", Spy)
    with CheckpointReader(qwen3_checkpoint) as r:
        assert r.shape("model.embed_tokens.weight") == (256, 64) and calls == []
        r.read("model.layers.0.mlp.up_proj.weight")
        assert calls == ["model.layers.0.mlp.up_proj.weight"]


def test_index_pointing_at_missing_shard(tmp_path):
    ck = _write(tmp_path / "ck", {"a": np.zeros(4, np.float32)}, "model-00001-of-00002.safetensors")
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(WeightError, match="model-00002-of-00002.safetensors listed but not found"):
        CheckpointReader(ck)


def test_index_disagreeing_with_shards(tmp_path):
    ck = _write(tmp_path / "ck", {"a": np.zeros(4, np.float32)}, "s1.safetensors")
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "s1.safetensors", "b": "s1.safetensors"}}))
    with pytest.raises(WeightError, match="says 'b' is in s1.safetensors"):
        CheckpointReader(ck)


def test_shape_and_dtype_checks(tmp_path):
    ck = _write(tmp_path / "ck", {"w": np.zeros((2, 3), np.float32),
                                  "i": np.zeros(3, np.int32)})
    with CheckpointReader(ck) as r:
        with pytest.raises(WeightError, match=r"'w' in model.safetensors has shape \[2, 3\]; "
                                              r"the config implies \[3, 2\]"):
            r.read("w", (3, 2))
        with pytest.raises(WeightError, match="'i' .* dtype I32"):
            r.read("i")
        with pytest.raises(WeightError, match="did you mean 'w'"):
            r.read("ww")


def test_garbage_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(WeightError, match="model.safetensors: not a readable safetensors file"):
        CheckpointReader(tmp_path)


def test_rows_read_only_the_rows_asked_for(tmp_path):
    """A table read a range of rows at a time: the same values as the whole read, every dtype,
    in a shard after another tensor (offsets from the header), NaN found in the rows read."""
    a = np.arange(40 * 3, dtype=np.float32).reshape(40, 3) / 7
    bad = a.copy()
    bad[33, 1] = np.nan
    ck = _write(tmp_path / "ck", {"first": np.ones((5, 2), np.float16),
                                  "bf16": a.astype(ml_dtypes.bfloat16),
                                  "f16": a.astype(np.float16), "f32": a, "bad": bad})
    with CheckpointReader(ck) as r:
        for name in ("bf16", "f16", "f32"):
            whole, rows = r.read(name), r.rows(name, (40, 3))
            assert rows.shape == (40, 3) and len(rows) == 40 and rows.dtype == whole.dtype
            for part in (slice(0, 1), slice(7, 19), slice(32, None), slice(40, 50)):
                got = rows[part]
                assert got.dtype == whole.dtype and got.shape == whole[part].shape
                assert np.array_equal(got.astype(np.float32), whole[part].astype(np.float32))
        with pytest.raises(WeightError, match="shape"):
            r.rows("f32", (41, 3))
        table = r.rows("bad")
        assert np.isfinite(table[0:33]).all()   # the NaN is not in these rows
        with pytest.raises(WeightError, match="'bad'.*1 NaN"):
            table[30:40]
        assert "bad" not in r.unused()
