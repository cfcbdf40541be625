"""Static transformer graphs of a range of layers (the unit of streamed calibration and of split
pipelines): chained in order they compute what the whole graph does."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from builder.config import DecoderConfig
from builder.graph import GraphBuilder, WeightStore
from builder.models.static import build_transformer, kv_names, layer_stream
from builder.options import BuildOptions, ExecutionProvider, ExtraOptions, Precision
from builder.plugins import default_plugins
from builder.runner import session
from builder.weights import CheckpointReader

S, C = 8, 32


def _write(ck, out, ranges, seq_len=S, batch=1):
    """One static fp16 transformer graph per layer range, weights in one shared data file."""
    out.mkdir()
    plugins = default_plugins()
    target = plugins.targets.get("qnn")
    config = DecoderConfig.from_file(ck / "config.json")
    cls = plugins.architectures.get(config.architecture)
    options = BuildOptions(model_name=str(ck), output=out, precision=Precision.FP16,
                           execution_provider=ExecutionProvider.QNN,
                           extra=ExtraOptions.parse([f"qnn_prefill_length={S}",
                                                     f"qnn_context_length={C}"]))
    store = WeightStore(out / "model.data")
    names = []
    try:
        with CheckpointReader(ck) as weights:
            for i, layers in enumerate(ranges):
                gb = GraphBuilder(f"part{i}", float_dtype=np.float16, store=store)
                build_transformer(cls(config, options, target, weights, gb), seq_len, C, layers,
                                  batch)
                gb.save(out / f"part{i}.onnx")
                names.append(f"part{i}.onnx")
    finally:
        store.close()
    return config, names


def _run(out, names, feeds):
    """Run the graphs in turn, each on the stream the one before it produced."""
    values = dict(feeds)
    for name in names:
        sess = session(out, name)
        wanted = {i.name: values[i.name] for i in sess.get_inputs()}
        values.update(zip([o.name for o in sess.get_outputs()], sess.run(None, wanted)))
    return values


@pytest.mark.parametrize("arch", ["qwen3", "llama", "phi3"])
def test_chained_layer_ranges_compute_the_whole_graph(arch, checkpoints, tmp_path):
    ck = checkpoints[arch]
    config, whole = _write(ck, tmp_path / "whole", [None])
    layers = config.num_hidden_layers
    splits = {"one per layer": [range(i, i + 1) for i in range(layers)],
              "two parts": [range(0, 1), range(1, layers)]}
    rng = np.random.default_rng(0)
    kv = [1, config.num_key_value_heads, C, config.head_dim]
    feeds = {"inputs_embeds": rng.normal(0, 1, (1, S, config.hidden_size)).astype(np.float16),
             "past_seq_len": np.array([[S + 5 - 1]], np.int32),  # a prefill after 5 past rows
             "total_seq_len": np.array([C], np.int32),
             **{n: rng.normal(0, 1, kv).astype(np.float16)
                for i in range(layers) for n in kv_names(i)[:2]}}
    expected = _run(tmp_path / "whole", whole, feeds)
    for label, ranges in splits.items():
        folder = tmp_path / label.replace(" ", "_")
        _, names = _write(ck, folder, ranges)
        got = _run(folder, names, feeds)
        for name in ["hidden_states"] + [n for i in range(layers) for n in kv_names(i)[2:]]:
            assert got[name].shape == expected[name].shape
            # within an fp16 ulp: onnxruntime fuses a residual Add into the next norm (its sum
            # kept in fp32) inside one graph, while a graph boundary rounds the stream to fp16
            np.testing.assert_allclose(got[name].astype(np.float32),
                                       expected[name].astype(np.float32), rtol=2e-3, atol=2e-3,
                                       err_msg=f"{arch} {label}: {name}")
        # each part declares only its own layers' KV buffers, and chains by name
        for part, layers_of in zip(names, ranges):
            graph = onnx.load(str(folder / part), load_external_data=False).graph
            inputs = {i.name for i in graph.input}
            assert {n for n in inputs if n.startswith(("past_key", "past_value"))} == {
                n for i in layers_of for n in kv_names(i)[:2]}
            assert ("inputs_embeds" if layers_of.start == 0
                    else layer_stream(layers_of.start)) in inputs


def test_layer_range_must_be_consecutive(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="not a consecutive range"):
        _write(checkpoints["llama"], tmp_path / "bad", [range(0, 5)])


@pytest.mark.parametrize("arch", ["qwen3", "llama", "phi3"])
@pytest.mark.parametrize("seq_len", [S, 1])
def test_batched_graph_computes_each_call(arch, seq_len, checkpoints, tmp_path):
    """Calibration's graphs take any batch: each row is the shipped (batch 1) graph's call
    with that row's own past_seq_len and KV buffers."""
    ck = checkpoints[arch]
    config, single = _write(ck, tmp_path / "single", [None], seq_len)
    _, batched = _write(ck, tmp_path / "batched", [None], seq_len, "batch")
    graph = onnx.load(str(tmp_path / "batched" / batched[0]), load_external_data=False).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    rng = np.random.default_rng(1)
    layers, rows = config.num_hidden_layers, [seq_len - 1, seq_len + 6, C - 1]  # past_seq_len
    kv = [1, config.num_key_value_heads, C, config.head_dim]
    calls = [{"inputs_embeds": rng.normal(0, 1, (1, seq_len, config.hidden_size)
                                          ).astype(np.float16),
              "past_seq_len": np.array([[row]], np.int32),
              "total_seq_len": np.array([C], np.int32),
              **{n: rng.normal(0, 1, kv).astype(np.float16)
                 for i in range(layers) for n in kv_names(i)[:2]}} for row in rows]
    expected = [_run(tmp_path / "single", single, feeds) for feeds in calls]
    together = {n: calls[0][n] if n == "total_seq_len" else np.concatenate([f[n] for f in calls])
                for n in calls[0]}
    got = _run(tmp_path / "batched", batched, together)
    for name in ["hidden_states"] + [n for i in range(layers) for n in kv_names(i)[2:]]:
        assert got[name].shape[0] == len(rows)
        for r, want in enumerate(expected):
            np.testing.assert_allclose(got[name][r:r + 1].astype(np.float32),
                                       want[name].astype(np.float32), rtol=2e-3, atol=2e-3,
                                       err_msg=f"{arch} S={seq_len} row {r}: {name}")
