"""Build speed and memory: our builder against onnxruntime-genai's, same checkpoint, same run.

    python benchmarks/build_benchmark.py [--model qwen3-0.6b|qwen3-1.7b|qwen3-4b|qwen3-8b|
                                          llama-3.2-1b|qwen3-30b-a3b-4l] [--runs 1] [--work DIR]

qwen3-30b-a3b-4l is Qwen3-30B-A3B's full width (128 experts of 768, top 8) with 4 of its 48
layers; the cases int4-rtn-2l / int4-rtn-4l build 2 and 4 of them, whose difference is the
time and memory of one layer (the projection to 48 layers is printed).

Writes a random bf16 checkpoint with the exact config of the named model (numpy only, seeded),
then builds it with ``python -m builder`` and, when it is importable, with
``python -m onnxruntime_genai.models.builder``; each build runs in its own process and reports
wall time, peak RSS (from wait4) and output size. Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

CONFIGS = {
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
        "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
        "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 151643,
        "eos_token_id": 151645, "attention_bias": False, "torch_dtype": "bfloat16"},
    **{name: {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
              "hidden_size": h, "intermediate_size": i, "num_hidden_layers": n,
              "num_attention_heads": heads, "num_key_value_heads": 8, "head_dim": 128,
              "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
              "tie_word_embeddings": tied, "hidden_act": "silu", "bos_token_id": 151643,
              "eos_token_id": 151645, "attention_bias": False, "torch_dtype": "bfloat16"}
       for name, h, i, n, heads, tied in (("qwen3-1.7b", 2048, 6144, 28, 16, True),
                                          ("qwen3-4b", 2560, 9728, 36, 32, True),
                                          ("qwen3-8b", 4096, 12288, 36, 32, False))},
    "qwen3-30b-a3b-4l": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 151643, "eos_token_id": 151645, "attention_bias": False,
        "torch_dtype": "bfloat16"},
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 128000,
        "eos_token_id": 128001, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "bfloat16"},
}


FULL_LAYERS = {"qwen3-30b-a3b-4l": 48}  # the real model's depth, for the projection


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q)})
        if "num_experts" in c:
            mi = c["moe_intermediate_size"]
            shapes[p + "mlp.gate.weight"] = (c["num_experts"], h)
            for e in range(c["num_experts"]):
                shapes.update({p + f"mlp.experts.{e}.gate_proj.weight": (mi, h),
                               p + f"mlp.experts.{e}.up_proj.weight": (mi, h),
                               p + f"mlp.experts.{e}.down_proj.weight": (h, mi)})
        else:
            shapes.update({p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                           p + "mlp.down_proj.weight": (h, i)})
        if c["model_type"].startswith("qwen3"):
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], h)
    return shapes


def make_checkpoint(folder: Path, config: dict, shard_bytes: int = 500_000_000) -> None:
    """Random bf16 weights (std 0.02, norms 1.0), sharded with an index, as transformers saves."""
    if (folder / "model.safetensors.index.json").is_file():
        if not (folder / "tokenizer_config.json").is_file():
            write_tokenizer(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = tensor_shapes(config)
    shards: list[list[str]] = [[]]  # names per shard, planned from the shapes
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if size + nbytes > shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for k, names in enumerate(shards):  # one shard in memory at a time
        shard = {}
        for name in names:
            shape = shapes[name]
            t = (np.ones(shape, np.float32) if len(shape) == 1 else
                 rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
            shard[name] = t.astype(ml_dtypes.bfloat16)
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
        total += sum(t.nbytes for t in shard.values())
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder)


def write_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer (256 ids, all inside any real vocabulary), so that QNN calibration
    can tokenize its prompts; needs the tokenizers package."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        return
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))},
                               merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(  # (onnxruntime-genai reads both)
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds, peak RSS (MB) of one child process: its own high-water mark (VmHWM), read
    from /proc while it runs. (wait4's ru_maxrss would not do: a child forked from this
    process, which made the random checkpoint, inherits this process's resident size as its
    maximum until it execs, and Linux keeps that maximum across the exec.)"""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    hwm = [0.0]
    reading = threading.Thread(target=_watch_hwm, args=(proc.pid, hwm), daemon=True)
    reading.start()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    reading.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr.decode()[-2000:]}")
    return {"wall_s": wall, "peak_rss_mb": hwm[0] or usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def _watch_hwm(pid: int, hwm: list[float]) -> None:
    """Keep ``hwm[0]`` at the process's VmHWM (MB) until it exits (it only grows)."""
    path = f"/proc/{pid}/status"
    while True:
        try:
            with open(path, encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        hwm[0] = max(hwm[0], int(line.split()[1]) / 1024)
        except (OSError, ValueError):
            return
        time.sleep(0.02)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


CASES = {  # name → (our -p and extra options, the anchor's -p and extra options)
    "fp32": (["-p", "fp32"], ["-p", "fp32"]),
    "int4-rtn": (["-p", "int4", "--extra_options", "int4_algo_config=rtn"],
                 ["-p", "int4", "--extra_options", "algo_config=rtn"]),
    "int4-default": (["-p", "int4"], ["-p", "int4"]),
    "int4-k_quant": (["-p", "int4", "--extra_options", "int4_algo_config=k_quant"],
                     ["-p", "int4", "--extra_options", "algo_config=k_quant"]),
    # data-aware rounding (the anchor has none: ours only)
    "int4-gptq": (["-p", "int4", "--extra_options", "int4_algo_config=gptq"], None),
    "int4-awq_last": (["-p", "int4", "--extra_options", "int4_algo_config=awq_last"], None),
    "int4-rtn_last": (["-p", "int4", "--extra_options", "int4_algo_config=rtn_last"],
                      ["-p", "int4", "--extra_options", "algo_config=rtn_last"]),
    "int4-k_quant_last": (["-p", "int4", "--extra_options", "int4_algo_config=k_quant_last"],
                          ["-p", "int4", "--extra_options", "algo_config=k_quant_last"]),
    "int4-rtn_mixed": (["-p", "int4", "--extra_options", "int4_algo_config=rtn_mixed"], None),
    # onnxruntime-genai's builder has no QNN path: ours only
    "qnn-fp16": (["-p", "fp16", "-e", "qnn"], None),
    "qnn-fp16-epcontext": (["-p", "fp16", "-e", "qnn", "--extra_options", "qnn_epcontext=true"],
                           None),
    "qnn-w8a16": (["-p", "w8a16", "-e", "qnn"], None),
    "qnn-w8a16-text": (["-p", "w8a16", "-e", "qnn", "--extra_options",
                        "qnn_calibration_coverage=0"], None),  # (the calibration text alone)
    "qnn-int4-shared": (["-p", "int4", "-e", "qnn", "--extra_options", "shared_embeddings=true"],
                        None),
    "qnn-int4-shared-c512": (["-p", "int4", "-e", "qnn", "--extra_options",
                             "shared_embeddings=true", "qnn_context_length=512"], None),
    "qnn-int4-shared-c4096": (["-p", "int4", "-e", "qnn", "--extra_options",
                              "shared_embeddings=true", "qnn_context_length=4096"], None),
    # the folder's form on the device: a context binary per graph, or one per part (shared)
    "qnn-int4-shared-ctx": (["-p", "int4", "-e", "qnn", "--extra_options",
                             "shared_embeddings=true", "qnn_epcontext=true"], None),
    "qnn-int4-shared-ctx-ws": (["-p", "int4", "-e", "qnn", "--extra_options",
                                "shared_embeddings=true", "qnn_epcontext=true",
                                "qnn_weight_sharing=true"], None),
    "qnn-int4-shared-gptq": (["-p", "int4", "-e", "qnn", "--extra_options",
                              "shared_embeddings=true", "int4_algo_config=gptq"], None),
    "qnn-int4-shared-awq": (["-p", "int4", "-e", "qnn", "--extra_options",
                             "shared_embeddings=true", "int4_algo_config=awq"], None),
    "qnn-int4-shared-gptq_mixed": (["-p", "int4", "-e", "qnn", "--extra_options",
                                    "shared_embeddings=true", "int4_algo_config=gptq_mixed"],
                                   None),
    "qnn-int4-shared-rtn_mixed": (["-p", "int4", "-e", "qnn", "--extra_options",
                                   "shared_embeddings=true", "int4_algo_config=rtn_mixed"],
                                  None),  # (the default before gptq_mixed)
    # gptq_sequential on and off, whatever the default (the mission command's GPTQ)
    "qnn-int4-shared-seq": (["-p", "int4", "-e", "qnn", "--extra_options",
                             "shared_embeddings=true", "gptq_sequential=true"], None),
    "qnn-int4-shared-once": (["-p", "int4", "-e", "qnn", "--extra_options",
                              "shared_embeddings=true", "gptq_sequential=false"], None),
    "qnn-int4-shared-awq_gptq": (["-p", "int4", "-e", "qnn", "--extra_options",
                                  "shared_embeddings=true", "int4_algo_config=awq_gptq"], None),
    # the first 2 or 4 layers only (per-layer figures of a cut checkpoint)
    "int4-rtn-2l": (["-p", "int4", "--extra_options", "int4_algo_config=rtn",
                     "num_hidden_layers=2"], None),
    "int4-rtn-4l": (["-p", "int4", "--extra_options", "int4_algo_config=rtn",
                     "num_hidden_layers=4"], None),
}


def qnn_form(out: Path) -> str:
    """A -e qnn folder's form from its manifest: C, parts, context binaries, KV bytes at C,
    and the device memory of its largest part."""
    m = json.loads((out / "build_manifest.json").read_text())
    kv, dev = m["kv_cache"], m["device_memory"]
    bins = sorted(out.glob("*.bin"))
    parts = [p for p in dev["parts"] if p["kv_bytes"]]
    big = max(parts, key=lambda p: p["weight_bytes_shared"])
    return (f"C {kv['context_length']}, {len(parts)} part(s), KV {kv['dtype']} "
            f"{kv['bytes_per_token'] / 1024:.0f} KiB/token, {kv['bytes'] / 2**20:.0f} MiB at C; "
            f"largest part weights {big['weight_bytes_shared'] / 2**20:.0f} MiB once / "
            f"{big['weight_bytes_per_graph'] / 2**20:.0f} MiB a context per graph, its KV "
            f"{big['kv_bytes'] / 2**20:.0f} MiB, largest activation "
            f"{big['largest_activation']['bytes'] / 2**20:.1f} MiB; "
            + (f"{len(bins)} context binaries, {sum(b.stat().st_size for b in bins) / 2**20:.0f} "
               "MiB" if bins else "no context binaries"))


def inference_speed(folder: Path, prompt_len: int = 128, new_tokens: int = 64,
                    runs: int = 3) -> dict:
    """onnxruntime-genai on CPU: prefill tokens/s and decode tokens/s (median of runs after a
    warm-up)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    prompt = np.random.default_rng(0).integers(100, 1000, prompt_len).astype(np.int32)
    prefill, decode = [], []
    for _ in range(runs + 1):
        params = og.GeneratorParams(model)
        total = prompt_len + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt[None])
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            gen.generate_next_token()
        t2 = time.perf_counter()
        prefill.append(prompt_len / (t1 - t0))
        decode.append(new_tokens / (t2 - t1))
        del gen
    return {"prefill_tok_s": float(np.median(prefill[1:])),
            "decode_tok_s": float(np.median(decode[1:]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(CONFIGS), default="qwen3-0.6b")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/builder-bench"))
    ap.add_argument("--cases", default="fp32,int4-rtn,int4-k_quant",
                    help=f"comma-separated, from {', '.join(CASES)}")
    ap.add_argument("--no-anchor", action="store_true", help="build with ours only")
    ap.add_argument("--speed", action="store_true", help="also measure inference speed")
    args = ap.parse_args()

    ck = args.work / args.model
    t0 = time.perf_counter()
    make_checkpoint(ck, CONFIGS[args.model])
    print(f"checkpoint {ck}: {folder_bytes(ck) / 1e9:.3f} GB "
          f"(ready in {time.perf_counter() - t0:.1f} s)")
    anchor = importlib.util.find_spec("onnxruntime_genai") is not None and not args.no_anchor
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; anchor builder {'used' if anchor else 'not used'}")

    rows = []
    for case in args.cases.split(","):
        ours_args, anchor_args = CASES[case]
        for run in range(args.runs):
            out = args.work / f"ours-{case}"
            shutil.rmtree(out, ignore_errors=True)
            target = [] if "-e" in ours_args else ["-e", "cpu"]
            ours = measure([sys.executable, "-m", "builder", "-m", str(ck), "-o", str(out),
                            *target, *ours_args])
            ours["bytes"] = folder_bytes(out)
            if "qnn" in ours_args:
                print(f"{case}: {qnn_form(out)}", flush=True)
            theirs = None
            if anchor and anchor_args is not None:
                out_a = args.work / f"anchor-{case}"
                shutil.rmtree(out_a, ignore_errors=True)
                theirs = measure([sys.executable, "-m", "onnxruntime_genai.models.builder",
                                  "-m", args.model, "-i", str(ck), "-o", str(out_a), "-e", "cpu",
                                  "-c", str(args.work / "cache"), *anchor_args])
                theirs["bytes"] = folder_bytes(out_a)
            if args.speed and run == 0 and "-e" not in ours_args:
                ours.update(inference_speed(out))
                if theirs:
                    theirs.update(inference_speed(out_a))
            rows.append((case, run, ours, theirs))
            print(case, run, ours, theirs, flush=True)

    print("\n| case | run | ours s | anchor s | speed-up | ours peak MB | anchor peak MB | "
          "memory ratio | ours MB | anchor MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case, run, o, a in rows:
        a = a or {}
        ratio = (lambda k: f"{a[k] / o[k]:.2f}x" if k in a else "-")
        print(f"| {case} | {run} | {o['wall_s']:.1f} | {a.get('wall_s', float('nan')):.1f} | "
              f"{ratio('wall_s')} | {o['peak_rss_mb']:.0f} | {a.get('peak_rss_mb', 0):.0f} | "
              f"{o['peak_rss_mb'] / a['peak_rss_mb'] if a else float('nan'):.2f} | "
              f"{o['bytes'] / 1e6:.1f} | {a.get('bytes', 0) / 1e6:.1f} |")
    by_case = {case: o for case, run, o, _ in rows if run == 0}
    if "int4-rtn" in by_case:
        base = by_case["int4-rtn"]["wall_s"]
        print("\nbuild time against -p int4 (rtn) on cpu: " + ", ".join(
            f"{case} {o['wall_s'] / base:.1f}x" for case, o in by_case.items()))
    for name, what in (("qnn-int4-shared", "the mission command at its defaults"),
                       ("qnn-int4-shared-rtn_mixed", "the mission command with rtn_mixed")):
        if name in by_case:
            base = by_case[name]["wall_s"]
            print(f"build time against {what}: " + ", ".join(
                f"{case} {o['wall_s'] / base:.2f}x" for case, o in by_case.items()
                if case.startswith("qnn-int4-shared")))
    if "int4-rtn-2l" in by_case and "int4-rtn-4l" in by_case:
        two, four = by_case["int4-rtn-2l"], by_case["int4-rtn-4l"]
        per_s = (four["wall_s"] - two["wall_s"]) / 2
        per_mb = (four["peak_rss_mb"] - two["peak_rss_mb"]) / 2
        per_bytes = (four["bytes"] - two["bytes"]) / 2
        full = FULL_LAYERS.get(args.model, CONFIGS[args.model]["num_hidden_layers"])
        print(f"\nper layer: {per_s:.1f} s, peak RSS {per_mb:+.0f} MB, {per_bytes / 1e6:.0f} MB "
              f"written; {full} layers projected: {two['wall_s'] + (full - 2) * per_s:.0f} s, "
              f"{(two['bytes'] + (full - 2) * per_bytes) / 1e9:.1f} GB, peak RSS "
              f"{two['peak_rss_mb'] + (full - 2) * max(per_mb, 0):.0f} MB if it grew by that "
              "much per layer")
    if args.speed:
        print("\n| case | ours prefill tok/s | anchor prefill tok/s | ours decode tok/s | "
              "anchor decode tok/s |")
        print("|---|---|---|---|---|")
        for case, run, o, a in rows:
            if "prefill_tok_s" in o:
                a = a or {}
                print(f"| {case} | {o['prefill_tok_s']:.1f} | {a.get('prefill_tok_s', 0):.1f} | "
                      f"{o['decode_tok_s']:.1f} | {a.get('decode_tok_s', 0):.1f} |")


if __name__ == "__main__":
    main()
