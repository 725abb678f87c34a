"""The web app: JSON routes over forms / jobs / runs, the page, and the runs folder's files.

Starlette (the ASGI toolkit FastAPI is built on) and uvicorn: small, well kept, no state of
their own, nothing fetched at run time. This is the only module that imports them
(tests/test_ui.py checks). Blocking work runs in Starlette's thread pool (plain ``def`` routes);
anything longer than a second is a job (jobs.py).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import threading
import time
import zipfile
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from dreambooth.config import list_presets
from dreambooth.errors import DreamboothError
from dreambooth.ui import forms, runs
from dreambooth.ui.jobs import Jobs

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_FILES = 500


class App:
    """The routes, bound to one runs folder and one models folder."""

    def __init__(self, runs_dir: str | Path, models_dir: str | Path | None = None):
        self.root = Path(runs_dir).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.models_dir = models_dir
        self.uploads = self.root / ".ui" / "uploads"
        self.jobs = Jobs(self.root / ".ui" / "jobs")
        self.lock = threading.Lock()
        self.warming: threading.Thread | None = None

    # ---------------------------------------------------------------- helpers

    def run_dir(self, name: str) -> Path:
        if not forms.SAFE_NAME.match(name):
            raise DreamboothError(f"no run named {name!r}")
        return self.root / name

    def inside(self, rel: str) -> Path:
        path = (self.root / rel).resolve()
        if path != self.root and self.root not in path.parents:
            raise DreamboothError(f"{rel} is outside the runs folder")
        return path

    # ---------------------------------------------------------------- the form

    def options(self, request: Request):
        """What the form offers; the page asks for it on load, so the first plan's imports start now."""
        with self.lock:
            if self.warming is None:
                self.warming = threading.Thread(target=forms.warm_up, daemon=True, name="warm-up")
                self.warming.start()
        return {"presets": list_presets(), "models": forms.base_models(self.models_dir), "runs_dir": str(self.root)}

    def tokens(self, request: Request):
        return forms.token_suggestions(request.query_params.get("model", ""))

    def schema(self, request: Request):
        try:
            return {"sections": forms.settings_schema(request.query_params.get("preset") or None)}
        except DreamboothError as e:
            return JSONResponse({"errors": {"preset": str(e)}}, status_code=400)

    def token(self, request: Request):
        q = request.query_params
        return {"warnings": forms.token_warnings(q.get("token", "").strip(), q.get("model", ""))}

    async def upload(self, request: Request):
        form = await request.form(max_files=MAX_UPLOAD_FILES)
        resolution = int(form.get("resolution") or 512)
        folder = self.uploads / (time.strftime("%Y%m%d-%H%M%S-") + f"{time.time_ns() % 1_000_000:06d}")
        folder.mkdir(parents=True)
        for item in form.getlist("photos"):
            if hasattr(item, "filename") and item.filename:
                (folder / Path(item.filename).name).write_bytes(await item.read())
        return await run_in_threadpool(self._intake, folder, resolution, True)

    def folder(self, request: Request, body: dict):
        return self._intake(Path(body.get("folder", "")).expanduser(), int(body.get("resolution") or 512), False)

    def _intake(self, folder: Path, resolution: int, uploaded: bool):
        try:
            return forms.intake_table(folder, resolution)
        except DreamboothError as e:
            if uploaded:  # a bad set leaves nothing behind
                shutil.rmtree(folder, ignore_errors=True)
                with contextlib.suppress(OSError):
                    folder.parent.rmdir()  # uploads/ itself, when this was the only one
            return JSONResponse({"errors": {"photos": str(e)}}, status_code=400)

    def plan(self, request: Request, body: dict):
        try:
            return {"text": forms.plan_text(forms.StartForm.from_json(body))}
        except DreamboothError as e:
            return JSONResponse({"errors": {"plan": str(e)}}, status_code=400)
        except Exception as e:  # an operation fake tensors cannot run: what `train` says, then trains
            return {"text": f"note: the memory plan could not run ({type(e).__name__}: {str(e)[:200]}); "
                            "training runs without it"}

    def start(self, request: Request, body: dict):
        form = forms.StartForm.from_json(body)
        try:
            _, run_dir, argv = forms.check_start(form, self.root)
        except forms.FormErrors as e:
            return JSONResponse({"errors": e.errors}, status_code=400)
        if any(j["state"] in ("queued", "running") and j["kind"] == "train" for j in self.jobs.for_run(form.run)):
            return JSONResponse({"errors": {"run": f"{form.run} is already queued"}}, status_code=400)
        return {"run": form.run, "job": self.jobs.submit("train", form.run, argv)}

    # ---------------------------------------------------------------- runs

    def list_runs(self, request: Request):
        jobs = self.jobs.all()
        names = runs.list_runs(self.root, jobs)
        return {"runs": [runs.summary(self.root / n, self.root, [j for j in jobs if j["run"] == n]) for n in names],
                "jobs": jobs[-20:]}

    def run_details(self, request: Request):
        name = request.path_params["name"]
        jobs = self.jobs.for_run(name)
        info = runs.details(self.run_dir(name), self.root, jobs)
        info["jobs"] = jobs[-10:]
        info["log"] = self.jobs.log_tail(jobs[-1]) if jobs else ""
        return info

    def action(self, request: Request, body: dict):
        name, what = request.path_params["name"], request.path_params["action"]
        run_dir = self.run_dir(name)
        if what == "stop":
            active = [j for j in self.jobs.for_run(name) if j["state"] in ("queued", "running")]
            return {"jobs": [self.jobs.stop(j["id"]) for j in active]}
        if not (run_dir / "config.yaml").is_file():
            return JSONResponse({"errors": {what: f"{name} has no config.yaml yet: nothing to {what}"}}, status_code=400)
        try:
            kind, argv = self._argv(what, run_dir, body)
        except DreamboothError as e:
            return JSONResponse({"errors": {what: str(e)}}, status_code=400)
        return {"job": self.jobs.submit(kind, name, argv)}

    def _argv(self, what: str, run_dir: Path, body: dict) -> tuple[str, list[str]]:
        """The CLI command for a run's button, after the CLI's own quick checks."""
        run = str(run_dir)
        if what == "resume":
            return "train", ["train", "--resume", run, "--no-progress"]
        if what == "sample":
            return "sample", self._sample_argv(run_dir, *_sample_request(body))
        if what == "export":
            from dreambooth.export import check_request, default_output
            from dreambooth.rundir import Run

            fmt, dtype = body.get("format") or "diffusers", body.get("dtype") or "fp32"
            check_request(fmt, Run(run_dir).config.train.mode, 1.0, run_dir)
            out, k = default_output(run_dir, "final", fmt, dtype), 1
            while out.exists():
                k += 1
                out = default_output(run_dir, f"final-{k}", fmt, dtype)
            return "export", ["export", run, "--format", fmt, "--dtype", dtype, "--out", str(out)]
        if what == "sweep":
            argv = ["sweep", run, "--no-progress"]
            for flag in ("dino", "clip"):
                if body.get(flag):
                    argv += [f"--{flag}", str(body[flag])]
            for item in str(body.get("overrides", "")).split():
                argv += ["--set", item]
            return "sweep", argv
        raise DreamboothError(f"unknown action {what!r}")

    @staticmethod
    def _sample_argv(run_dir: Path, prompts: list[str], n: int, seed: int) -> list[str]:
        """`dreambooth sample` into a new samples/sample-K, made now so that a second job queued
        for the same run picks the next K."""
        from dreambooth.rundir import Run

        out = Run(run_dir).new_folder("sample")
        out.mkdir(parents=True)
        return ["sample", str(run_dir), *sum((["--prompt", p] for p in prompts), []), "--n", str(n),
                "--seed", str(seed), "--out", str(out), "--no-progress"]

    def compare(self, request: Request, body: dict):
        """Draw two runs at the same prompts and seeds: one `dreambooth sample` job per run, the
        same arguments for both (blank prompts: the first run's validation prompts)."""
        names = [str(n) for n in body.get("runs") or []]
        if len(names) != 2 or names[0] == names[1]:
            return JSONResponse({"errors": {"compare": "tick two runs to compare them"}}, status_code=400)
        dirs = [self.run_dir(n) for n in names]
        missing = [n for n, d in zip(names, dirs) if not (d / "final").is_dir()]
        if missing:
            return JSONResponse({"errors": {"compare": f"{' and '.join(missing)} "
                                 f"{'has' if len(missing) == 1 else 'have'} not finished training (no final/): "
                                 "nothing to draw yet"}}, status_code=400)
        if not str(body.get("prompts", "")).strip():
            from dreambooth.config import load_config

            body = {**body, "prompts": "\n".join(load_config(dirs[0] / "config.yaml").eval.prompts)}
        try:
            prompts, n, seed = _sample_request(body, n=1)
        except DreamboothError as e:
            return JSONResponse({"errors": {"compare": str(e)}}, status_code=400)
        compare_id = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000:06d}"
        jobs = []
        for side, (name, run_dir) in enumerate(zip(names, dirs)):
            argv = self._sample_argv(run_dir, prompts, n, seed)
            jobs.append(self.jobs.submit("sample", name, argv, compare=compare_id, side=side,
                                         out=argv[argv.index("--out") + 1], prompts=prompts, n=n, seed=seed))
        return {"id": compare_id, "jobs": jobs}

    def comparison(self, request: Request):
        found = runs.comparison(self.root, self.jobs.all(), request.path_params["id"])
        if found is None:
            return JSONResponse({"errors": {"compare": f"no comparison {request.path_params['id']}"}}, status_code=404)
        return found

    def report(self, request: Request):
        from dreambooth.report import write_report

        name = request.path_params["name"]
        path = write_report(self.run_dir(name))
        return RedirectResponse(f"/files/{name}/{path.name}", status_code=303)

    def stop_job(self, request: Request):
        return self.jobs.stop(request.path_params["id"])

    # ---------------------------------------------------------------- files

    def files(self, request: Request):
        path = self.inside(request.path_params["path"])
        if path.is_file():
            return FileResponse(path)
        if path.is_dir():  # a folder (a diffusers export) as one zip
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
                for p in sorted(path.rglob("*")):
                    if p.is_file():
                        z.write(p, p.relative_to(path.parent).as_posix())
            return Response(buf.getvalue(), media_type="application/zip",
                            headers={"Content-Disposition": f'attachment; filename="{path.name}.zip"'})
        return JSONResponse({"error": f"not found: {request.path_params['path']}"}, status_code=404)


def _sample_request(body: dict, n: int = 2) -> tuple[list[str], int, int]:
    """(prompts, images per prompt, seed) as typed, after `dreambooth sample`'s own checks."""
    from dreambooth.commands.sample import check_flags, read_prompts

    prompts = read_prompts([p for p in str(body.get("prompts", "")).splitlines() if p.strip()], "")
    try:
        n, seed = int(body.get("n") or n), int(body.get("seed") or 0)
    except ValueError as e:
        raise DreamboothError(f"images per prompt and seed are whole numbers: {e}") from None
    check_flags(n=("sample.num_images", n), seed=("sample.seed", seed))
    return prompts, n, seed


def _json_route(method):
    """A route whose JSON body is parsed here; the method runs in the thread pool."""
    async def endpoint(request: Request):
        try:
            body = await request.json() if request.method == "POST" and await request.body() else {}
        except ValueError:
            return JSONResponse({"errors": {"form": "the request body is not JSON"}}, status_code=400)
        return _respond(await run_in_threadpool(method, request, body))
    return endpoint


def _plain_route(method):
    async def endpoint(request: Request):
        return _respond(await run_in_threadpool(method, request))
    return endpoint


def _respond(result):
    return result if isinstance(result, Response) else JSONResponse(result)


def build_app(runs_dir: str | Path, models_dir: str | Path | None = None) -> Starlette:
    app = App(runs_dir, models_dir)

    async def index(request: Request):
        return FileResponse(STATIC / "index.html")

    async def upload(request: Request):
        return _respond(await app.upload(request))

    async def fail(request: Request, exc: DreamboothError):
        return JSONResponse({"errors": {"form": str(exc)}}, status_code=400)

    routes = [
        Route("/", index),
        Route("/api/options", _plain_route(app.options)),
        Route("/api/schema", _plain_route(app.schema)),
        Route("/api/token", _plain_route(app.token)),
        Route("/api/tokens", _plain_route(app.tokens)),
        Route("/api/photos", upload, methods=["POST"]),
        Route("/api/photos/folder", _json_route(app.folder), methods=["POST"]),
        Route("/api/plan", _json_route(app.plan), methods=["POST"]),
        Route("/api/start", _json_route(app.start), methods=["POST"]),
        Route("/api/runs", _plain_route(app.list_runs)),
        Route("/api/runs/{name}", _plain_route(app.run_details)),
        Route("/api/runs/{name}/report", _plain_route(app.report)),
        Route("/api/runs/{name}/{action}", _json_route(app.action), methods=["POST"]),
        Route("/api/compare", _json_route(app.compare), methods=["POST"]),
        Route("/api/compare/{id}", _plain_route(app.comparison)),
        Route("/api/jobs/{id}/stop", _plain_route(app.stop_job), methods=["POST"]),
        Route("/files/{path:path}", _plain_route(app.files)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    web = Starlette(routes=routes, exception_handlers={DreamboothError: fail})
    web.state.app = app
    return web


def serve(host: str, port: int, runs_dir: str | Path, models_dir: str | Path | None = None) -> None:
    """Serve the page until Ctrl-C; a thread starts queued jobs as the running one ends."""
    import uvicorn

    web = build_app(runs_dir, models_dir)
    jobs = web.state.app.jobs

    def tick():
        while True:
            try:
                jobs.tick()
            except Exception as e:  # pragma: no cover - keep the queue alive; say what went wrong
                print(f"queue: {type(e).__name__}: {e}", flush=True)
            time.sleep(1.0)

    threading.Thread(target=tick, daemon=True, name="queue").start()
    local = host in ("127.0.0.1", "localhost", "::1")
    print(f"dreambooth ui: http://{'[' + host + ']' if ':' in host else host}:{port}  (runs in {web.state.app.root})",
          flush=True)
    print("listening on this machine only (pass --host 0.0.0.0 to serve others)" if local else
          f"listening on {host}: anyone who can reach this port can train, sample and read the runs "
          "(there is no login)", flush=True)
    uvicorn.run(web, host=host, port=port, log_level="warning")

