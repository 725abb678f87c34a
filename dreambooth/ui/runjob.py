"""The worker process: ``python -m dreambooth.ui.runjob JOB.json`` runs the job's CLI command
(``dreambooth.cli.main``, the same code as the terminal) and records how it ended in JOB.json.

It is started in its own session, so it outlives the page and the server. SIGTERM is the
page's Stop: `dreambooth train` ends after the current step with a checkpoint; any other command
is interrupted (the CLI's Ctrl-C). A crash is recorded with its error; the traceback is in the
job's log, and a training run stays resumable from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from dreambooth.files import write_text_atomic


def read_job(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_job(path: Path, job: dict) -> None:
    write_text_atomic(Path(path), json.dumps(job, indent=1))


def last_error(log: Path) -> str:
    """The CLI's last "error: ..." message in ``log`` (it may run over several lines)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    if not starts:
        return ""
    return "\n".join(lines[starts[-1]:])[len("error:"):].strip()


def run(job_file: Path) -> int:
    from dreambooth.cli import main

    job = read_job(job_file)
    job.update(state="running", pid=os.getpid(), started=time.time())
    write_job(job_file, job)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # Stop: the CLI's Ctrl-C (train notes it itself)
    error = ""
    try:
        code = main(job["argv"])
    except BaseException as e:  # a crash: record it; the run stays resumable
        traceback.print_exc()
        code, error = 1, f"the worker crashed: {type(e).__name__}: {e} (traceback in the job's log)"
    sys.stdout.flush()
    sys.stderr.flush()
    if code and not error:
        error = last_error(Path(job["log"])) or f"exited with status {code}"
    job = read_job(job_file)
    job.update(state="done" if code == 0 else "failed", rc=code, error=error, ended=time.time())
    write_job(job_file, job)
    return code


if __name__ == "__main__":  # pragma: no cover - run as a process by jobs.py
    sys.exit(run(Path(sys.argv[1])))
