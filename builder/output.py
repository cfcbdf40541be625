"""Safe output: build into a temporary folder beside the target, rename it into place at the end.

A failed or interrupted build leaves nothing behind, and a previous good build is replaced only
once the new one is complete. A non-empty folder that is not a previous build output (it has no
build manifest) is never touched.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from builder.errors import OutputError

logger = logging.getLogger(__name__)

MANIFEST = "build_manifest.json"


class StagedOutput:
    """``with StagedOutput(target) as tmp:`` write into ``tmp``; it becomes ``target`` on success."""

    def __init__(self, target: Path) -> None:
        self.target = Path(target).absolute()
        if self.target.exists():
            if not self.target.is_dir():
                raise OutputError(f"{self.target}: exists and is not a folder")
            if any(self.target.iterdir()) and not (self.target / MANIFEST).is_file():
                raise OutputError(f"{self.target}: folder is not empty and is not a previous "
                                  "build output; choose another -o or empty it")
        self.tmp: Path | None = None
        self._created: list[Path] = []

    def __enter__(self) -> Path:
        missing = [p for p in (self.target.parent, *self.target.parent.parents) if not p.exists()]
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self._created = missing  # deepest first, removed on failure if still empty
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.building-",
                                             dir=self.target.parent))
        except OSError as e:
            raise OutputError(f"{self.target}: cannot write there ({e.strerror})") from None
        self.tmp.chmod(0o755)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            for p in self._created:
                try:
                    p.rmdir()
                except OSError:
                    break
            return
        self._commit()

    def _commit(self) -> None:
        old = None
        if self.target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-",
                                        dir=self.target.parent))
            self.target.rename(old / "previous")
        self.tmp.rename(self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            logger.info("replaced the previous build in %s", self.target)
