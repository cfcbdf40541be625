"""The -e qnn folder's form per Qwen3 shape: parts, context binaries a context per graph against
weight-shared, KV bytes at C, device memory (the manifest's), build and compile time.

    python benchmarks/qnn_shapes.py [--models qwen3-0.6b,qwen3-1.7b,qwen3-4b,qwen3-8b]
                                    [--no-compile] [--work DIR] [extra_option=value ...]

Each shape: a random checkpoint of its exact config (build_benchmark's), the mission command
(``-p int4 -e qnn --extra_options shared_embeddings=true``, plus the extra options given) timed
in its own process, then the folder's QNN graphs compiled into context binaries on the HTP
simulator twice (builder.epcontext, as ``qnn_epcontext=true`` does): a context per graph, then
a part's prefill and decode graphs into one shared binary. Not a test: figures depend on the
machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from build_benchmark import CONFIGS, make_checkpoint, measure  # noqa: E402

from builder.epcontext import compile_contexts, shared_binary  # noqa: E402
from builder.package import read_genai_config  # noqa: E402

MIB = 2 ** 20


def compiled_bytes(folder: Path, shared: bool) -> tuple[int, int, float]:
    """(files, bytes, seconds) of the folder's QNN graphs compiled into context binaries."""
    graphs = [spec["filename"] for stage in read_genai_config(folder)["model"]["decoder"][
        "pipeline"] for spec in stage.values() if spec["filename"] != "embeddings.onnx"]
    groups = [[g, g.replace("context", "iterator")] for g in graphs if "context" in g] \
        if shared else [[g] for g in graphs]
    for f in [*folder.glob("*_ctx.onnx"), *folder.glob("*_ctx_qnn.bin")]:
        f.unlink()
    start = time.perf_counter()
    compile_contexts(folder, groups, {"backend_type": "htp", "soc_model": "60",
                                      "htp_arch": "73"}, shared=shared)
    seconds = time.perf_counter() - start
    files = [folder / shared_binary(g[0]) for g in groups] if shared else \
        [folder / g[0].replace(".onnx", "_ctx.onnx") for g in groups]
    return len(files), sum(f.stat().st_size for f in files), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3-0.6b,qwen3-1.7b,qwen3-4b,qwen3-8b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/builder-bench"))
    ap.add_argument("--no-compile", action="store_true", help="skip the context binaries")
    ap.add_argument("extra", nargs="*", help="more extra options for the build")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        ck = args.work / name
        make_checkpoint(ck, CONFIGS[name])
        out = args.work / f"qnn-shape-{name}"
        shutil.rmtree(out, ignore_errors=True)
        run = measure([sys.executable, "-m", "builder", "-m", str(ck), "-o", str(out), "-p",
                       "int4", "-e", "qnn", "--extra_options", "shared_embeddings=true",
                       *args.extra])
        m = json.loads((out / "build_manifest.json").read_text())
        dev, kv = m["device_memory"], m["kv_cache"]
        parts = [p for p in dev["parts"] if p["kv_bytes"]]
        row = {"model": name, "build_s": run["wall_s"], "peak_mb": run["peak_rss_mb"],
               "estimate_mb": m["memory_estimate"]["total"] / 1e6,
               "C": kv["context_length"], "parts": len(parts), "kv_mib": kv["bytes"] / MIB,
               "part_weights_mib": max(p["weight_bytes_shared"] for p in parts) / MIB,
               "part_per_graph_mib": max(p["weight_bytes_per_graph"] for p in parts) / MIB,
               "all_shared_mib": sum(p["weight_bytes_shared"] for p in dev["parts"]) / MIB,
               "all_per_graph_mib": sum(p["weight_bytes_per_graph"] for p in dev["parts"]) / MIB,
               "activation_mib": max(p.get("largest_activation", {}).get("bytes", 0)
                                     for p in dev["parts"]) / MIB}
        print(name, row, flush=True)
        if not args.no_compile:
            for shared in (False, True):
                files, size, seconds = compiled_bytes(out, shared)
                key = "shared" if shared else "per_graph"
                row.update({f"bins_{key}": files, f"bins_{key}_mib": size / MIB,
                            f"compile_{key}_s": seconds})
                print(name, key, files, f"{size / MIB:.0f} MiB", f"{seconds:.0f} s", flush=True)
        rows.append(row)
        shutil.rmtree(out, ignore_errors=True)

    print("\n| shape | C | parts | largest part's weights: once / a context per graph (MiB) | "
          "KV at C (MiB) | device memory, all parts: shared / per graph (MiB) | largest "
          "activation (MiB) | context binaries: per graph / shared | build s | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bins = (f"{r['bins_per_graph']} files, {r['bins_per_graph_mib']:.0f} MiB "
                f"({r['compile_per_graph_s']:.0f} s) / {r['bins_shared']} files, "
                f"{r['bins_shared_mib']:.0f} MiB ({r['compile_shared_s']:.0f} s)"
                if "bins_shared" in r else "not compiled")
        print(f"| {r['model']} | {r['C']} | {r['parts']} | {r['part_weights_mib']:.0f} / "
              f"{r['part_per_graph_mib']:.0f} | {r['kv_mib']:.0f} | "
              f"{r['all_shared_mib'] + r['kv_mib']:.0f} / "
              f"{r['all_per_graph_mib'] + r['kv_mib']:.0f} | {r['activation_mib']:.1f} | {bins} | "
              f"{r['build_s']:.0f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
