"""`dreambooth bench`: the DreamBench protocol (Ruiz et al. 2022, section 4.1) over a dataset folder.

For each subject: train DreamBooth on its photos, generate every prompt of its kind (object or
live) with 4 seeds, generate the class prompt for PRES, score DINO / CLIP-I / CLIP-T / PRES /
DIV against the subject's photos. Per-subject results are written as they finish
(OUT/subjects/NAME/scores.json), so a killed bench continues where it stopped; a subject whose
training was cut short resumes from its last checkpoint.

Dataset layout (as ../shared/dreambench): subjects.csv with columns subject,class,kind;
prompts.json {"object": [...], "live": [...]} with {token} and {class} placeholders; one photo
folder per subject.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

METRICS = ("dino", "clip_i", "clip_t", "pres", "div")
HEADERS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "pres": "PRES ↓",
           "div": "DIV (1−DINO)"}


def read_dataset(root: Path) -> tuple[list[dict], dict[str, list[str]]]:
    """(subjects, prompts by kind), or an InputError that says what is missing."""
    from dreambooth.errors import InputError

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


def bench(dataset: str, model: str = "tiny", preset: str = "", subjects: int = 0,
          prompts: int = 0, images: int = 4, out: str = "dreambooth-bench", dino: str = "",
          clip: str = "", overrides: list[str] | None = None, progress: bool = True) -> int:
    """Run the DreamBench protocol: train each subject, 25 prompts x 4 images, the paper's metrics.

    Prints and writes (OUT/table.md, OUT/results.json) a table like the paper's Table 1: DINO,
    CLIP-I, CLIP-T, PRES, DIV per subject and their mean. Resumable: run the same command again.

    Example: dreambooth bench ../shared/dreambench --model ~/models/sd15 --preset sd15-lora --dino DIR --clip DIR

    Args:
        dataset: folder with subjects.csv, prompts.json and one photo folder per subject
        model: base model (a local diffusers folder, or tiny)
        preset: training preset (default: tiny for --model tiny, else sd15-lora)
        subjects: only the first N subjects of subjects.csv (0: all)
        prompts: only the first N prompts of each kind (0: all 25)
        images: images per prompt (the protocol uses 4)
        out: bench folder (one run per subject, scores, tables)
        dino: local folder of facebook/dino-vits16 (tiny: random, allowed with --model tiny)
        clip: local folder of openai/clip-vit-base-patch32 (tiny: random)
        overrides: training settings, key=value (repeatable)
        progress: show progress bars
    """
    from dreambooth.config import build_config
    from dreambooth.data import read_photos
    from dreambooth.evaluate import load_clip, load_dino, score_images
    from dreambooth.prompts import fill_prompt
    from dreambooth.sample import generate
    from dreambooth.train import train

    from dreambooth.rundir import refuse_inside_photos

    root, out_dir = Path(dataset), Path(out)
    refuse_inside_photos(out_dir, root, "--out")
    all_subjects, all_prompts = read_dataset(root)
    chosen = all_subjects[:subjects] if subjects else all_subjects
    if model == "tiny" and not (dino or clip):
        dino = clip = "tiny"
        print("note: --model tiny scores with random tiny DINO/CLIP encoders: a check of the "
              "pipeline, not a measurement")
    encoders = load_dino(dino), load_clip(clip)  # fail before any training when missing
    preset = preset or ("tiny" if model == "tiny" else "sd15-lora")
    per_subject: dict[str, dict] = {}
    for n, subject in enumerate(chosen, 1):
        name, noun = subject["subject"], subject["class"]
        folder = out_dir / "subjects" / name
        scores_file = folder / "scores.json"
        if scores_file.is_file():
            per_subject[name] = json.loads(scores_file.read_text())
            print(f"[{n}/{len(chosen)}] {name}: done earlier, reusing {scores_file}")
            continue
        print(f"[{n}/{len(chosen)}] {name} ({noun})")
        run_dir = folder / "run"
        if (run_dir / "final" / "config.yaml").is_file():
            pass
        elif (run_dir / "config.yaml").is_file():
            train(None, run_dir, resume=True, progress=progress)
        else:
            cfg = build_config(preset, overrides=overrides, extra={
                "data.images": str(root / name), "data.class_noun": noun, "model.path": model})
            train(cfg, run_dir, progress=progress)
        from dreambooth.checkpoint import load_run_model

        tuned, cfg = load_run_model(run_dir)
        kind_prompts = all_prompts[subject["kind"]][:prompts or None]
        texts = [fill_prompt(p, cfg.data.token, noun) for p in kind_prompts]
        pairs = [(t, s) for t in texts for s in range(images)]
        s = cfg.sample
        gen = generate(tuned, [t for t, _ in pairs], [sd for _, sd in pairs], steps=s.steps,
                       guidance=s.guidance, scheduler=s.scheduler, resolution=cfg.data.resolution)
        class_prompt = fill_prompt(cfg.data.class_prompt, cfg.data.token, noun)
        class_gen = generate(tuned, [class_prompt] * images, list(range(images)), steps=s.steps,
                             guidance=s.guidance, scheduler=s.scheduler,
                             resolution=cfg.data.resolution)
        generated: dict[str, list] = {t: [] for t in texts}
        image_dir = folder / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
        for i, ((t, sd), im) in enumerate(zip(pairs, gen)):
            generated[t].append(im)
            im.save(image_dir / f"p{texts.index(t):02d}-seed{sd}.png")
        real = [p.image for p in read_photos(str(root / name), cfg.data.resolution).photos]
        result = score_images(generated, real, cfg.data.token, *encoders, class_generated=class_gen)
        result.update(prompts=len(texts), images_per_prompt=images, token=cfg.data.token)
        scores_file.write_text(json.dumps(result, indent=1))
        per_subject[name] = result

    rows = {**per_subject, "**mean**": average(per_subject)}
    table = markdown_table(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps({
        "dataset": str(root), "model": model, "preset": preset, "dino": dino, "clip": clip,
        "subjects": per_subject, "mean": average(per_subject)}, indent=1))
    print(table)
    print(f"\ntable: {out_dir / 'table.md'}   results: {out_dir / 'results.json'}")
    return 0
