"""Precompile QNN graphs into EPContext models (context binaries) with onnxruntime-qnn.

Each graph gets its own context (the binary embedded in its EPContext node), or with weight
sharing the graphs of a group (a part's prefill and decode graphs) are compiled one after the
other in one process into one binary beside them, which holds their weights once
(``ep.share_ep_contexts``; the last with ``ep.stop_share_ep_contexts``). Such a binary loads on
HTP v73+ devices; the x86 simulator crashes loading any context of two graphs (README).
Compilation runs in a subprocess, since a failure inside the QNN backend can take its process
down.
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
models, targets, options = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
shared = len(models) > 1
ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
for i, (model, target) in enumerate(zip(models, targets)):
    so = ort.SessionOptions()
    so.add_provider_for_devices(devices, options)
    so.add_session_config_entry("ep.context_enable", "1")
    so.add_session_config_entry("ep.context_embed_mode", "0" if shared else "1")
    so.add_session_config_entry("ep.context_file_path", target)
    if shared:
        so.add_session_config_entry("ep.share_ep_contexts", "1")
        if i == len(models) - 1:
            so.add_session_config_entry("ep.stop_share_ep_contexts", "1")
    so.log_severity_level = 3
    ort.InferenceSession(model, so)
"""


def compiled_name(filename: str) -> str:
    return filename.removesuffix(".onnx") + "_ctx.onnx"


def compile_contexts(folder: Path, groups: list[list[str]], options: dict[str, str],
                     shared: bool = False) -> None:
    """Write ``<name>_ctx.onnx`` beside each graph: the binary embedded in its EPContext node,
    or (``shared``) one ``<first>_ctx_qnn.bin`` per group of graphs, which every graph of the
    group references."""
    for group in groups:
        start = time.perf_counter()
        targets = [folder / compiled_name(filename) for filename in group]
        r = subprocess.run([sys.executable, "-c", _COMPILE,
                            json.dumps([str(folder / f) for f in group]),
                            json.dumps([str(t) for t in targets]), json.dumps(options)],
                           capture_output=True, text=True)
        if r.returncode != 0 or not all(t.is_file() for t in targets):
            raise BuilderError(f"QNN could not compile {', '.join(group)} into a context binary "
                               f"(exit {r.returncode}): "
                               f"{(r.stderr.strip().splitlines() or [''])[-1]}")
        binary = folder / shared_binary(group[0]) if shared else targets[0]
        logger.info("compiled %s → %s (%.1f MB%s) in %.1f s", ", ".join(group),
                    ", ".join(t.name for t in targets), binary.stat().st_size / 1e6,
                    f" in {binary.name}, shared" if shared else "",
                    time.perf_counter() - start)


def shared_binary(first: str) -> str:
    """The context binary onnxruntime-qnn writes for a group compiled with weight sharing."""
    return compiled_name(first).removesuffix(".onnx") + "_qnn.bin"
