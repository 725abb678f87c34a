"""The run directory as every command meets it: the check that a folder is one, the lock that
lets one process write it at a time, and the rule that nothing is ever written into the photos.

The lock is an OS file lock (``flock``) on ``RUN_DIR/.lock``: the kernel releases it when its
holder exits or is killed, so a crashed run never leaves a stale lock, and a second writer is
refused with the PID and command of the process that holds it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

from dreambooth.errors import DreamboothError, InputError

LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, so no lock
    fcntl = None


class RunLockedError(DreamboothError):
    """Another process is writing this run directory."""


def require_run(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path, or a DreamboothError saying it is not a run directory."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        what = "does not exist" if not run.exists() else "has no config.yaml"
        raise DreamboothError(f"{run} is not a run directory ({what}); train one with "
                              "`dreambooth train --images DIR --class NOUN --out RUN_DIR`")
    return run


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (links resolved)."""
    p, f = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return p == f or f in p.parents


def refuse_inside_photos(path: str | Path, photos: str | Path | None, what: str) -> None:
    """An InputError when ``path`` (an output) is the photo folder or inside it."""
    if photos and Path(photos).expanduser().exists() and is_inside(path, photos):
        raise InputError(f"{what} {path} is inside the photo folder {photos}: the photos are only "
                         "ever read, and a run or export written among them would be read back as "
                         "photos. Choose a folder outside it")


def _holder(path: Path) -> str:
    try:
        pid, _, command = path.read_text().partition("\n")
    except OSError:
        return "another process"
    return f"process {pid.strip()}" + (f" ({command.strip()})" if command.strip() else "")


@contextlib.contextmanager
def writer_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``RUN_DIR/.lock`` while the body writes the run; RunLockedError if another process does."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = run / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLockedError(
            f"{run} is being written by {_holder(path)}: one process writes a run at a time. "
            "Wait for it to finish or stop it (Ctrl-C, or kill PID; the next --resume continues "
            "from its last checkpoint)") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{' '.join(sys.argv[:6])}\n".encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock
