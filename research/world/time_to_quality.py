"""Time to quality on the world model (issue #46 item 4; docs/performance.md, "Time to quality").

    OMP_NUM_THREADS=1 python -m research.world.time_to_quality            # every run not yet recorded
    OMP_NUM_THREADS=1 python -m research.world.time_to_quality --plot-only

For each held-out subject (default 1 and 2, as in research/world/results.md):

1. ``reference``: the diffusers DreamBooth script's recipe on the world model: full fine-tuning,
   lr 5e-6, 800 steps, prior preservation on 200 class images drawn with 50 sampler steps,
   trained toward the noise (``prior.target=noise``), no null space, no identifier training.
   Its last evaluation sets the subject's target: its subject fidelity and factor match.
2. ``preset``: the world preset evaluated every 50 steps with the package's early stop
   (``eval.early_stop=3``), to its 800 steps; its last evaluation sets a second target.
3. The sweep points: variations of the preset that stop once an evaluation (after step 0) meets
   the preset's target: its last subject fidelity and factor match, with prompt fidelity no
   lower than its last minus ``--prompt-margin`` (or stop on ``eval.early_stop``, or at the end).

Time to quality is the wall time of the first evaluation after step 0 that meets a target
(``first_reaching``); the table gives it against both targets for every run.

Every run starts with an empty class-image cache (``DREAMBOOTH_CACHE``), so its wall clock holds
the class images, the null-space reading, the model loads, the evaluations and the checkpoints:
everything between its start and that evaluation. ``results.json`` records per run the
overrides, the class-image seconds, the load average at start and end, and per evaluation the
step, wall seconds, training-step seconds, evaluation seconds so far, subject fidelity, factor
match, prompt fidelity and prior distance. A run already in results.json is skipped, so the
command resumes run by run (a run cut short starts again: its clock would be wrong otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

REFERENCE = ["train.mode=full", "train.lr=5e-6", "train.steps=800", "prior.enabled=true",
             "prior.num_images=200", "prior.steps=50", "prior.target=noise", "prior.null_space=0",
             "train.train_token=false", "eval.every=100"]
OURS = ["eval.every=50", "eval.early_stop=3"]  # the preset's other settings as shipped
# (name, overrides on top of the world preset, the run whose target stops it): the sweep, in order
RUNS = [
    ("reference", REFERENCE, None),
    ("preset", OURS, None),
    ("prior-50x15", [*OURS, "prior.num_images=50", "prior.steps=15"], "preset"),
    ("lr-3e-4", [*OURS, "train.lr=3e-4"], "preset"),
    ("lr-3e-4+prior-50x15", [*OURS, "train.lr=3e-4", "prior.num_images=50", "prior.steps=15"], "preset"),
]
TARGETS = ("reference", "preset")  # the runs whose last evaluation is a target
METRICS = ("subject_fidelity", "factor_match", "prompt_fidelity", "prior_distance")


# ------------------------------------------------------------------ the measure (pure)


def target_of(curve: list[dict], prompt_margin: float) -> dict:
    """What another run must reach: this run's last evaluation's subject fidelity and factor
    match, with prompt fidelity at least its last one minus ``prompt_margin``."""
    last = curve[-1]
    return {"subject_fidelity": last["subject_fidelity"], "factor_match": last["factor_match"],
            "prompt_fidelity": round(last["prompt_fidelity"] - prompt_margin, 6)}


def meets(record: dict, target: dict) -> bool:
    """Whether one evaluation reaches every number of ``target`` (the first two up to 1e-9)."""
    return all(record[k] >= target[k] - 1e-9 for k in ("subject_fidelity", "factor_match", "prompt_fidelity"))


def first_reaching(curve: list[dict], target: dict) -> dict | None:
    """The first evaluation after step 0 that ``meets`` the target, or None."""
    return next((r for r in curve if r["step"] > 0 and meets(r, target)), None)


# ------------------------------------------------------------------ one run


def run_once(sets: list[str], subject, photos: Path, work: Path, target: dict | None) -> dict:
    """Train ``subject`` with the world preset and ``sets`` one evaluation interval at a time,
    stopping at the end, on ``eval.early_stop``, or once an evaluation meets ``target``."""
    import torch

    from dreambooth.config import build_config
    from dreambooth.models import load_configured
    from dreambooth.prior import class_images
    from dreambooth.prompts import fill_prompt
    from dreambooth.train import loop, setup

    cfg = build_config("world", overrides=sets, extra={"data.images": str(photos), "data.class_noun": subject.shape})
    os.environ["DREAMBOOTH_CACHE"] = str(work / "cache")  # empty: class images are drawn in this run
    load_start = os.getloadavg()
    started = time.perf_counter()
    class_seconds = 0.0
    if cfg.prior.enabled:  # timed on its own; setup finds them cached
        class_images(load_configured(cfg), cfg, fill_prompt(cfg.data.class_prompt, cfg.data.token, cfg.data.class_noun),
                     progress=False)
        class_seconds = time.perf_counter() - started
    curve, stopped = [], "end"
    with contextlib.ExitStack() as held:
        s = setup(cfg, work / "run", held, progress=False)
        curve.append(point(s, started))
        while s.step < cfg.train.steps:
            result = loop(s, stop_after=cfg.eval.every, progress=False)
            curve.append(point(s, started))
            if result.final is not None and s.step < cfg.train.steps:
                stopped = "eval.early_stop"
                break
            if target is not None and meets(curve[-1], target):
                stopped = "target"
                break
        del s
    gc.collect()
    torch.set_num_threads(1)
    return {"overrides": sets, "class_image_seconds": round(class_seconds, 1),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "wall_seconds": round(time.perf_counter() - started, 1), "stopped": stopped, "curve": curve}


def point(s, started: float) -> dict:
    """The session's last evaluation with the clocks: wall seconds since the run started,
    training-step seconds, evaluation seconds so far."""
    last = s.history[-1]
    return {"step": last["step"], "wall_seconds": round(time.perf_counter() - started, 1),
            "train_seconds": round(s.seconds, 1),
            "eval_seconds": round(sum(h.get("eval_seconds", 0.0) for h in s.history), 1),
            **{k: last.get(k) for k in METRICS}}


# ------------------------------------------------------------------ the table and the plot


def summary(results: dict, subjects: list[str]) -> list[dict]:
    """One row per run and subject: for each target recorded (``TARGETS``), the first evaluation
    after step 0 that met it (step, wall seconds, wall seconds less the evaluations' own), and the
    run's end. The reference's recipe needs no evaluation: its wall less evaluations is its time."""
    rows = []
    for name, _, _ in RUNS:
        for subject in subjects:
            run = results["runs"].get(f"{name}/{subject}")
            if run is None:
                continue
            reached = {}
            for t in TARGETS:
                owner = results["runs"].get(f"{t}/{subject}")
                if owner is not None and "target" in owner:
                    hit = first_reaching(run["curve"], owner["target"])
                    reached[t] = hit and {"step": hit["step"], "wall": hit["wall_seconds"],
                                          "wall_no_eval": round(hit["wall_seconds"] - hit["eval_seconds"], 1)}
            rows.append({"run": name, "subject": subject, "reached": reached, "last": run["curve"][-1],
                         "class_image_seconds": run["class_image_seconds"], "stopped": run["stopped"],
                         "loadavg": [run["loadavg_start"][0], run["loadavg_end"][0]]})
    return rows


def markdown(rows: list[dict]) -> str:
    """The summary as a markdown table (wall seconds; "—": the target is not met or not recorded)."""
    def cell(hit):
        return "—" if not hit else f"{hit['step']}: {hit['wall']:.0f} ({hit['wall_no_eval']:.0f})"

    head = ("| run | subject | reference's target: step: wall s (without evals) | preset's target: step: wall s "
            "(without evals) | end: step, wall s, stop | last eval: subject / factor / prompt / prior distance "
            "| class images s | load (1 min) start, end |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n")
    lines = []
    for r in rows:
        last = r["last"]
        lines.append(
            f"| {r['run']} | {r['subject']} | {cell(r['reached'].get('reference'))} | "
            f"{cell(r['reached'].get('preset'))} | {last['step']}, {last['wall_seconds']:.0f} "
            f"({last['wall_seconds'] - last['eval_seconds']:.0f}), {r['stopped']} | "
            f"{last['subject_fidelity']:.3f} / {last['factor_match']:.3f} / {last['prompt_fidelity']:.3f} / "
            f"{last['prior_distance']:.3f} | {r['class_image_seconds']:.0f} | {r['loadavg'][0]}, {r['loadavg'][1]} |")
    return head + "\n".join(lines) + "\n"


def plot(results: dict, subjects: list[str], names: list[str], path: Path) -> None:
    """Subject fidelity and factor match against wall seconds, one column per subject, with each
    target's values as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(subjects), figsize=(5.5 * len(subjects), 7), squeeze=False)
    for col, subject in enumerate(subjects):
        for row, metric in enumerate(("subject_fidelity", "factor_match")):
            ax = axes[row][col]
            for name in names:
                run = results["runs"].get(f"{name}/{subject}")
                if run:
                    line, = ax.plot([p["wall_seconds"] for p in run["curve"]], [p[metric] for p in run["curve"]],
                                    marker="o", ms=3, label=name)
                    if "target" in run:
                        ax.axhline(run["target"][metric], ls=":", c=line.get_color(), lw=1,
                                   label=f"{name}'s last")
            ax.set_title(f"{subject}: {metric.replace('_', ' ')}", fontsize=9)
            ax.set_xlabel("wall seconds since the run started (class images included)", fontsize=8)
            ax.set_ylim(-0.03, 1.03)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ the command


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="research/world/time_to_quality")
    ap.add_argument("--subjects", default="1,2", help="indices into held_out_subjects()")
    ap.add_argument("--runs", default=",".join(n for n, _, _ in RUNS), help="which of RUNS (reference first)")
    ap.add_argument("--prompt-margin", type=float, default=0.1)
    ap.add_argument("--set", action="append", default=[], dest="sets", help="for checks: added to every run")
    ap.add_argument("--plot", default="docs/time-to-quality.png")
    ap.add_argument("--plot-runs", default=",".join(n for n, _, _ in RUNS),
                    help="the runs the plot shows (those recorded), comma-separated")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from dreambooth.world.render import held_out_subjects

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / "results.json"
    results = json.loads(file.read_text()) if file.is_file() else {"prompt_margin": args.prompt_margin, "runs": {}}
    subjects = [held_out_subjects()[int(i)] for i in args.subjects.split(",")]
    wanted = args.runs.split(",")
    for name, sets, against in ([] if args.plot_only else [r for r in RUNS if r[0] in wanted]):
        for subject in subjects:
            key = f"{name}/{subject.name}"
            owner = results["runs"].get(f"{against}/{subject.name}") if against else None
            if key in results["runs"] or (against and owner is None):
                print(f"{key}: " + ("recorded, skipped" if key in results["runs"] else f"no {against} run yet, skipped"))
                continue
            work = Path(tempfile.mkdtemp(prefix="ttq-"))
            try:
                subject.save_photos(work / "photos", 5, seed=0, captions=True)
                run = run_once([*sets, *args.sets], subject, work / "photos", work, owner and owner["target"])
            finally:
                shutil.rmtree(work, ignore_errors=True)
            if name in TARGETS:
                run["target"] = target_of(run["curve"], results["prompt_margin"])
            results["runs"][key] = run
            file.write_text(json.dumps(results, indent=1))
            print(key, json.dumps({k: run[k] for k in ("wall_seconds", "stopped")}), json.dumps(run["curve"][-1]))
    names = [s.name for s in subjects]
    rows = summary(results, names)
    (out / "table.md").write_text(markdown(rows))
    print(markdown(rows))
    if args.plot and any(k.startswith("reference/") for k in results["runs"]):
        plot(results, names, args.plot_runs.split(","), Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
