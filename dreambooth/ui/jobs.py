"""Background CLI commands for the page: a queue that runs one job at a time (one GPU), each in
its own worker process (``runjob``), with its state in ``RUNS/.ui/jobs/ID.json`` and its output
in ``ID.log``. The files are the state: a reloaded page, or a restarted server, reads them back.

A job is queued, running, then done or failed (the worker writes those two), or cancelled
before it started. A running job whose process is gone without a word (killed) is failed. A
run directory is written by one process at a time (its ``.lock``), and a job for a run that
another job still has queued or running waits behind it in the same queue.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dreambooth.files import process_exists
from dreambooth.ui.runjob import read_job, write_job

ACTIVE = ("queued", "running")


def _alive(pid: int | None) -> bool:
    if not pid or not process_exists(pid):
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class Jobs:
    """The queue of CLI commands under ``root`` (``RUNS/.ui/jobs``)."""

    def __init__(self, root: Path, env: dict[str, str] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()

    def all(self) -> list[dict]:
        """Every job, oldest first, with dead workers marked failed."""
        jobs = []
        for path in sorted(self.root.glob("[0-9]*.json")):  # not the .tmp-* of a write under way
            try:
                job = read_job(path)
            except (OSError, ValueError):  # being replaced right now: read it next time
                continue
            if job["state"] == "running" and not self._running(job):
                job = read_job(path)  # it may have just recorded its end
                if job["state"] == "running":
                    job.update(state="failed", ended=time.time(), error=(
                        f"the worker process {job.get('pid')} ended without recording how (killed?); "
                        "a training run resumes from its last checkpoint"))
                    write_job(path, job)
            jobs.append(job)
        return jobs

    def _running(self, job: dict) -> bool:
        """Whether the job's worker is still there (a child of this server, or any process)."""
        proc = self.procs.get(job["id"])
        if proc is not None:
            if proc.poll() is None:
                return True
            del self.procs[job["id"]]  # reaped
            return False
        if job.get("pid"):
            return _alive(job["pid"])
        return time.time() - job.get("started", 0) < 60  # a worker still starting, from another server

    def submit(self, kind: str, run: str, argv: list[str], **extra) -> dict:
        """Queue ``dreambooth ARGV`` for run ``run``; start it now when nothing is running."""
        with self.lock:
            job_id = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000:06d}"
            job = {"id": job_id, "kind": kind, "run": run, "argv": argv, "state": "queued",
                   "created": time.time(), "log": str(self.root / f"{job_id}.log"), **extra}
            write_job(self.root / f"{job_id}.json", job)
        self.tick()
        return read_job(self.root / f"{job_id}.json")

    def tick(self) -> None:
        """Start the oldest queued job when no job is running."""
        with self.lock:
            jobs = self.all()
            if any(j["state"] == "running" for j in jobs):
                return
            queued = [j for j in jobs if j["state"] == "queued"]
            if queued:
                self._start(queued[0])

    def _start(self, job: dict) -> None:
        path = self.root / f"{job['id']}.json"
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        job.update(state="running", started=time.time())
        write_job(path, job)  # before the worker starts: from here on only the worker writes it
        with open(job["log"], "ab") as log:
            self.procs[job["id"]] = subprocess.Popen(
                [sys.executable, "-m", "dreambooth.ui.runjob", str(path)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def stop(self, job_id: str) -> dict:
        """Cancel a queued job; SIGTERM a running one (training writes a checkpoint and ends)."""
        with self.lock:
            path = self.root / f"{job_id}.json"
            job = read_job(path)
            if job["state"] == "queued":
                job.update(state="cancelled", ended=time.time())
                write_job(path, job)
            elif job["state"] == "running":
                proc = self.procs.get(job_id)
                pid = job.get("pid") or (proc.pid if proc else None)
                if pid and self._running(job):
                    os.kill(pid, signal.SIGTERM)
        return read_job(path)

    def for_run(self, run: str) -> list[dict]:
        return [j for j in self.all() if j["run"] == run]

    def log_tail(self, job: dict, lines: int = 20) -> str:
        try:
            text = Path(job["log"]).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
