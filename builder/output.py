"""Safe output: build into a temporary folder beside the target, rename it into place at the end.

A build owns only what it wrote. A failed or interrupted build leaves nothing behind, and a
previous good build is replaced only once the new one is complete, and only when it is exactly
a previous build: its manifest (``build_manifest.json``) is one this builder wrote and the folder
holds the files it lists, unchanged (the manifest keeps each file's size and SHA-256), and
nothing else. Any other non-empty folder is refused, naming what is in the way; nothing a user
put there is ever deleted.

One build at a time per target: a lock file beside it (``.<name>.lock``, removed on release)
makes a second concurrent build into the same folder fail at once. Under that lock, staging
folders that builds killed before they could clean up (SIGKILL, power loss) left beside the
target are removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import string
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from builder import interrupt
from builder.errors import OutputError

logger = logging.getLogger(__name__)

MANIFEST = "build_manifest.json"
_STAGING_KINDS = ("building", "old")
# written into each staging folder when it is made: only folders holding it are ever removed as
# a dead build's staging (a user's own folder of a similar name is not ours)
STAGING_MARK = ".builder-staging"


# a write refused for want of room: the file being written is to blame, not a source it copies
_NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """An OSError while ``path`` is written names it: a write to an open file names no file,
    and a copy that runs out of room names its source."""
    try:
        yield
    except OSError as e:
        if e.filename is None or e.errno in _NO_ROOM and e.filename != str(path):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def list_outputs(folder: Path) -> list[dict]:
    """Every file under ``folder`` but the manifest: ``{"name": relative path, "bytes": size,
    "sha256": its content's digest}`` (a rebuild replaces only files whose content is still
    what the build wrote)."""
    found = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if name not in (MANIFEST, STAGING_MARK) and path.is_file() and not path.is_symlink():
            found.append({"name": name, "bytes": path.stat().st_size, "sha256": digest(path)})
    return found


def digest(path: Path) -> str:
    """SHA-256 of a file's content, read in 16 MiB slices."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def _listed(manifest: Path) -> dict[str, tuple[int, str | None]] | None:
    """The files a manifest lists (name -> bytes and SHA-256; None for a manifest written
    before digests were kept), or None when it is not one a build wrote."""
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
        listed = {o["name"]: (o["bytes"], o.get("sha256")) for o in m["outputs"]}
        ours = "builder" in m["versions"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not ours or not all(isinstance(n, str) and isinstance(b, int)
                           and (d is None or isinstance(d, str))
                           for n, (b, d) in listed.items()):
        return None
    return listed


def _changed(path: Path, size: int, sha256: str | None) -> bool:
    """A listed file no longer as the build wrote it: another size, or (same size) another
    content."""
    if not path.is_file() or path.is_symlink():
        return False
    return path.stat().st_size != size or (sha256 is not None and digest(path) != sha256)


def _shown(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_replaceable(target: Path) -> None:
    """Refuse ``target`` unless it is absent, empty, or exactly a previous build output."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder")
    entries = list(target.iterdir())
    if not entries:
        return
    manifest = target / MANIFEST
    if not manifest.is_file():
        raise OutputError(f"{target}: folder is not empty and is not a previous build output; "
                          "choose another -o or empty it")
    listed = _listed(manifest)
    if listed is None:
        raise OutputError(f"{manifest}: not a manifest a build wrote, so {target} is not a "
                          "previous build output; choose another -o or empty it")
    foreign: list[str] = []
    for entry in sorted(entries):
        if entry.name == MANIFEST:
            continue
        if entry.is_dir() and not entry.is_symlink():
            inner = [p for p in entry.rglob("*") if p.is_file() or p.is_symlink()]
            theirs = [p for p in inner if p.relative_to(target).as_posix() not in listed]
            if theirs or not inner:
                foreign.append(entry.name + "/")
        elif entry.name not in listed:
            foreign.append(entry.name)
    changed = [name for name, (size, sha256) in listed.items()
               if _changed(target / name, size, sha256)]
    if foreign:
        raise OutputError(f"{target}: holds what the previous build did not write: "
                          f"{_shown(foreign)}; move it out or choose another -o (a rebuild "
                          "replaces only a previous build's own files)")
    if changed:
        raise OutputError(f"{target}: {_shown(changed)} changed since the previous build "
                          "wrote it; move it out or choose another -o (a rebuild replaces only "
                          "a previous build's own files)")


class StagedOutput:
    """``with StagedOutput(target) as tmp:`` write into ``tmp``; it becomes ``target`` on
    success. Entering takes the target's lock, removes dead builds' staging folders and checks
    that the target may be replaced; leaving releases the lock."""

    def __init__(self, target: Path) -> None:
        self.target = Path(target).absolute()
        check_replaceable(self.target)  # fail before anything is created
        self.tmp: Path | None = None
        self._made = False  # tmp was made by this build
        self._created: list[Path] = []
        self._lock: FileLock | None = None

    @property
    def lock_path(self) -> Path:
        return self.target.parent / f".{self.target.name}.lock"

    def __enter__(self) -> Path:
        missing = [p for p in (self.target.parent, *self.target.parent.parents) if not p.exists()]
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self._created = missing  # deepest first, removed on failure if still empty
            self._acquire()
            self._remove_stale()
            check_replaceable(self.target)
            _staging(self.target, "building", self)
        except OSError as e:
            self._unstage()
            self._leave()
            raise OutputError(f"{self.target}: cannot write there ({e.strerror})") from None
        except BaseException:
            self._unstage()
            self._leave()
            raise
        self.tmp.chmod(0o755)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        committed = False
        try:
            if exc_type is None:
                self._commit()
                committed = True
        finally:
            if not committed:
                self._unstage()
            self._leave(failed=not committed)

    def _unstage(self) -> None:
        """Remove the staging folder: the one this build made, or (a signal between its mkdir
        and the bookkeeping) the empty folder of that name."""
        if self.tmp is None:
            return
        if self._made:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            try:
                self.tmp.rmdir()
            except OSError:
                pass

    # -- the lock ------------------------------------------------------------------------
    def _acquire(self) -> None:
        self._lock = FileLock(self.lock_path, timeout=0, on_acquired=_write_pid)
        try:
            self._lock.acquire()
        except Timeout:
            self._lock = None
            holder = _read_pid(self.lock_path)
            raise OutputError(f"{self.target}: another build into this folder is running"
                              f"{f' (pid {holder})' if holder else ''}; wait for it to finish "
                              f"or choose another -o (lock: {self.lock_path})") from None

    def _leave(self, failed: bool = True) -> None:
        lock, self._lock = self._lock, None
        if lock is not None and not lock.is_locked:  # a signal inside acquire: the file may
            try:                                      # be there, held by nobody: take it
                lock.acquire()
            except (Timeout, OSError):  # (another build's by now: not ours to remove)
                lock = None
        if lock is not None:
            if os.name == "posix":  # unlink while held (a peer that opened it retries); on
                self.lock_path.unlink(missing_ok=True)  # Windows the release unlinks it
            lock.release()
        if failed:
            for p in self._created:
                try:
                    p.rmdir()
                except OSError:
                    break

    def _remove_stale(self) -> None:
        """Staging folders of this target that no live build owns (we hold its lock), known by
        their mark; a previous build that a killed build had moved aside (its target gone) is
        put back first."""
        pattern = re.compile(rf"\.{re.escape(self.target.name)}\."
                             rf"({'|'.join(_STAGING_KINDS)})-[a-z0-9_]{{8}}")
        for path in sorted(self.target.parent.iterdir()):
            if pattern.fullmatch(path.name) and path.is_dir() and not path.is_symlink() \
                    and (path / STAGING_MARK).is_file():
                if (path / "previous").is_dir() and not self.target.exists() \
                        and not self.target.is_symlink():
                    (path / "previous").rename(self.target)
                    logger.warning("put back the previous build into %s, which a build that "
                                   "did not finish had moved to %s", self.target, path)
                shutil.rmtree(path)
                logger.warning("removed %s, left by a build into %s that did not finish",
                               path, self.target)

    # -- the commit ----------------------------------------------------------------------
    def _commit(self) -> None:
        interrupt.check()  # a signal the build's libraries swallowed: nothing is put in place
        check_replaceable(self.target)  # again: something may have appeared while we built
        (self.tmp / STAGING_MARK).unlink()
        old = None
        if self.target.exists():
            old = _staging(self.target, "old")
            self.target.rename(old / "previous")
        try:
            self.tmp.rename(self.target)
        except BaseException:  # a full disk, or a signal between the two renames
            if old is not None and not self.target.exists():  # put the previous build back
                (old / "previous").rename(self.target)
                shutil.rmtree(old)
            raise
        if old is not None:
            shutil.rmtree(old)
            logger.info("replaced the previous build in %s", self.target)


def _staging(target: Path, kind: str, owner: StagedOutput | None = None) -> Path:
    """A new staging folder beside ``target`` (``.<name>.<kind>-xxxxxxxx``), marked as ours.
    With ``owner``, its ``tmp`` names the folder before it is made, so that a signal at any
    moment leaves nothing its cleanup does not know of."""
    for _ in range(100):
        path = target.parent / (f".{target.name}.{kind}-"
                                + "".join(random.choices(string.ascii_lowercase + string.digits,
                                                         k=8)))
        if owner is not None:
            owner.tmp = path
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        if owner is not None:
            owner._made = True
        (path / STAGING_MARK).write_text(f"{os.getpid()}\n", encoding="utf-8")
        return path
    raise FileExistsError(errno.EEXIST, "no free staging name", str(target.parent))


def _write_pid(fd: int) -> None:
    """The holder's pid, for the message of a build that finds the lock taken; a full disk
    leaves the file empty (the lock itself needs no space)."""
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass


def _read_pid(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text if text.isdigit() else None
