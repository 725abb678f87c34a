"""The web UI's background jobs without a browser: Stop writes a checkpoint, a killed worker is
reported failed and its run resumes, and the page's run status follows; training outlives the
server, and a new server on the same runs folder reads it back and stops it; Compare draws two
runs at the same prompts and seeds."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from painting import paint_subject

pytest.importorskip("starlette", reason="the ui extra is not installed: pip install -e '.[ui]'")

from dreambooth.ui import forms, runs  # noqa: E402
from dreambooth.cli import main  # noqa: E402
from dreambooth.rundir import Run  # noqa: E402
from dreambooth.ui.jobs import Jobs  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# ------------------------------------------------------------------ a server restart


def start_server(runs, port: int, env: dict, log):
    proc = subprocess.Popen([sys.executable, "-m", "dreambooth", "ui", "--port", str(port), "--runs", str(runs)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    wait(lambda: proc.poll() is not None or get(port, "/api/runs"), "the server", timeout=120)
    assert proc.poll() is None, "the server ended"
    return proc


def get(port: int, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except OSError:
        return None


def test_training_outlives_the_server_and_a_new_server_reads_it_back(tmp_path):
    paint_subject(tmp_path / "photos", count=3)
    runs_dir, port = tmp_path / "runs", free_port()
    env = {**os.environ, "DREAMBOOTH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "server.log", "wb") as log:
        first = start_server(runs_dir, port, env, log)
        try:
            started = get(port, "/api/start", {
                "photos": str(tmp_path / "photos"), "class_noun": "toy", "model": "tiny", "preset": "tiny",
                "run": "r", "overrides": {"train.mode": "lora", "train.steps": "100000", "prior.enabled": "false",
                                          "train.checkpoint_every": "100000"}})
            assert started and started["run"] == "r", (tmp_path / "server.log").read_text()
            seen = wait(lambda: (d := get(port, "/api/runs/r")) and (d["progress"] or {}).get("step", 0) >= 2 and d,
                        "steps")
        finally:
            first.terminate()
            first.wait(30)
        job = json.loads((runs_dir / ".ui" / "jobs" / f"{started['job']['id']}.json").read_text())
        os.kill(job["pid"], 0)  # the worker outlived its server (ProcessLookupError if not)

        second = start_server(runs_dir, port, env, log)
        try:
            again = get(port, "/api/runs/r")
            assert again["status"] == "running" and again["jobs"][-1]["state"] == "running"
            assert again["progress"]["step"] >= seen["progress"]["step"] and again["progress"]["steps"] == 100000
            listed = next(r for r in get(port, "/api/runs")["runs"] if r["name"] == "r")
            assert listed["status"] == "running" and listed["step"] >= seen["progress"]["step"]
            wait(lambda: get(port, "/api/runs/r")["progress"]["step"] > again["progress"]["step"], "more steps")
            get(port, "/api/runs/r/stop", {})  # the new server stops a worker the old one started
            done = wait(lambda: (d := get(port, "/api/runs/r"))["status"] == "stopped" and d, "the stop")
        finally:
            second.terminate()
            second.wait(30)
    assert done["jobs"][-1]["state"] == "done"
    step = done["progress"]["step"]
    assert (runs_dir / "r" / "checkpoints" / f"step-{step:06d}").is_dir()


# ------------------------------------------------------------------ compare


def test_compare_draws_both_runs_at_the_same_prompts_and_seeds(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from PIL import Image

    from dreambooth.ui.server import App

    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    paint_subject(tmp_path / "photos", count=3)
    app = App(tmp_path / "runs")
    ask = {"runs": ["b", "a"], "prompts": "a photo of my toy\na {token} {class} in the snow", "n": 2, "seed": 7}
    one = json.loads(app.compare(None, {**ask, "runs": ["a"]}).body)
    assert one["errors"]["compare"] == "tick two runs to compare them"
    for name, steps in (("a", "2"), ("b", "4")):  # trained here, in this process: the sample jobs are what is tested
        form = forms.StartForm(photos=str(tmp_path / "photos"), class_noun="toy", model="tiny", preset="tiny", run=name,
                               overrides={"train.mode": "lora", "train.steps": steps, "prior.enabled": "false"})
        _, _, argv = forms.check_start(form, app.root)
        if name == "b":
            refused = app.compare(None, ask)  # b has not trained yet
            assert refused.status_code == 400
            assert json.loads(refused.body)["errors"]["compare"].startswith("b has not finished training")
        assert main(argv) == 0

    asked = app.compare(None, ask)
    cid = asked["id"]

    def drawn_both():
        app.jobs.tick()  # what the server's queue thread does
        return all(j["state"] not in ("queued", "running") for j in app.jobs.all())
    wait(drawn_both, "the two sample jobs")
    shown = app.comparison(SimpleNamespace(path_params={"id": cid}))
    assert [s["run"] for s in shown["sides"]] == ["b", "a"] and shown["same"], shown
    argvs = [j["argv"] for j in asked["jobs"]]  # `dreambooth sample`, the same arguments but the run and --out
    strip = lambda a: [x for i, x in enumerate(a) if i != 1 and a[i - 1] != "--out"]  # noqa: E731
    assert argvs[0][0] == "sample" and strip(argvs[0]) == strip(argvs[1])

    drawn = {}
    for side in shown["sides"]:
        assert side["state"] == "done" and (tmp_path / "runs" / side["sheet"]).is_file()
        texts = [Image.open(tmp_path / "runs" / i["file"]).text for i in side["images"]]
        drawn[side["run"]] = {(t["prompt"], int(t["seed"])) for t in texts}
        assert {Path(t["run"]).name for t in texts} == {side["run"]}
    token = Run(tmp_path / "runs" / "a").config.data.token
    assert Run(tmp_path / "runs" / "b").config.data.token == token  # both picked by data.token=auto
    assert drawn["a"] == drawn["b"] == {(p, s) for p in (f"a photo of {token} toy", f"a {token} toy in the snow")
                                         for s in (7, 8)}
