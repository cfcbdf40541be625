"""Where the checkpoint comes from: a local folder, or a hub repository fetched with
huggingface_hub (config, generation config, tokenizer files and safetensors only).

Pickled weights (``*.bin``, ``*.pt``, ``*.pth``) are never downloaded or loaded, and no code from a
model repository is ever run.
"""

from __future__ import annotations

import json
import logging
import stat
from dataclasses import dataclass
from pathlib import Path

from builder.errors import OptionError, SourceError

logger = logging.getLogger(__name__)

META_PATTERNS = [
    "config.json", "generation_config.json", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "quantize_config.json",  # (an older GPTQ checkpoint's format, where config.json lacks it)
]
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Source:
    path: Path                  # local folder holding config.json and the weights
    repo_id: str | None = None  # set when downloaded from the hub
    revision: str | None = None


def resolve(model_name: str | None, input_dir: Path | None, cache_dir: Path | None,
            token: str | None, weights: bool = True) -> Source:
    """A local folder (``-i``, or ``-m`` naming an existing folder), else a hub download.
    ``weights=False`` (config_only): config and tokenizer files only."""
    local = Path(input_dir) if input_dir is not None else \
        Path(model_name).expanduser() if model_name and Path(model_name).expanduser().exists() \
        else None
    if local is not None:
        if token:
            raise OptionError(f"extra option hf_token applies to hub downloads only; {local} "
                              "is a local folder")
        return _local(local, weights)
    assert model_name
    if model_name.count("/") > 1 or model_name.startswith((".", "/", "~")):
        raise SourceError(f"{model_name}: no such folder")
    return _hub(model_name, cache_dir, token, weights)


ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def adapter_folder(name: str, cache_dir: Path | None, token: str | None) -> tuple[Path, str]:
    """A LoRA adapter (adapter_path): a local folder, else a hub repository (its
    adapter_config.json and adapter_model.safetensors only). Returns (folder, the adapter's
    name: the folder's, or the repository's without its owner)."""
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise SourceError(f"adapter_path {name}: not a folder")
        return local, local.name
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise SourceError(f"adapter_path {name}: no such folder")
    logger.info("fetching adapter %s from the Hugging Face hub", name)
    return _snapshot(name, cache_dir, token, allow=ADAPTER_FILES), name.split("/")[1]


def allowed_roots(folder: Path) -> tuple[Path, ...]:
    """Where a checkpoint's files may live: the folder itself and, for a Hugging Face cache
    snapshot (``models--org--name/snapshots/<revision>``), the repository's ``blobs`` that its
    symlinks point into."""
    real = folder.resolve()
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return real, (real.parent.parent / "blobs").resolve()
    return (real,)


def checkpoint_file(folder: Path, name: str) -> Path:
    """``folder / name``, refused when the name or a symlink leads out of the checkpoint (a
    shard index naming ``../x`` or ``/etc/passwd``, a tokenizer.json linked elsewhere)."""
    path = folder / name
    real = path.resolve()
    if not any(real == root or root in real.parents for root in allowed_roots(folder)):
        raise SourceError(f"{path}: resolves to {real}, outside the checkpoint folder "
                          f"{folder}; files are read from the checkpoint folder (or its hub "
                          "cache) only")
    if path.exists() and not path.is_file():
        raise SourceError(f"{path}: not a regular file (a {file_kind(path)}); the checkpoint's "
                          "files are read as plain files")
    return path


def file_kind(path: Path) -> str:
    mode = path.stat().st_mode
    return ("folder" if stat.S_ISDIR(mode) else "named pipe" if stat.S_ISFIFO(mode) else
            "socket" if stat.S_ISSOCK(mode) else "device" if stat.S_ISCHR(mode)
            or stat.S_ISBLK(mode) else "special file")


def _local(folder: Path, weights: bool) -> Source:
    if not folder.is_dir():
        raise SourceError(f"{folder}: not a folder")
    _check_weights(folder, str(folder), require_weights=weights)
    return Source(path=folder.resolve())


def _hub(repo_id: str, cache_dir: Path | None, token: str | None, weights: bool) -> Source:
    """Two passes: config, tokenizer and the shard index first; then only the shards the index
    lists (or the top-level safetensors files when there is no index), so sub-folders and
    other-format copies such as consolidated.safetensors are never fetched."""
    logger.info("fetching %s from the Hugging Face hub (config, tokenizer%s)", repo_id,
                ", safetensors" if weights else "")
    path = _snapshot(repo_id, cache_dir, token, allow=META_PATTERNS)
    if not weights:
        _check_weights(path, repo_id, require_weights=False)
        return Source(path=path, repo_id=repo_id, revision=path.name)
    if (path / INDEX).is_file():
        try:
            shards = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SourceError(f"{repo_id}: malformed {INDEX} ({e})") from None
        path = _snapshot(repo_id, cache_dir, token, allow=[*META_PATTERNS, *shards])
    else:
        path = _snapshot(repo_id, cache_dir, token, allow=[*META_PATTERNS, "*.safetensors"],
                         ignore=["*/*", "consolidated*"])
    remote: list[str] = []
    if not any(path.glob("*.safetensors")):
        remote = _remote_files(repo_id, token)
    _check_weights(path, repo_id, remote)
    return Source(path=path, repo_id=repo_id, revision=path.name)


def _snapshot(repo_id: str, cache_dir: Path | None, token: str | None, allow: list[str],
              ignore: list[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, token=token,
                                      allow_patterns=allow, ignore_patterns=ignore))
    except HFValidationError as e:
        raise SourceError(f"{repo_id}: not a folder nor a valid hub repository id ({e})") from None
    except LocalEntryNotFoundError:
        raise SourceError(f"{repo_id}: no such local folder, and as a hub repository id it is "
                          f"not in the Hugging Face cache {cache_dir or '(default)'} and the "
                          "hub cannot be reached (offline mode or no network)") from None
    except Exception as e:  # network, authentication, missing repository
        raise SourceError(f"{repo_id}: no such local folder, and as a hub repository id its "
                          f"download failed: {type(e).__name__}: {e}") from None


def _remote_files(repo_id: str, token: str | None) -> list[str]:
    """The repository's file list, to explain a missing safetensors file; [] when offline."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return []
    try:
        return list(HfApi().list_repo_files(repo_id, token=token))
    except Exception:
        return []


def _check_weights(folder: Path, label: str, remote: list[str] = (),
                   require_weights: bool = True) -> None:
    if not (folder / "config.json").is_file():
        raise SourceError(f"{label}: no config.json in {folder}")
    if not require_weights or any(folder.glob("*.safetensors")):
        return
    names = [p.name for p in folder.iterdir()] + list(remote)
    pickles = sorted({n for n in names if n.endswith(PICKLE_SUFFIXES)})
    if pickles:
        raise SourceError(f"{label}: only pickled weights ({', '.join(pickles)}); they are never "
                          "loaded because unpickling runs code. Convert them to safetensors "
                          "first (e.g. save_pretrained(..., safe_serialization=True))")
    raise SourceError(f"{label}: no *.safetensors weights found")
