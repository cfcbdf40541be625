"""Precompile QNN graphs into EPContext models (context binaries) with onnxruntime-qnn.

Each graph gets its own context: contexts that share weights across graphs can be produced but
crash on load in the x86 simulator (QNN_FACTS.md, section 3). Compilation runs in a
subprocess, since a failure inside the QNN backend can take its process down.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from builder.errors import BuilderError

logger = logging.getLogger(__name__)

_COMPILE = r"""
import json, sys
import onnxruntime as ort, onnxruntime_qnn
model, target, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
so = ort.SessionOptions()
so.add_provider_for_devices(devices, options)
so.add_session_config_entry("ep.context_enable", "1")
so.add_session_config_entry("ep.context_embed_mode", "1")
so.add_session_config_entry("ep.context_file_path", target)
so.log_severity_level = 3
ort.InferenceSession(model, so)
"""


def compiled_name(filename: str) -> str:
    return filename.removesuffix(".onnx") + "_ctx.onnx"


def compile_contexts(folder: Path, filenames: list[str], options: dict[str, str]) -> None:
    """Write ``<name>_ctx.onnx`` beside each graph (binary embedded in the EPContext node)."""
    for filename in filenames:
        start = time.perf_counter()
        target = folder / compiled_name(filename)
        r = subprocess.run([sys.executable, "-c", _COMPILE, str(folder / filename), str(target),
                            json.dumps(options)], capture_output=True, text=True)
        if r.returncode != 0 or not target.is_file():
            raise BuilderError(f"QNN could not compile {filename} into a context binary "
                               f"(exit {r.returncode}): "
                               f"{(r.stderr.strip().splitlines() or [''])[-1]}")
        logger.info("compiled %s → %s (%.1f MB) in %.1f s", filename, target.name,
                    target.stat().st_size / 1e6, time.perf_counter() - start)
