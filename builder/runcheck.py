"""The build's last stage: open the folder as its user will and generate one token.

A folder the build calls ready must load and run. Before it is put in place, the staged folder is
opened in a child process (onnxruntime-genai can abort the process that loads a bad folder, and
the child's memory is given back when it ends) with onnxruntime-genai when it is installed: its
genai_config.json, its tokenizer (the word "Hello" encoded), the model on the CPU (the folder's
providers cleared: a cuda or qnn folder's graphs run on onnxruntime's CPU EP too), one token
generated, the logits finite and the token inside the vocabulary (and again with each LoRA
adapter file of the folder active, as onnxruntime-genai's Adapters API loads it). Without
onnxruntime-genai, onnxruntime runs the graphs the way onnxruntime-genai would
(``builder.runner``).

The child runs this file by its path (``runpy``), not as ``builder.runcheck``: importing the
builder package would cost it seconds; it prints one JSON line.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

AUTO_LIMIT = 2 << 30  # run_check=auto: folders whose files total at most this (2 GiB)
PROMPT = "Hello"
TIMEOUT_S = 3600


def skipped(options, weights_bytes: int) -> str | None:
    """Why the run check does not run for this build (logged and written to the manifest);
    None when it runs."""
    extra = options.extra
    if extra.run_check == "false":
        return "run_check=false"
    if extra.exclude_embeds or extra.exclude_lm_head:
        return ("the graph takes inputs_embeds or gives no logits (exclude_embeds, "
                "exclude_lm_head): onnxruntime-genai generates from neither")
    if str(options.precision) == "bf16":
        return "bf16 graphs run on the CUDA EP only (onnxruntime's CPU EP has no bf16 MatMul)"
    if extra.run_check == "auto" and weights_bytes > AUTO_LIMIT:
        return (f"the folder holds {weights_bytes / 2**30:.1f} GiB, more than run_check=auto "
                "opens (2 GiB: loading it would take that memory again); run_check=true runs it")
    return None


def run_check(out: Path, options) -> dict:
    """Open the staged folder ``out`` in a child process and generate one token; raise
    OutputError, naming what failed, when it cannot. Returns the manifest's ``run_check``."""
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    why = skipped(options, size)
    if why is not None:
        if options.extra.run_check == "auto":
            logger.warning("run check skipped: %s", why)
        else:
            logger.info("run check skipped: %s", why)
        return {"ran": False, "why": why}
    from builder.errors import OUT_OF_MEMORY, OutputError

    start = time.monotonic()
    r = subprocess.run([sys.executable, "-c", _CHILD, __file__, str(out)], cwd=out, check=False,
                       capture_output=True, text=True, timeout=TIMEOUT_S)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        if any(s in r.stderr for s in (*OUT_OF_MEMORY, "MemoryError")):
            raise MemoryError("the run check ran out of memory")
        said = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
        raise OutputError(
            f"the folder was built but does not run: {said[-1] if said else f'exit {r.returncode}'}"
            "; nothing was written (run_check=false writes such a folder anyway)")
    result = json.loads(lines[-1])
    if result.get("error"):
        raise OutputError(f"the folder was built but does not run: {result['error']}; nothing "
                          "was written (run_check=false writes such a folder anyway)")
    result.update(ran=True, seconds=round(time.monotonic() - start, 2))
    logger.info("run check: %s generated token %d after %s (%d ids) in %.1f s%s",
                result["runtime"], result["token"], json.dumps(PROMPT), len(result["prompt"]),
                result["seconds"], "; with each adapter active: " + ", ".join(
                    f"{name} {token}" for name, token in result["adapters"].items())
                if result.get("adapters") else "")
    return result


# -- the child ---------------------------------------------------------------------------------
_CHILD = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


def _window(cfg: dict) -> int | None:
    """A decoder-pipeline's prefill length P (the prompt goes in chunks of P); None otherwise."""
    if cfg["model"]["type"] != "decoder-pipeline":
        return None
    return cfg["model"]["decoder"]["sliding_window"]["window_size"]


def _judge(logits: np.ndarray, token: int, vocab: int) -> str | None:
    if not np.isfinite(logits).all():
        return f"the logits hold {int((~np.isfinite(logits)).sum())} NaN or infinite values"
    if not 0 <= token < vocab:
        return f"the generated token {token} is outside the vocabulary of {vocab}"
    return None


def with_genai(folder: Path, cfg: dict) -> dict:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    model = og.Model(config)
    tokenizer = og.Tokenizer(model) if _has_tokenizer(folder) else None  # (none: warned of)
    ids = [int(i) for i in tokenizer.encode(PROMPT)] if tokenizer else []
    ids = ids or [cfg["model"]["bos_token_id"]]
    window = _window(cfg)
    padded = -(-len(ids) // window) * window if window else len(ids)
    vocab = cfg["model"]["vocab_size"]
    adapters = og.Adapters(model) if _adapters(folder) else None

    def generate(adapter: str | None) -> tuple[int, str | None]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=padded + 1, min_length=padded + 1,
                                  do_sample=False)
        generator = og.Generator(model, params)
        if adapter is not None:
            generator.set_active_adapter(adapters, adapter)
        generator.append_tokens(np.asarray([ids], np.int32))
        logits = np.asarray(generator.get_output("logits"))
        generator.generate_next_token()
        token = int(generator.get_sequence(0)[-1])
        return token, _judge(logits, token, vocab)

    token, error = generate(None)
    tokens = {}
    for path in _adapters(folder):  # each LoRA adapter file, active in turn
        adapters.load(str(path), path.stem)
        tokens[path.stem], why = generate(path.stem)
        error = error or (why and f"with adapter {path.name}: {why}")
    text = tokenizer.decode([token]) if tokenizer else None
    return {"runtime": f"onnxruntime-genai {og.__version__}", "prompt": ids, "token": token,
            "text": text, "error": error, **({"adapters": tokens} if tokens else {})}


def _adapters(folder: Path) -> list[Path]:
    """The folder's LoRA adapter files (lora_merge=false)."""
    return sorted((folder / "adapters").glob("*.onnx_adapter"))


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()


def with_onnxruntime(folder: Path, cfg: dict) -> dict:
    import onnxruntime as ort

    from builder.runner import run_pipeline
    from builder.testing import run_decoder

    ids = None
    if importlib.util.find_spec("tokenizers") and (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(
            PROMPT, add_special_tokens=False).ids
    ids = list(ids or [cfg["model"]["bos_token_id"]])
    vocab = cfg["model"]["vocab_size"]
    if _window(cfg):
        logits = run_pipeline(folder, ids, 1).step_logits[0]
    else:
        logits = run_decoder(folder, np.array([ids]), steps=0).prefill_logits[0, -1]
    token = int(np.argmax(logits))
    error, tokens = _judge(logits, token, vocab), {}
    for path in _adapters(folder):
        logits = run_decoder(folder, np.array([ids]), steps=0, adapter=path).prefill_logits[0, -1]
        tokens[path.stem] = int(np.argmax(logits))
        why = _judge(logits, tokens[path.stem], vocab)
        error = error or (why and f"with adapter {path.name}: {why}")
    return {"runtime": f"onnxruntime {ort.__version__}", "prompt": ids, "token": token,
            "error": error, **({"adapters": tokens} if tokens else {})}


def main(argv: list[str]) -> int:
    folder = Path(argv[0])
    cfg = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
    try:
        import onnxruntime_genai  # noqa: F401
        run = with_genai
    except ImportError:  # (not installed, or not loadable here: the folder is not to blame)
        run = with_onnxruntime
    print(json.dumps(run(folder, cfg)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[2:]))
