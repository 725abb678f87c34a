"""Durable writes: a folder or file appears whole under its name, or not at all.

Every output the package publishes (checkpoints, ``final/``, exports, rewritten logs) is written
under a temporary sibling name, flushed to disk, and renamed into place; a kill or a full disk at
any moment leaves the previous version untouched and at most a ``.tmp-*`` leftover that the next
write removes. A full disk (or a file-size limit) becomes a ``DiskFullError`` that names the path,
not a library's traceback.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

from dreambooth.errors import DreamboothError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# safetensors' Rust writer reports I/O errors as text, e.g. "IoError(Os { code: 28, kind: StorageFull ..."
NO_SPACE_TEXT = ("StorageFull", "No space left", "FileTooLarge", "File too large", "QuotaExceeded",
                 "Disk quota exceeded")


class DiskFullError(DreamboothError):
    """The disk (or a quota or file-size limit) refused a write; nothing was replaced."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (an OSError, or a library's error wrapping one) says the disk is full."""
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        return True
    return any(text in str(exc) for text in NO_SPACE_TEXT)


def disk_full_error(path: Path, exc: BaseException) -> DiskFullError:
    reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else "no space left on device"
    return DiskFullError(f"{reason.lower()} while writing {path}; nothing there was replaced")


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` (or ``root`` itself) to disk before a rename publishes it."""
    for f in [root] if root.is_file() else root.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())


def _publish(tmp: Path, final: Path, write: Callable[[Path], None]) -> Path:
    try:
        write(tmp)
        fsync_tree(tmp)
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        remove(tmp)
        if is_disk_full(e):
            raise disk_full_error(final, e) from None
        raise
    return final


def _temporary(final: Path, is_dir: bool) -> Path:
    """``.tmp-NAME-PID`` (a folder) or ``.tmp-STEM-PID.SUFFIX`` (a file) beside ``final``, after
    removing the leftovers of earlier writes of ``final`` whose process is gone."""
    stem, suffix = (final.name, "") if is_dir else (final.stem, final.suffix)
    for old in final.parent.glob(f".tmp-{stem}-*{suffix}"):
        pid = old.name[len(f".tmp-{stem}-"):len(old.name) - len(suffix)]
        if pid.isdigit() and not _alive(int(pid)):
            remove(old)
    tmp = final.parent / f".tmp-{stem}-{os.getpid()}{suffix}"
    remove(tmp)
    return tmp


def published_stem(path: Path) -> str:
    """The stem ``path`` will have once published: ``.tmp-STEM-PID.x`` -> ``STEM``."""
    stem = Path(path).stem
    if stem.startswith(".tmp-") and stem.rpartition("-")[2].isdigit():
        return stem[len(".tmp-"):].rpartition("-")[0]
    return stem


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover from an earlier failed write
    return process_exists(pid)


def process_exists(pid: int) -> bool:
    """Whether a process with this id exists (another user's counts: it cannot be signalled)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into a temporary sibling folder of ``final``, then rename it into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(final, is_dir=True)
    tmp.mkdir()
    return _publish(tmp, final, write)


def atomic_file(final: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` to a temporary sibling file of ``final`` (same suffix), then rename it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return _publish(_temporary(final, is_dir=False), final, write)


def write_text_atomic(path: Path, text: str) -> Path:
    return atomic_file(path, lambda tmp: tmp.write_text(text))


def remove(path: Path) -> None:
    """Delete a file or folder if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def remove_leftovers(folder: Path) -> None:
    """Delete ``.tmp-*`` leftovers of killed writes in ``folder``."""
    for stale in Path(folder).glob(".tmp-*"):
        remove(stale)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checksums(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` except the names in ``skip``."""
    folder = Path(folder)
    return {f.relative_to(folder).as_posix(): sha256_file(f) for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name not in skip}


def verify_checksums(folder: Path, expected: dict[str, str]) -> list[str]:
    """What is wrong with ``folder`` against ``expected`` (``checksums``' output): one line per
    missing, unreadable or changed file; [] when every file is whole."""
    problems = []
    for name, digest in expected.items():
        f = Path(folder) / name
        if not f.is_file():
            problems.append(f"{f}: missing")
            continue
        try:
            actual = sha256_file(f)
        except OSError as e:
            problems.append(f"{f}: unreadable ({e.strerror or e})")
            continue
        if actual != digest:
            problems.append(f"{f}: truncated or changed since it was written (checksum mismatch)")
    return problems
