"""The DreamBench protocol (Ruiz et al. 2022, section 4.1) over a dataset folder.

For each subject: train DreamBooth on its photos, then score it with the evaluator
(``dreambooth.validation``, the paper's metric set): every prompt of its kind (object or live)
with 4 seeds, the class prompt for PRES, DINO / CLIP-I / CLIP-T / PRES / DIV against the
subject's photos. Per-subject results are written as they finish (OUT/subjects/NAME/scores.json),
so a killed bench continues where it stopped; a subject whose training was cut short resumes
from its last checkpoint.

Dataset layout (as ../shared/dreambench): subjects.csv with columns subject,class,kind;
prompts.json {"object": [...], "live": [...]} with {token} and {class} placeholders; one photo
folder per subject.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from dreambooth.errors import InputError

METRICS = ("dino", "clip_i", "clip_t", "pres", "div")
HEADERS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "pres": "PRES ↓",
           "div": "DIV (1−DINO)"}


def read_dataset(root: Path) -> tuple[list[dict], dict[str, list[str]]]:
    """(subjects, prompts by kind), or an InputError that says what is missing."""
    csv_path, prompts_path = root / "subjects.csv", root / "prompts.json"
    for path in (csv_path, prompts_path):
        if not path.is_file():
            raise InputError(f"{root} is not a DreamBench-style dataset: {path.name} is missing "
                             f"(expected subjects.csv, prompts.json and one folder per subject)")
    with csv_path.open(newline="") as f:
        subjects = list(csv.DictReader(f))
    missing = {"subject", "class", "kind"} - set(subjects[0] if subjects else {})
    if missing:
        raise InputError(f"{csv_path} needs the columns subject, class, kind; missing {sorted(missing)}")
    prompts = json.loads(prompts_path.read_text())
    for s in subjects:
        if s["kind"] not in prompts:
            raise InputError(f"{csv_path}: subject {s['subject']} has kind '{s['kind']}', but "
                             f"{prompts_path.name} only has {sorted(prompts)}")
        if not (root / s["subject"]).is_dir():
            raise InputError(f"{root / s['subject']}: the photo folder of subject {s['subject']} is missing")
    return subjects, prompts


def markdown_table(rows: dict[str, dict]) -> str:
    """Rows name -> scores as a markdown table (the paper's Table 1 columns)."""
    lines = ["| subject | " + " | ".join(HEADERS[m] for m in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for name, scores in rows.items():
        cells = [f"{scores[m]:.3f}" if isinstance(scores.get(m), float) else "–" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def average(per_subject: dict[str, dict]) -> dict[str, float]:
    out = {}
    for m in METRICS:
        values = [s[m] for s in per_subject.values() if isinstance(s.get(m), float)]
        if values:
            out[m] = sum(values) / len(values)
    return out


def bench_subject(run_dir: Path, photos: Path, noun: str, prompts: list[str], *, model: str,
                  preset: str, dino: str, clip: str, encoders=None, images: int = 4,
                  overrides: list[str] | None = None, progress: bool = True) -> dict:
    """Train one subject (or resume or reuse its run) and score it: the paper's metrics, with
    ``images`` seeds per prompt and as many class-prompt images, at the run's sample settings.
    ``encoders``: DINO and CLIP already loaded from ``dino`` and ``clip``."""
    from dreambooth.config import build_config
    from dreambooth.rundir import Run
    from dreambooth.train import train
    from dreambooth.validation import Evaluator

    if (run_dir / "config.yaml").is_file() and not (run_dir / "final" / "config.yaml").is_file():
        train(None, run_dir, resume=True, progress=progress)
    elif not (run_dir / "config.yaml").is_file():
        train(build_config(preset, overrides=overrides, extra={
            "data.images": str(photos), "data.class_noun": noun, "model.path": model}), run_dir,
            progress=progress)
    tuned, cfg, _ = Run(run_dir).load("final")
    e, s = cfg.eval, cfg.sample
    e.prompts, e.num_images, e.seed, e.class_images, e.metrics = prompts, images, 0, images, "clip"
    e.steps, e.guidance, e.scheduler, e.dino, e.clip = s.steps, s.guidance, s.scheduler, dino, clip
    record = Evaluator(cfg, run_dir, encoders=encoders)(tuned, "bench")
    return {**{m: record.get(m) for m in METRICS}, "prompts": len(prompts), "images_per_prompt": images,
            "token": cfg.data.token}


def run_bench(dataset: Path, out: Path, *, model: str, preset: str, dino: str, clip: str,
              subjects: int | None = None, prompts: int | None = None, images: int = 4,
              overrides: list[str] | None = None, progress: bool = True, log=print) -> dict:
    """The protocol over the first ``subjects`` subjects and ``prompts`` prompts of each kind (None:
    all); OUT/table.md and OUT/results.json at the end. Returns what results.json holds."""
    from dreambooth.evaluate import Encoders
    from dreambooth.rundir import refuse_inside_photos

    refuse_inside_photos(out, dataset, "--out")
    all_subjects, all_prompts = read_dataset(dataset)
    chosen = all_subjects[:subjects]
    encoders = Encoders.load(dino, clip)  # fail before any training when missing
    per_subject: dict[str, dict] = {}
    for n, subject in enumerate(chosen, 1):
        name, noun = subject["subject"], subject["class"]
        scores_file = out / "subjects" / name / "scores.json"
        if scores_file.is_file():
            per_subject[name] = json.loads(scores_file.read_text())
            log(f"[{n}/{len(chosen)}] {name}: done earlier, reusing {scores_file}")
            continue
        log(f"[{n}/{len(chosen)}] {name} ({noun})")
        per_subject[name] = bench_subject(
            scores_file.parent / "run", dataset / name, noun, all_prompts[subject["kind"]][:prompts],
            model=model, preset=preset, dino=dino, clip=clip, encoders=encoders, images=images,
            overrides=overrides, progress=progress)
        scores_file.write_text(json.dumps(per_subject[name], indent=1))
    results = {"dataset": str(dataset), "model": model, "preset": preset, "dino": dino, "clip": clip,
               "subjects": per_subject, "mean": average(per_subject)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown_table({**per_subject, "**mean**": results["mean"]}) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results
