"""The run directory as every command meets it: ``Run`` (the check that a folder is one, its
config, its paths, the model of one of its checkpoints), the lock that lets one process write it
at a time, and the rule that nothing is ever written into the photos.

The lock is an OS file lock (``flock``) on ``RUN_DIR/.lock``: the kernel releases it when its
holder exits or is killed, so a crashed run never leaves a stale lock, and a second writer is
refused with the PID and command of the process that holds it.
"""

from __future__ import annotations

import contextlib
import functools
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


def check_new_run(out: str | Path | None) -> Path:
    """``out`` as the Path of a run directory to create, or a DreamboothError: none given, a file,
    or a folder that already holds a run (`dreambooth train --out` and the web UI's run name)."""
    if not out:
        raise DreamboothError("missing --out RUN_DIR: where the run directory should be created")
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise DreamboothError(f"--out {run_dir} is a file; give a folder for the run directory")
    if (run_dir / "config.yaml").exists():
        raise DreamboothError(f"{run_dir} already holds a run; continue it with "
                              f"`dreambooth train --resume {run_dir}` or choose another --out")
    return run_dir


class Run:
    """A run directory made by `dreambooth train`, as `sample`, `sweep`, `eval`, `report`,
    `export`, `demo` and `bench` open it: ``Run(path)`` refuses a folder that is not one.

        run = Run("runs/dog")
        model, cfg, name = run.load("best")   # final, best or step-N
    """

    def __init__(self, path: str | Path):
        self.path = require_run(path)
        self.final, self.checkpoints = self.path / "final", self.path / "checkpoints"
        self.samples, self.metrics = self.path / "samples", self.path / "metrics.jsonl"
        self.sample_settings = self.path / "sample-settings.json"  # written by `dreambooth sweep`

    @functools.cached_property
    def config(self):
        """The run's resolved config (config.yaml)."""
        from dreambooth.config import load_config

        return load_config(self.path / "config.yaml")

    def load(self, which: str = "final", trust_pickle: bool = False):
        """(model, config, name) of checkpoint ``which``: "final", "best" or "step-N"."""
        from dreambooth.checkpoint import load_checkpoint_model

        return load_checkpoint_model(self.path, which, trust_pickle)

    def refuse_output(self, out: str | Path, what: str) -> None:
        """Refuse an output ``out`` inside the run's photo folder (before minutes of loading)."""
        refuse_inside_photos(out, self.config.data.images, what)

    def new_folder(self, prefix: str) -> Path:
        """samples/PREFIX-K for the first K that is not there yet."""
        k = 1
        while (self.samples / f"{prefix}-{k}").exists():
            k += 1
        return self.samples / f"{prefix}-{k}"


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
