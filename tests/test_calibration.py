"""Layer-streamed calibration: memory bounded by one layer, and its parts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from checkpoints import make_checkpoint

from builder import BuildOptions, ExecutionProvider, Precision, build
from builder.options import ExtraOptions


@pytest.mark.parametrize("layers", [2, 6])
def test_calibration_sessions_hold_one_layer(layers, tmp_path, monkeypatch):
    """Every onnxruntime session calibration and the accuracy report open reads one layer's
    weights (or the embeddings, or lm_head), whatever the number of layers: the data file each
    session loads stays the size of one layer in fp32, and each layer is written once per pass
    (w8a16's default, gptq, runs each layer in float first, for its Hessians)."""
    import builder.quant.stream as stream

    ck = make_checkpoint(tmp_path / "ck", "qwen3", num_hidden_layers=layers)
    opened = []

    def session(folder, filename):
        data = sorted(p for p in folder.iterdir() if p.suffix == ".data")
        opened.append((filename, {p.name: p.stat().st_size for p in data}))
        return real(folder, filename)

    real = stream.session
    monkeypatch.setattr(stream, "session", session)
    out = build(BuildOptions(model_name=str(ck), output=tmp_path / "o",
                             precision=Precision.W8A16, execution_provider=ExecutionProvider.QNN,
                             extra=ExtraOptions.parse(["qnn_prefill_length=8",
                                                       "qnn_context_length=64"])))
    cfg = json.loads((ck / "config.json").read_text())
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    layer_fp32 = 4 * (h * hd * (2 * heads + 2 * kv) + 3 * h * i + 2 * h + 2 * hd)
    layer_files = [sizes["layer.data"] for name, sizes in opened if "layer.data" in sizes]
    # three passes (GPTQ's float one, calibration with the rounded weights, the report) × two
    # graphs (prefill, decode) per layer
    assert len(layer_files) == 6 * layers
    assert max(layer_files) <= 1.1 * layer_fp32 + 64 * 1024, (max(layer_files), layer_fp32)
    assert min(layer_files) >= 0.25 * layer_fp32 * 0.9  # (the report's: quantized)
    assert all(len(sizes) == 1 for _, sizes in opened)  # nothing else left in the work folder
    assert not (out / ".work").exists()


def _scales(folder):
    import onnx

    out = {}
    for graph in ("context", "iterator", "lm_head_context", "lm_head_iterator"):
        model = onnx.load(str(folder / f"{graph}.onnx"))
        out.update({(graph, t.name): onnx.numpy_helper.to_array(t)
                    for t in model.graph.initializer if t.name.endswith("_scale")})
    return out


def test_batched_calibration_matches_one_call_at_a_time(tmp_path, monkeypatch):
    """Calibration runs the calls of many sequences at once over only the KV rows they reach;
    one call at a time over all C rows (as the shipped graphs run) gives the same ranges, hence
    the same scales, and the same accuracy report, at the default P and C. (Weights rounded to
    nearest: GPTQ's Hessians, summed in another order, may move a code at a rounding boundary,
    and a range with it by 1e-5, which is not what this compares.)"""
    import builder.quant.stream as stream

    ck = make_checkpoint(tmp_path / "ck", "qwen3", trained=True)

    def build_to(name):
        return build(BuildOptions(model_name=str(ck), output=tmp_path / name,
                                  precision=Precision.W8A16,
                                  execution_provider=ExecutionProvider.QNN,
                                  extra=ExtraOptions.parse(["int4_algo_config=rtn"])))

    batched = build_to("batched")
    monkeypatch.setattr(stream, "BATCH", 1)
    monkeypatch.setattr(stream, "buffer_rows", lambda sequences, context, method: context)
    single = build_to("single")
    ours, reference = _scales(batched), _scales(single)
    assert ours.keys() == reference.keys() and len(ours) > 100
    for key, want in reference.items():
        np.testing.assert_allclose(ours[key], want, rtol=1e-5, err_msg=str(key))
    report = {n: json.loads((f / "build_manifest.json").read_text())["accuracy"]
              for n, f in (("batched", batched), ("single", single))}
    for phase in ("prefill", "decode"):
        for figure in ("mean_cosine", "top1_agreement", "mean_kl"):
            assert report["batched"][phase][figure] == pytest.approx(
                report["single"][phase][figure], rel=1e-4, abs=1e-6), (phase, figure)


def test_continuation_is_the_following_text():
    from builder.quant.calibration import continuation

    ids = [[1, 2], [3, 4, 5], [6]]
    assert continuation(ids, 0, 4) == [3, 4, 5, 6]
    assert continuation(ids, 2, 3) == [1, 2, 3]
    assert continuation([[7]], 0, 3) == [7, 7, 7]


def test_steps_batch_calls_in_order():
    """Calls of different sequences run together (decode calls coincide however many prefill
    chunks a prompt has), each sequence's calls in order, recorded and unrecorded calls apart,
    at most BATCH at a time, every call exactly once."""
    from builder.quant.stream import BATCH, DECODE, PREFILL, sequence, steps

    seqs = [sequence(list(range(n)), [7] * 5, 4, 0, False, True) for n in (3, 4, 9, 13)]
    seqs += [sequence(list(range(8)), [], 4, 0, True, False) for _ in range(BATCH + 3)]
    seqs += [sequence(list(range(5)), [7] * 2, 4, 0, False, False)]
    plan = steps(seqs, by_record=True)
    done = [(i, j) for _, _, batch in plan for i, j in batch]
    assert sorted(done) == [(i, j) for i, s in enumerate(seqs) for j in range(len(s.calls))]
    for i in range(len(seqs)):  # in order within each sequence
        order = [j for k, j in done if k == i]
        assert order == sorted(order)
    for kind, record, batch in plan:
        assert 0 < len(batch) <= BATCH
        assert {(seqs[i].calls[j].kind, seqs[i].calls[j].record) for i, j in batch} == {
            (kind, record)}
    decode = [batch for kind, record, batch in plan if kind == DECODE and record]
    assert len(decode) == 5 and all(len(b) == 4 for b in decode)  # the 4 prompts at once
    prefill = [batch for kind, record, batch in plan if kind == PREFILL and record]
    n = BATCH + 3  # sequences, each two chunks: two batches of even sizes, twice
    assert [len(b) for b in prefill] == [(n + 1) // 2, n // 2] * 2
    assert {record for _, record, _ in steps(seqs, by_record=False)} == {False}
    # calls of 64 tokens: at most BATCH_TOKENS // 64 = 4 at once, in batches of even sizes
    wide = [sequence(list(range(64)), [7], 64, 0, True, True) for _ in range(9)]
    assert [len(b) for kind, _, b in steps(wide, True) if kind == PREFILL] == [3, 3, 3]
    assert [len(b) for kind, _, b in steps(wide, True) if kind == DECODE] == [5, 4]


def test_percentile_ranges_against_numpy():
    """The percentile estimator's histograms (re-binned as the range grows) cut where numpy's
    percentile of all the values does, within a bin; minmax is exact."""
    from builder.quant.ranges import BINS, Ranges

    rng = np.random.default_rng(3)
    chunks = [rng.standard_normal(200_000).astype(np.float32) * s for s in (0.5, 1.0, 3.0)]
    chunks.append(np.array([40.0, -25.0], np.float32))  # outliers the percentile cuts
    every = np.concatenate(chunks)
    p, m = Ranges("percentile"), Ranges("minmax")
    for c in chunks:
        p.add("g", {"t": c})
        m.add("g", {"t": c})
    lo, hi = p.result("g")["t"]
    width = (every.max() - every.min()) / BINS
    assert abs(lo - np.percentile(every, 0.0005)) <= 2 * width
    assert abs(hi - np.percentile(every, 99.9995)) <= 2 * width
    assert hi < 20 and lo > -20
    assert m.result("g")["t"] == (float(every.min()), float(every.max()))


def test_calibration_prompts_as_token_ids(tmp_path):
    """A .json calibration file: its prompts' token ids taken as they are (a list of ids, or
    a row whose input_ids is one), then cut and counted as a text file's prompts are."""
    from pathlib import Path

    from builder.quant.calibration import prompts

    tokenizer = Path(__file__).parent.parent / "examples" / "tiny-qwen3"
    rows = [[5, 6, 7, 8], {"input_ids": [255, 0, 9], "attention_mask": [1, 1, 1]}, [3] * 50,
            [4, 4]]
    path = tmp_path / "ids.JSON"
    path.write_text(json.dumps(rows))
    assert prompts(ExtraOptions(qnn_calibration=str(path)), tokenizer, 512) == [
        [5, 6, 7, 8], [255, 0, 9], [3] * 50, [4, 4]]
    # each cut to the context less the steps; at most calibration_samples; by tokens
    assert prompts(ExtraOptions(qnn_calibration=str(path), qnn_calibration_steps=16),
                   tokenizer, 21) == [[5, 6, 7, 8], [255, 0, 9], [3] * 4, [4, 4]]
    assert len(prompts(ExtraOptions(qnn_calibration=str(path), qnn_calibration_samples=2),
                       tokenizer, 512)) == 2
    assert len(prompts(ExtraOptions(qnn_calibration=str(path), qnn_calibration_tokens=10),
                       tokenizer, 512)) == 2


def test_token_id_calibration_builds_as_its_text_does(tmp_path):
    """The shipped prompts' token ids as a .json file and the text itself calibrate and round
    the same build (int4 gptq on cpu: the same bytes)."""
    from pathlib import Path

    from builder.cli import main
    from builder.quant.calibration import PROMPTS, tokenize

    example = Path(__file__).parent.parent / "examples" / "tiny-qwen3"
    ids = tmp_path / "prompts.json"
    ids.write_text(json.dumps(tokenize(PROMPTS, 24, example, 10**6)))
    built = {}
    for name, path in (("text", PROMPTS), ("ids", ids)):
        out = tmp_path / name
        assert main(["-m", str(example), "-o", str(out), "-p", "int4", "--extra_options",
                     "int4_algo_config=gptq", f"qnn_calibration={path}"]) == 0
        built[name] = (out / "model.onnx.data").read_bytes()
    assert built["ids"] == built["text"]


def test_calibration_prompts_are_taken_by_tokens(tmp_path):
    """calibration_tokens: the prompts in order while they hold at most that many tokens (the
    first always), counted before each is cut to the context, at most calibration_samples of
    them. The shipped prompts at the default: the first 24 (2,392 tokens of the tests'
    byte-level tokenizer, 535 of GPT-2's BPE), as before the file grew to 93."""
    from pathlib import Path

    from builder.quant.calibration import PROMPTS, prompts, tokenize

    tokenizer = Path(__file__).parent.parent / "examples" / "tiny-qwen3"
    every = tokenize(PROMPTS, 1000, tokenizer, 10**6)
    assert len(every) == 93
    default = prompts(ExtraOptions(), tokenizer, 512)
    assert len(default) == 24 and sum(map(len, default)) == 2392
    assert default == every[:24]
    lengths = np.cumsum([len(p) for p in every])
    for budget in (1, 500, 2400, 5000):
        got = tokenize(PROMPTS, 1000, tokenizer, 10**6, budget)
        want = max(1, int(np.searchsorted(lengths, budget, side="right")))
        assert len(got) == want, budget
    # the choice does not depend on the context's cut; the count caps it
    short = prompts(ExtraOptions(), tokenizer, 64)
    assert len(short) == 24 and all(p == q[:len(p)] for p, q in zip(short, default))
    assert len(prompts(ExtraOptions(qnn_calibration_samples=5), tokenizer, 512)) == 5
    assert len(prompts(ExtraOptions(qnn_calibration_tokens=10**6, qnn_calibration_samples=1000),
                       tokenizer, 512)) == 93
    assert len(prompts(ExtraOptions(qnn_calibration_samples=1000), tokenizer, 512)) == 24


def test_coverage_takes_the_extremes_beyond_the_text():
    """qnn_calibration_coverage's tokens: those holding a dimension's vocabulary-wide largest or
    smallest embedding value beyond the text's own, the farthest (in the text's span of that
    dimension) first, each once, at most the count."""
    from builder.quant.calibration import coverage
    from builder.quant.stream import Extremes

    e = Extremes(hi=np.array([2.0, 1.0, 5.0]), hi_ids=np.array([7, 3, 9]),
                 lo=np.array([-1.0, -4.0, -1.0]), lo_ids=np.array([4, 8, 7]),
                 own_hi=np.array([1.0, 1.0, 1.0]), own_lo=np.array([-1.0, -2.0, 0.0]))
    # beyond: dim 0's largest by 1/2 of its span (token 7), dim 2's by 4 (9), dim 1's smallest
    # by 2/3 (8), dim 2's by 1 (7 again); dim 1's largest and dim 0's smallest: the text's own
    assert coverage(e, 10) == [9, 7, 8]
    assert coverage(e, 2) == [9, 7]
    assert coverage(e, 0) == []


def test_coverage_against_the_checkpoints_table(tmp_path, monkeypatch):
    """The extremes calibration reads (the pipeline's embeddings graph over the vocabulary, a
    slice of rows at a time) against numpy over the checkpoint's own table times Granite's
    embedding_multiplier, the rows the tokenizer gives only, the text's tokens those of the
    calibration prompts; the tokens prefilled are ``coverage``'s of them."""
    from safetensors.numpy import load_file

    import builder.quant.calibration as calibration
    import builder.quant.stream as stream
    from builder.quant.calibration import prompts

    ck = make_checkpoint(tmp_path / "ck", "granite")
    seen = {}

    def coverage(extremes, count):
        seen["extremes"], seen["count"] = extremes, count
        seen["tokens"] = real(extremes, count)
        return seen["tokens"]

    real = calibration.coverage
    monkeypatch.setattr(calibration, "coverage", coverage)
    # a tokenizer of 200 tokens: the table's rows beyond them (padding) are none of its
    monkeypatch.setattr(calibration, "vocabulary", lambda tokenizer_dir: 200)
    monkeypatch.setattr(stream, "LOGITS_BYTES", 40 * 4 * 64)  # (several slices of 40 rows)
    build(BuildOptions(model_name=str(ck), output=tmp_path / "o", precision=Precision.W8A16,
                       execution_provider=ExecutionProvider.QNN,
                       extra=ExtraOptions.parse(["qnn_prefill_length=8",
                                                 "qnn_context_length=64",
                                                 "qnn_calibration_coverage=20"])))
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["hidden_size"] == 64 and cfg["embedding_multiplier"] != 1
    table = load_file(ck / "model.safetensors")["model.embed_tokens.weight"].astype(np.float64)
    assert len(table) == 256
    table = table[:200] * cfg["embedding_multiplier"]
    text = sorted({t for p in prompts(ExtraOptions(), ck, 64) for t in p if t < 200})
    e = seen["extremes"]
    np.testing.assert_allclose(e.hi, table.max(0), rtol=1e-6)
    np.testing.assert_allclose(e.lo, table.min(0), rtol=1e-6)
    assert (e.hi_ids == table.argmax(0)).all() and (e.lo_ids == table.argmin(0)).all()
    np.testing.assert_allclose(e.own_hi, table[text].max(0), rtol=1e-6)
    np.testing.assert_allclose(e.own_lo, table[text].min(0), rtol=1e-6)
    assert seen["count"] == 20 and len(seen["tokens"]) == 20  # (random weights: many beyond)
    assert not set(seen["tokens"]) & set(text)
