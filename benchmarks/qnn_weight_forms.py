"""w4a16 weight forms on the HTP simulator: LPBQ against float blocks, block sizes.

    python benchmarks/qnn_weight_forms.py [--work DIR] [--archs qwen3,llama,phi3]
                                          [--forms lpbq,float_block] [extra options ...]

Trains the tests' tiny clear-winner checkpoints (tests/checkpoints.py) once into --work, builds
each with ``-e qnn -p w4a16 qnn_int4_format=<form>`` at the default lengths (plus the extra
options given, e.g. int4_block_size=64), and prints the HTP's logit cosine along the fp32
build's greedy path (17 steps, as tests/test_qnn.py::test_w4a16_placement_and_accuracy) and the
build's own accuracy report. Not a test: the figures are for choosing defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from qnn_accuracy import trained  # noqa: E402
from qnn_helpers import PROMPTS, cosines, qnn_build  # noqa: E402

from builder.testing import run_decoder, run_pipeline_on_qnn  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/builder-forms"))
    ap.add_argument("--archs", default="qwen3,llama,phi3")
    ap.add_argument("--forms", default="lpbq,float_block")
    ap.add_argument("extra", nargs="*", help="extra options for every build")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    prompt = PROMPTS["default"]
    for arch in args.archs.split(","):
        ck, fp32 = trained(args.work, arch)
        cpu = run_decoder(fp32, np.array([prompt]), steps=16)
        ref = [cpu.prefill_logits[0, -1]] + [s[0] for s in cpu.step_logits]
        greedy = [int(r.argmax()) for r in ref]
        for form in args.forms.split(","):
            out = qnn_build(ck, args.work / f"{arch}-{form}-{'-'.join(args.extra)}", "w4a16",
                            f"qnn_int4_format={form}", *args.extra, lengths="default")
            report = json.loads((out / "build_manifest.json").read_text())["accuracy"]
            c = cosines(run_pipeline_on_qnn(out, prompt, 17, forced=greedy).step_logits, ref)
            print(f"{arch} {form} {' '.join(args.extra)}: HTP mean cosine {np.mean(c):.5f} "
                  f"(min {min(c):.5f}); report KL prefill {report['prefill']['mean_kl']:.2e}, "
                  f"decode {report['decode']['mean_kl']:.2e}", flush=True)


if __name__ == "__main__":
    main()
