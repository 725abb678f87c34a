"""What a run directory holds, as the page shows it: status, progress and ETA, the loss curve,
each evaluation's grid and metrics, the chosen checkpoint, samples, sweep and exports. Only
reads; file paths are given relative to the runs folder (the server serves them from there)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dreambooth.runlog import evaluations, read_metrics

METRICS = ("fidelity", "prompt_fidelity", "dino", "clip_i", "clip_t", "pres", "div",
           "subject_fidelity", "factor_match", "prior_distance")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def list_runs(root: Path, jobs: list[dict]) -> list[str]:
    """Run names: folders with a config.yaml, and those a job is for (not started yet, or failed
    before it wrote one), newest first."""
    names = {p.parent.name for p in root.glob("*/config.yaml")} | {j["run"] for j in jobs if j.get("run")}
    return sorted(names, key=lambda n: max([(root / n).stat().st_mtime if (root / n).exists() else 0]
                                           + [j.get("created", 0) for j in jobs if j.get("run") == n]),
                  reverse=True)


def status(run_dir: Path, jobs: list[dict]) -> str:
    """queued / running / done / stopped (resumable) / failed / new."""
    training = [j for j in jobs if j["kind"] == "train" and j["state"] in ("queued", "running")]
    if training:
        return training[-1]["state"]
    if (run_dir / "final").is_dir():
        return "done"
    trains = [j for j in jobs if j["kind"] == "train"]
    if trains and trains[-1]["state"] == "failed":
        return "failed"
    return "stopped" if (run_dir / "config.yaml").is_file() else "new"


def progress(run_dir: Path) -> dict:
    """Step, steps, loss curve and ETA from metrics.jsonl (seconds per step of the steps logged
    so far, evaluations not counted)."""
    rows = read_metrics(run_dir / "metrics.jsonl", warn=lambda m: None)
    steps_rows = [r for r in rows if r.get("kind") != "eval" and "loss" in r]
    total = None
    if (run_dir / "config.yaml").is_file():
        from dreambooth.config import load_config

        total = load_config(run_dir / "config.yaml").train.steps
    step = steps_rows[-1]["step"] if steps_rows else 0
    eta = None
    if len(steps_rows) >= 2 and total:
        a, b = steps_rows[0], steps_rows[-1]
        if b["step"] > a["step"]:
            eta = (b["seconds"] - a["seconds"]) / (b["step"] - a["step"]) * max(total - step, 0)
    return {"step": step, "steps": total, "eta_s": eta,
            "loss": [[r["step"], r["loss"]] for r in steps_rows],
            "evals": [{"step": r["step"], **{k: r[k] for k in METRICS if isinstance(r.get(k), (int, float))}}
                      for r in evaluations(rows)]}


def grids(run_dir: Path, root: Path) -> list[dict]:
    """Each evaluation's validation grid, by step."""
    found = []
    for grid in sorted(run_dir.glob("samples/step-*/grid.png")):
        step = int(grid.parent.name.split("-")[1])
        scores = grid.parent / "scores.json"
        found.append({"step": step, "grid": _rel(grid, root),
                      "scores": json.loads(scores.read_text()) if scores.is_file() else {}})
    return found


def _best(run_dir: Path) -> dict | None:
    path = run_dir / "best.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def summary(run_dir: Path, root: Path, jobs: list[dict]) -> dict:
    """One row of the runs list."""
    prog = progress(run_dir) if run_dir.is_dir() else {"step": 0, "steps": None, "evals": []}
    shots = grids(run_dir, root) if run_dir.is_dir() else []
    last_eval = prog["evals"][-1] if prog["evals"] else {}
    best = _best(run_dir)
    failed = [j for j in jobs if j["state"] == "failed"]
    return {"name": run_dir.name, "status": status(run_dir, jobs), "step": prog["step"], "steps": prog["steps"],
            "best": best, "metrics": {k: v for k, v in last_eval.items() if k != "step"},
            "thumb": shots[-1]["grid"] if shots else None,
            "error": failed[-1].get("error") if failed and failed[-1] is jobs[-1] else None}


def outputs(run_dir: Path, root: Path) -> dict:
    """Samples drawn, the sweep's table and grid, and exports (each with its files)."""
    samples = [{"name": f.name, "sheet": _rel(f / "contact-sheet.png", root),
                "images": [_rel(p, root) for p in sorted(f.glob("*.png")) if p.name != "contact-sheet.png"]}
               for f in sorted(run_dir.glob("samples/sample-*")) if (f / "contact-sheet.png").is_file()]
    exports = []
    for info in sorted([*run_dir.glob("export/*.export.json"), *run_dir.glob("export/*/export.json")]):
        data = json.loads(info.read_text())
        out = Path(data["output"])
        files = sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else [out]
        exports.append({"format": data["format"], "dtype": data["dtype"], "checkpoint": data["checkpoint"],
                        "verified": data["verified"], "max_pixel_diff": data["max_pixel_diff"],
                        "path": _rel(out, root), "folder": out.is_dir(),
                        "files": [_rel(p, root) for p in files if p.exists()]})
    sweep = run_dir / "sweep"
    return {"samples": samples, "exports": exports,
            "sweep": {"grid": _rel(sweep / "grid.png", root) if (sweep / "grid.png").is_file() else None,
                      "table": (sweep / "results.md").read_text() if (sweep / "results.md").is_file() else None}}


def drawn(folder: Path, root: Path) -> list[dict]:
    """The images a `dreambooth sample` job wrote to ``folder``, each with the prompt, seed and
    settings its PNG text holds (what the command wrote, not what was asked)."""
    from PIL import Image

    images = []
    for p in sorted(folder.glob("p*-seed*.png")):
        with Image.open(p) as im:
            text = dict(im.text)
        images.append({"file": _rel(p, root), "prompt": text.get("prompt"), "seed": text.get("seed"),
                       "token": text.get("token"),
                       "settings": {k: text.get(k) for k in ("steps", "guidance", "scheduler")}})
    return images


def _template(prompt: str, token: str | None) -> str:
    """``prompt`` with the run's identifier read back as {token}: two runs with different
    identifiers drew the same prompt when their templates match."""
    return re.sub(rf"\b{re.escape(token)}\b", "{token}", prompt) if token else prompt


def comparison(root: Path, jobs: list[dict], compare_id: str) -> dict | None:
    """One comparison: a `dreambooth sample` job per run with the same prompts and seed, and what
    each drew (its contact sheet and images), side by side in the order the runs were ticked.
    ``same``: whether both drew the same prompts (the identifier read as {token}) at the same seeds."""
    mine = sorted((j for j in jobs if j.get("compare") == compare_id), key=lambda j: j.get("side", 0))
    if not mine:
        return None
    sides = []
    for job in mine:
        out = Path(job["out"])
        done = job["state"] == "done"
        sheet = out / "contact-sheet.png"
        sides.append({"run": job["run"], "state": job["state"], "error": job.get("error") or None,
                      "sheet": _rel(sheet, root) if done and sheet.is_file() else None,
                      "images": drawn(out, root) if done else []})
    keys = [sorted((_template(i["prompt"], i["token"]), i["seed"]) for i in s["images"]) for s in sides]
    same = all(s["state"] == "done" for s in sides) and len(sides) == 2 and keys[0] == keys[1] and bool(keys[0])
    return {"id": compare_id, "prompts": mine[0].get("prompts", []), "seed": mine[0].get("seed"),
            "n": mine[0].get("n"), "sides": sides, "same": same}


def details(run_dir: Path, root: Path, jobs: list[dict]) -> dict:
    """Everything the run's page shows."""
    info = summary(run_dir, root, jobs)
    if not run_dir.is_dir():
        return {**info, "progress": None, "grids": [], "config": None, "report": None}
    cfg = None
    if (run_dir / "config.yaml").is_file():
        from dreambooth.config import load_config

        c = load_config(run_dir / "config.yaml")
        cfg = {"token": c.data.token, "class_noun": c.data.class_noun, "model": c.model.path,
               "mode": c.train.mode, "resolution": c.data.resolution, "eval_prompts": c.eval.prompts,
               "eval_seed": c.eval.seed, "eval_every": c.eval.every}
    report = run_dir / "report.html"
    return {**info, "progress": progress(run_dir), "grids": grids(run_dir, root), "config": cfg,
            "report": _rel(report, root) if report.is_file() else None, **outputs(run_dir, root)}
