"""Quantized accuracy of the -e qnn folder (or of -p int4 on cpu) over many prompts, per
architecture and method.

    python benchmarks/qnn_accuracy.py [--work DIR] [--archs qwen3,llama,phi3,lfm2,qwen3_5,
        granitemoehybrid_dense] [--precisions w8a16,w4a16] [--algos default,rtn,...]
        [--prompts 8] [--cpu-ep] [--target qnn|cpu] [--calibration text|random]
        [extra_option=value ...]

Trains the tests' tiny clear-winner checkpoints (tests/checkpoints.py) once into --work (the
tiny Granite 4.0-H takes minutes: its torch Mamba2 is slow), builds each at each precision at
the default lengths (plus the extra options given), and feeds the folder the fp32 CPU build's
greedy path from each of N prompts of 70 random tokens (17 steps: the prefill's last position
and 16 decode calls), on the HTP simulator (or the CPU EP with --cpu-ep, about 10x faster and
within 1e-4 of it on these checkpoints). Prints per build: the mean logit cosine over every
step, the worst step's, the worst prompt's mean, top-1 agreement with the fp32 greedy token,
and the build's own accuracy report (KL and perplexity change on the held-out English prompts,
prefill / decode: these checkpoints are not language models, their perplexity of English is
in the 1e5s, so only its change says anything). Along the greedy paths it also gives the
mean KL(fp32 || quantized) over the steps and the change of the paths' perplexity (of the
fp32 greedy tokens, the ones these checkpoints were trained to predict). ``--algos`` builds
each precision once per int4_algo_config (``default``: the precision's own). ``--target cpu``
builds ``-p int4`` on cpu instead (``--precisions`` ignored), run by onnxruntime on the CPU;
its accuracy report is there only for the data-aware methods, so every cpu build also gives
the mean KL over 16 held-out English prompts' every position (``testing.held_out_kl``, as the
README's tables of the defaults). The checkpoints are
trained on random tokens and the calibration text is English: many of a random prompt's tokens
are ones calibration never saw, which is what the worst step measures; ``--calibration random``
calibrates each on its own data instead (README, "Calibration data"). The targets (issue 24):
w8a16 mean >= 0.9999 and worst >= 0.999; w4a16 mean >= 0.998 and worst >= 0.99. Not a test:
the figures are for choosing defaults.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from checkpoints import make_checkpoint  # noqa: E402
from qnn_helpers import own_data, qnn_build  # noqa: E402

from builder import BuildOptions, build  # noqa: E402
from builder.errors import BuilderError  # noqa: E402
from builder.options import ExtraOptions, Precision  # noqa: E402
from builder.quant.report import compare  # noqa: E402
from builder.testing import (  # noqa: E402
    held_out_kl, run_decoder, run_pipeline, run_pipeline_on_qnn)

ARCHS = "qwen3,llama,phi3,lfm2,qwen3_5,granitemoehybrid_dense"


def prompts(count: int) -> list[list[int]]:
    """``count`` prompts of 70 random tokens (ids 3..255 of the tests' byte-level tokenizer)."""
    return [[int(t) for t in np.random.default_rng(100 + k).integers(3, 256, 70)]
            for k in range(count)]


def random_prompts(work: Path, arch: str, fp32: Path) -> Path:
    """A calibration file of ``arch``'s own data, as token ids (``qnn_helpers.own_data``: 24
    prompts of 84 random tokens, each followed by the 16 tokens the fp32 build generates from
    it)."""
    path = work / f"random_prompts-{arch}.json"
    path.write_text(json.dumps(own_data(fp32)))
    return path


def trained(work: Path, arch: str) -> tuple[Path, Path]:
    """The tests' tiny clear-winner checkpoint of ``arch`` and its fp32 CPU build, made once
    into ``work``."""
    ck, fp32 = work / f"ck-{arch}", work / f"fp32-{arch}"
    if not (ck / "config.json").exists():
        make_checkpoint(ck, arch, trained=True)
    if not (fp32 / "genai_config.json").exists():
        build(BuildOptions(model_name=str(ck), output=fp32))
    return ck, fp32


def build_one(target: str, ck: Path, out: Path, precision: str, extra: list[str]) -> Path:
    if target == "qnn":
        return qnn_build(ck, out, precision, *extra, lengths="default")
    return build(BuildOptions(model_name=str(ck), output=out, precision=Precision.INT4,
                              extra=ExtraOptions.parse(extra)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("qnn_accuracy_work"))
    ap.add_argument("--archs", default=ARCHS)
    ap.add_argument("--precisions", default="w8a16,w4a16")
    ap.add_argument("--algos", default="default",
                    help="int4_algo_config values, one build each (default: the precision's)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--cpu-ep", action="store_true", help="run the folders on the CPU EP")
    ap.add_argument("--target", choices=("qnn", "cpu"), default="qnn",
                    help="cpu: -p int4 builds on cpu, run by onnxruntime")
    ap.add_argument("--calibration", choices=("text", "random"), default="text",
                    help="text: the shipped English prompts (the default); random: the "
                         "checkpoint's own data, 24 prompts of 84 random tokens (what it was "
                         "trained on) and the 16 tokens it generates from each (a .json file "
                         "of token ids, qnn_calibration=)")
    ap.add_argument("extra", nargs="*", help="extra options for every build")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.target == "cpu":
        where, precisions = "cpu", ["int4"]
    else:
        where = "CPU EP" if args.cpu_ep else "HTP"
        precisions = args.precisions.split(",")
    for arch in args.archs.split(","):
        ck, fp32 = trained(args.work, arch)
        extra, label = list(args.extra), []
        if args.calibration == "random":
            label = ["(calibration: its own data)"]
            extra.append(f"qnn_calibration={random_prompts(args.work, arch, fp32)}")
        paths = []
        for prompt in prompts(args.prompts):
            cpu = run_decoder(fp32, np.array([prompt]), steps=16)
            ref = [cpu.prefill_logits[0, -1]] + [s[0] for s in cpu.step_logits]
            paths.append((prompt, ref, [int(r.argmax()) for r in ref]))
        for precision in precisions:
            for algo in args.algos.split(","):
                algo_extra = [] if algo == "default" else [f"int4_algo_config={algo}"]
                out = args.work / f"{arch}-{precision}"
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                try:
                    folder = build_one(args.target, ck, out, precision, [*extra, *algo_extra])
                except BuilderError as e:  # (awq on a hybrid, say: refused, named)
                    print(f"{arch} {precision} {algo}: refused: {e}", flush=True)
                    continue
                built = time.perf_counter() - start
                manifest = json.loads((folder / "build_manifest.json").read_text())
                runs = []  # per prompt: report.compare's figures of its 17 steps
                for prompt, ref, greedy in paths:
                    if args.target == "cpu":
                        r = run_decoder(folder, np.array([prompt]), steps=16,
                                        forced=np.array([greedy[:16]]))
                        logits = [r.prefill_logits[0, -1]] + [x[0] for x in r.step_logits]
                    else:
                        run = run_pipeline if args.cpu_ep else run_pipeline_on_qnn
                        logits = run(folder, prompt, 17, forced=greedy).step_logits
                    runs.append((np.stack(ref), np.stack(logits), np.array(greedy)))
                means = [compare(*r)["mean_cosine"] for r in runs]
                every = compare(*(np.concatenate(x) for x in zip(*runs)))
                report = manifest.get("accuracy")
                said = (f"; report KL prefill {report['prefill']['mean_kl']:.2e}, decode "
                        f"{report['decode']['mean_kl']:.2e}, perplexity change "
                        f"{report['prefill']['perplexity_change']:+.2%} / "
                        f"{report['decode']['perplexity_change']:+.2%}") if report else ""
                if args.target == "cpu":  # (every build the same English held-out KL)
                    said += f"; held-out KL {held_out_kl(ck, fp32, folder):.2e}"
                size = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (
                    ".data", ".onnx", ".bin"))
                print(f"{' '.join([arch, precision, algo, *args.extra, *label])}: {where}, "
                      f"{len(paths)} prompts: mean cosine {every['mean_cosine']:.5f}, worst "
                      f"step {every['min_cosine']:.5f}, worst prompt {min(means):.5f}, top-1 "
                      f"{every['top1_agreement']:.1%}, path KL {every['mean_kl']:.2e}, path "
                      f"perplexity {every['perplexity_change']:+.3%}{said}; "
                      f"{size / 1e3:.0f} kB; built in {built:.0f} s", flush=True)


if __name__ == "__main__":
    main()
