"""The web UI's background jobs without a browser: Stop writes a checkpoint, a killed worker is
reported failed and its run resumes, and the page's run status follows."""

import json
import os
import signal
import time

import pytest

from painting import paint_subject

pytest.importorskip("starlette", reason="the ui extra is not installed: pip install -e '.[ui]'")

from dreambooth.ui import forms, runs  # noqa: E402
from dreambooth.ui.jobs import Jobs  # noqa: E402


def wait(predicate, what: str, timeout: float = 180.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def job_state(jobs: Jobs, job: dict) -> dict:
    return next(j for j in jobs.all() if j["id"] == job["id"])


def logged_step(run_dir) -> int:
    return runs.progress(run_dir)["step"] if (run_dir / "config.yaml").is_file() else 0


def test_stop_checkpoints_a_killed_worker_fails_and_the_run_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    paint_subject(tmp_path / "photos", count=3)
    root = tmp_path / "runs"
    jobs = Jobs(root / ".ui" / "jobs")
    form = forms.StartForm(photos=str(tmp_path / "photos"), class_noun="toy", model="tiny", preset="tiny",
                           run="r", overrides={"train.steps": "100000", "prior.num_images": "2",
                                               "train.checkpoint_every": "100000"})
    _, run_dir, argv = forms.check_start(form, root)
    assert not run_dir.exists()  # the checks write nothing

    job = jobs.submit("train", "r", argv)
    wait(lambda: logged_step(run_dir) >= 3, "training steps")
    assert runs.status(run_dir, jobs.for_run("r")) == "running"
    jobs.stop(job["id"])
    done = wait(lambda: (j := job_state(jobs, job))["state"] in ("done", "failed") and j, "the stop")
    assert done["state"] == "done", done
    step = logged_step(run_dir)
    assert (run_dir / "checkpoints" / f"step-{step:06d}").is_dir()  # Stop wrote the step it ended on
    assert "stopped at step" in jobs.log_tail(done)
    assert runs.status(run_dir, jobs.for_run("r")) == "stopped"

    resumed = jobs.submit("train", "r", ["train", "--resume", str(run_dir), "--no-progress"])
    wait(lambda: logged_step(run_dir) >= step + 3, "resumed steps")
    os.kill(job_state(jobs, resumed)["pid"], signal.SIGKILL)  # a crash the worker cannot record
    failed = wait(lambda: (j := job_state(jobs, resumed))["state"] != "running" and j, "the kill noticed")
    assert failed["state"] == "failed" and "ended without recording" in failed["error"]
    assert runs.status(run_dir, jobs.for_run("r")) == "failed"
    assert json.loads((jobs.root / f"{resumed['id']}.json").read_text())["state"] == "failed"

    # It resumes from the checkpoint Stop wrote: the killed steps are trained again.
    (run_dir / "config.yaml").write_text((run_dir / "config.yaml").read_text().replace("steps: 100000", f"steps: {step + 5}"))
    last = jobs.submit("train", "r", ["train", "--resume", str(run_dir), "--no-progress"])
    finished = wait(lambda: (j := job_state(jobs, last))["state"] in ("done", "failed") and j, "the resumed run")
    assert finished["state"] == "done", jobs.log_tail(finished)
    assert (run_dir / "final").is_dir() and runs.status(run_dir, jobs.for_run("r")) == "done"
    assert runs.progress(run_dir)["step"] == step + 5
