"""Kill points for tests/test_kill.py: SIGKILL a training process at the N-th event of one kind.

An *event* is one call, made by the process that trains, of something a kill can land in:

  write      a file opened for writing by Python (until it is closed), a safetensors file,
             a torch.save to a path (what native code writes by itself, such as the tokenizers
             library's tokenizer.json, is no write event; its fsync and rename still are)
  replace    os.replace / os.rename: a rename that publishes a file or a folder
  fsync      os.fsync
  remove     shutil.rmtree / os.unlink / os.remove
  generate   a UNet forward without gradients (drawing class images)
  forward    a UNet forward with gradients (a training step)
  backward   Tensor.backward
  optimizer  an optimizer step (torch's global step hooks)

File events are sorted into *phases* by the path they touch, using only the documented layout
of the run directory: the class-image cache ($DREAMBOOTH_CACHE) is "class-images",
RUN_DIR/checkpoints/... is "checkpoint", RUN_DIR/<a name holding "final"> (final/ and its
temporary siblings) is "final", RUN_DIR/<a name holding "metrics"> is "metrics", the rest of
RUN_DIR (config.yaml, report.html) is "run". Model events are "step" (forward, backward,
optimizer) or "class-images" (generate). Files elsewhere (libraries' temp files) are no events,
and neither is what happens inside a removal or inside this module's own work.

Nothing here touches the product: ``Instrument`` patches, in the process that trains, the
library and OS functions that the product calls; it counts events and, when armed with a
``Kill``, SIGKILLs the process at the N-th event of that (phase, kind), as ``action`` says:

  before   before the call: nothing of it happened
  after    once it is done: a written file is closed whole, a rename is done, a step taken
  torn     a written file is cut to half of what this write added, then the kill (a kill in
           the middle of a write: the kernel stops a write between pages)
  empty    a file is created (or truncated) and nothing written yet: the kill between a
           Python open() and its first write
  partial  a removal deletes half of the files under its path, then the kill
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import io
import os
import shutil
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

KINDS = ("write", "replace", "fsync", "remove", "generate", "forward", "backward", "optimizer")
ACTIONS = ("before", "after", "torn", "empty", "partial")


@dataclass(frozen=True)
class Kill:
    phase: str
    kind: str
    action: str
    n: int  # the N-th event of (phase, kind) in the process, counting from 1
    where: str = ""  # what that event touched in the uninterrupted run (for messages only)

    def __post_init__(self):
        assert self.kind in KINDS and self.action in ACTIONS and self.n >= 1, self

    def __str__(self) -> str:
        return f"{self.action} {self.kind} #{self.n} of phase {self.phase}" + (f" ({self.where})" if self.where else "")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    while True:  # pragma: no cover - the signal is delivered before this line runs
        time.sleep(1)


class _Closing:
    """A file object that runs ``then`` once it has been closed (for after/torn writes)."""

    def __init__(self, f, then: Callable[[], None]):
        self._f, self._then = f, then

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __iter__(self):
        return iter(self._f)

    def close(self):
        self._f.close()
        self._then()


class Instrument:
    """Counts the events of one training process; armed with ``kill``, dies at it.

    ``on_event`` (the reference run's checkpoint snapshots) is called before each event is
    counted, with events switched off while it runs."""

    def __init__(self, run_dir: Path, cache_root: Path, kill: Kill | None = None,
                 on_event: Callable[[], None] | None = None):
        self.run_dir = os.path.realpath(run_dir)
        self.cache = os.path.realpath(cache_root)
        self.kill, self.on_event = kill, on_event
        self.counts: Counter = Counter()
        self.events: list[tuple[str, str, str]] = []  # (phase, kind, the path it touched or "")
        self.quiet = 0
        self._undo: list[Callable[[], None]] = []

    # -------------------------------------------------------------- events

    def phase_of(self, path) -> str | None:
        try:
            p = os.fsdecode(os.path.realpath(os.fspath(path)))
        except TypeError:
            return None
        if p == self.cache or p.startswith(self.cache + os.sep):
            return "class-images"
        if not p.startswith(self.run_dir + os.sep):
            return None
        first = p[len(self.run_dir) + 1:].split(os.sep)[0]
        if first == "checkpoints":
            return "checkpoint"
        for phase in ("final", "metrics"):
            if phase in first:
                return phase
        return "run"

    def event(self, phase: str | None, kind: str, path=None) -> str | None:
        """Count one event; the action to take if it is the armed kill, else None."""
        if phase is None or self.quiet:
            return None
        if self.on_event is not None:
            with self.silent():
                self.on_event()
        self.counts[phase, kind] += 1
        self.events.append((phase, kind, self.relative(path)))
        k = self.kill
        if k is not None and (k.phase, k.kind) == (phase, kind) and self.counts[phase, kind] == k.n:
            return k.action
        return None

    def relative(self, path) -> str:
        if path is None:
            return ""
        p = os.fsdecode(os.path.realpath(os.fspath(path)))
        for root, shown in ((self.run_dir, "RUN_DIR"), (self.cache, "CACHE")):
            if p.startswith(root + os.sep):
                return f"{shown}/{p[len(root) + 1:]}"
        return p

    @contextlib.contextmanager
    def silent(self):
        self.quiet += 1
        try:
            yield
        finally:
            self.quiet -= 1

    def finish_write(self, path, start: int, action: str) -> None:
        """After a written file is complete: cut it (torn) and/or die."""
        if action == "torn":
            size = os.path.getsize(path)
            os.truncate(path, start + (size - start) // 2)
        die()

    # -------------------------------------------------------------- patches

    def _patch(self, owner, name: str, new) -> None:
        old = getattr(owner, name)
        setattr(owner, name, new)
        self._undo.append(lambda: setattr(owner, name, old))

    def install(self) -> "Instrument":
        import safetensors.torch as st
        import torch
        from diffusers import UNet2DConditionModel

        me = self
        real_open = builtins.open

        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, int) or not any(c in mode for c in "wax+"):
                return real_open(file, mode, *args, **kwargs)
            action = me.event(me.phase_of(file), "write", file)
            if action is None:
                return real_open(file, mode, *args, **kwargs)
            if action == "before":
                die()
            if action == "empty":
                real_open(file, mode, *args, **kwargs)
                die()
            start = os.path.getsize(file) if "a" in mode and os.path.exists(file) else 0
            return _Closing(real_open(file, mode, *args, **kwargs),
                            lambda: me.finish_write(file, start, action))

        self._patch(builtins, "open", open_)
        self._patch(io, "open", open_)  # pathlib's Path.open / write_text

        def wrap_write(real, path_arg):
            @functools.wraps(real)
            def write(*args, **kwargs):
                path = path_arg(*args, **kwargs)
                action = me.event(me.phase_of(path), "write", path) if path is not None else None
                if action == "before":
                    die()
                if action == "empty":
                    real_open(path, "wb")
                    die()
                result = real(*args, **kwargs)
                if action is not None:
                    me.finish_write(path, 0, action)
                return result
            return write

        self._patch(st, "serialize_file", wrap_write(
            st.serialize_file, lambda tensors, filename, *a, **k: filename))
        self._patch(torch, "save", wrap_write(
            torch.save, lambda obj, f, *a, **k: f if isinstance(f, (str, os.PathLike)) else None))

        def wrap_rename(real):
            @functools.wraps(real)
            def rename(src, dst, *args, **kwargs):
                action = None if (args or kwargs) else me.event(me.phase_of(dst) or me.phase_of(src), "replace", dst)
                if action == "before":
                    die()
                real(src, dst, *args, **kwargs)
                if action is not None:
                    die()
            return rename

        self._patch(os, "replace", wrap_rename(os.replace))
        self._patch(os, "rename", wrap_rename(os.rename))

        real_fsync = os.fsync

        @functools.wraps(real_fsync)
        def fsync(fd):
            try:
                number = fd if isinstance(fd, int) else fd.fileno()
                path = os.readlink(f"/proc/self/fd/{number}")
            except (OSError, AttributeError, ValueError):
                path = None
            action = me.event(me.phase_of(path), "fsync", path) if path else None
            if action == "before":
                die()
            real_fsync(fd)
            if action is not None:
                die()

        self._patch(os, "fsync", fsync)

        real_rmtree = shutil.rmtree

        @functools.wraps(real_rmtree)
        def rmtree(path, *args, **kwargs):
            action = me.event(me.phase_of(path), "remove", path)
            if action == "before":
                die()
            if action == "partial":
                files = sorted(str(Path(root) / f) for root, _, names in os.walk(path) for f in names)
                with me.silent():
                    for f in files[:len(files) // 2]:
                        os.unlink(f)
                die()
            with me.silent():
                real_rmtree(path, *args, **kwargs)
            if action is not None:
                die()

        rmtree.avoids_symlink_attacks = getattr(real_rmtree, "avoids_symlink_attacks", False)
        self._patch(shutil, "rmtree", rmtree)

        def wrap_unlink(real):
            @functools.wraps(real)
            def unlink(path, *args, **kwargs):
                action = None if (args or kwargs) else me.event(me.phase_of(path), "remove", path)
                if action in ("before", "partial"):
                    die()
                real(path, *args, **kwargs)
                if action is not None:
                    die()
            return unlink

        self._patch(os, "unlink", wrap_unlink(os.unlink))
        self._patch(os, "remove", wrap_unlink(os.remove))

        real_forward = UNet2DConditionModel.forward

        @functools.wraps(real_forward)
        def forward(module, *args, **kwargs):
            grad = torch.is_grad_enabled()
            if me.event("step" if grad else "class-images", "forward" if grad else "generate"):
                die()
            return real_forward(module, *args, **kwargs)

        self._patch(UNet2DConditionModel, "forward", forward)

        real_backward = torch.Tensor.backward

        @functools.wraps(real_backward)
        def backward(tensor, *args, **kwargs):
            if me.event("step", "backward"):
                die()
            return real_backward(tensor, *args, **kwargs)

        self._patch(torch.Tensor, "backward", backward)

        armed = {"after": False}

        def pre_step(optimizer, args, kwargs):
            action = me.event("step", "optimizer")
            if action == "before":
                die()
            armed["after"] = action is not None

        def post_step(optimizer, args, kwargs):
            if armed["after"]:
                die()

        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        for handle in (register_optimizer_step_pre_hook(pre_step), register_optimizer_step_post_hook(post_step)):
            self._undo.append(handle.remove)
        return self

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> "Instrument":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


# ------------------------------------------------------------------ processes


@dataclass
class Outcome:
    killed: bool  # died by SIGKILL
    code: int | None  # exit status when it exited
    error: str  # the child's traceback, if it raised

    def __str__(self) -> str:
        if self.killed:
            return "killed by SIGKILL"
        return f"exited with status {self.code}" + (f":\n{self.error}" if self.error else "")


def in_child(fn: Callable[[], object], err_file: Path, timeout: float = 300.0) -> Outcome:
    """Run ``fn()`` in a forked copy of this process (torch and the rest already imported) and
    wait for it: it exits 0 when ``fn`` returns, 1 when it raises (the traceback goes to
    ``err_file``), or dies by a signal."""
    err_file = Path(err_file)
    err_file.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            try:
                err_file.write_text(traceback.format_exc())
            except BaseException:
                pass
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    deadline = time.monotonic() + timeout
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(0.02)
    except BaseException as e:  # a timeout, or Ctrl-C in pytest: leave no child behind
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if isinstance(e, TimeoutError):
            return Outcome(False, None, f"timed out after {timeout:.0f} s (killed)")
        raise
    error = err_file.read_text() if err_file.is_file() else ""
    if os.WIFSIGNALED(status):
        return Outcome(os.WTERMSIG(status) == signal.SIGKILL, None,
                       error or f"died by signal {os.WTERMSIG(status)}")
    return Outcome(False, os.WEXITSTATUS(status), error)
