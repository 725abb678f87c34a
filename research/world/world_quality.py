"""DreamBooth quality on the world model, measured with the probes (research/world/results.md).

    OMP_NUM_THREADS=1 python -m research.world.world_quality --out /tmp/world-quality

1. Base model: how often full captions draw the asked shape / color / pattern / background
   (and, with --named-marks N, how often captions that name a mark draw it).
2. For each evaluation subject (held-out combinations; subjects 0 and 6 were used while
   choosing the world preset, so the default is 1-4): train with prior preservation and
   without, then score subject fidelity, prompt fidelity, prior distance (class prompt before vs
   after, same seeds) and diversity. Writes results.json and contact sheets into --out.

One training run moves by up to 36 points of subject fidelity with its seed alone (research/world/results.md):
``--seeds 0,1`` trains each run once per ``train.seed`` and adds their mean ("prior-mean").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="world-quality")
    ap.add_argument("--subjects", default="1,2,3,4", help="indices into held_out_subjects()")
    ap.add_argument("--steps", type=int, default=0, help="training steps (0: the world preset's)")
    ap.add_argument("--class-samples", type=int, default=400)
    ap.add_argument("--distance-at", default="",
                    help="also report the prior distance on the first N paired class samples, for "
                         "each N of this comma-separated list (e.g. 400,800): how the estimate moves "
                         "with the sample count, beside each N's expected unpaired floor")
    ap.add_argument("--floor-samples", type=int, default=0,
                    help="class samples for the measured unpaired floor (0: --class-samples)")
    ap.add_argument("--base-readings", default="",
                    help="a folder of readings-SUBJECT.json written by --save-readings: take the base "
                         "model's class readings (and the other seeds') from there instead of sampling "
                         "them again (the same seeds and model read the same)")
    ap.add_argument("--save-readings", action="store_true",
                    help="write every class sample's probe reading (base, other seeds, each run) to "
                         "OUT/readings-SUBJECT.json, so distances can be recomputed without sampling")
    ap.add_argument("--base-samples", type=int, default=200, help="0: skip the base-model check")
    ap.add_argument("--named-marks", type=int, default=0,
                    help="captions that also name a mark (or none), to count how often the base "
                         "model draws the named mark (0: skip)")
    ap.add_argument("--model", default="world")
    ap.add_argument("--preset", default="world", help="the training preset (world-flux for --model world-flux)")
    ap.add_argument("--guidance", type=float, default=5.0,
                    help="classifier-free guidance of every sample: the base-model check, the class "
                         "samples before and after tuning, the subject prompts (the preset's sample."
                         "guidance is 5)")
    ap.add_argument("--set", action="append", default=[], dest="sets",
                    help="extra training settings for both runs, key=value (repeatable)")
    ap.add_argument("--runs", default="prior,no-prior", help="which of the two runs to train")
    ap.add_argument("--seeds", default="0", help="training seeds (train.seed), comma-separated")
    ap.add_argument("--masks", action="store_true",
                    help="give each photo its object mask (photo-N.mask.png): the instance loss "
                         "then counts only the object's latent cells")
    ap.add_argument("--photos", type=int, default=5,
                    help="photos rendered per subject (Subject.photos; the world renders 3-7, the demo 5)")
    ap.add_argument("--keep", default="", help="keep the runs (photos, run dirs) in this folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    from dreambooth.config import build_config
    from dreambooth.data import contact_sheet
    from dreambooth.models import load_base_model
    from dreambooth.rundir import Run
    from dreambooth.train import train
    from dreambooth.world.probe import HEADS, load_probe
    from dreambooth.world.render import held_out_subjects
    from research.world.metrics import expected_floor, tv_report
    from research.world.score import base_accuracy, class_samples, score_world, vae_ceiling

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    probe, base = load_probe(), load_base_model(args.model)
    started = time.perf_counter()
    results = {"command": "python " + " ".join(sys.argv), "base_accuracy":
               base_accuracy(base, n=args.base_samples, probe=probe, guidance=args.guidance) if args.base_samples else None,
               "guidance": args.guidance, "subjects": {}}
    print("base model:", json.dumps(results["base_accuracy"]))
    if args.named_marks:
        results["named_marks"] = base_accuracy(base, n=args.named_marks, probe=probe, marks=True,
                                                guidance=args.guidance)
        print("named marks:", json.dumps(results["named_marks"]))
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="world-quality-"))
    for index in [int(i) for i in args.subjects.split(",") if i.strip()]:
        subject = held_out_subjects()[index]
        photos = work / subject.name / "photos"
        subject.save_photos(photos, args.photos, seed=0, captions=True, masks=args.masks)
        n, n_floor = args.class_samples, args.floor_samples or args.class_samples
        prefixes = sorted({int(k) for k in args.distance_at.split(",") if k.strip()} | {n})
        reuse = Path(args.base_readings) / f"readings-{subject.name}.json" if args.base_readings else None
        if reuse is not None and reuse.is_file():
            kept = json.loads(reuse.read_text())
            if len(kept["before"]) < n or len(kept["other_seeds"]) < n_floor:
                raise SystemExit(f"{reuse} holds fewer base readings than --class-samples/--floor-samples")
            sampled_at = kept.get("guidance", 5.0)  # files written before --guidance were sampled at 5
            if sampled_at != args.guidance:
                raise SystemExit(f"{reuse} was sampled at guidance {sampled_at}, "
                                 f"not --guidance {args.guidance}; sample the base model again")
            before, other_seeds = kept["before"][:n], kept["other_seeds"][:n_floor]
            before_images = class_samples(base, subject.shape, 6, probe, guidance=args.guidance)[1]  # for the sheet
            print(f"base readings from {reuse}")
        else:
            before, before_images = class_samples(base, subject.shape, n, probe,
                                                  guidance=args.guidance)
            other_seeds, _ = class_samples(base, subject.shape, n_floor, probe, seed=99_000,
                                           guidance=args.guidance)
        row = {"noise_floor_unpaired": round(tv_report(other_seeds, before[:n_floor])["mean"], 4),
               "vae_ceiling": vae_ceiling(base, subject, probe=probe)}
        if len(prefixes) > 1 or n_floor != n:
            row["class_samples"], row["floor_samples"] = n, n_floor
            row["noise_floor_expected"] = {k: round(expected_floor(before, k), 4) for k in prefixes}
        saved = {"before": before, "other_seeds": other_seeds}
        sheets = [(f"base: a photo of a {subject.shape}", im) for im in before_images[:6]]
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        for label, sets in (("prior", []), ("no-prior", ["prior.enabled=false"])):
            if label not in args.runs.split(","):
                continue
            runs = []  # one summary per training seed
            for i, train_seed in enumerate(seeds):
                name = label if train_seed == 0 else f"{label}@seed{train_seed}"  # --seeds 1 alone: "prior@seed1"
                cfg = build_config(args.preset, overrides=[
                    *sets, *([f"train.steps={args.steps}"] if args.steps else []),
                    f"train.seed={train_seed}", *args.sets], extra={
                    "data.images": str(photos), "data.class_noun": subject.shape, "model.path": args.model})
                run_dir = work / subject.name / name.replace("@", "-")
                train(cfg, run_dir, progress=False)
                tuned, cfg, _ = Run(run_dir).load()
                s = score_world(tuned, subject, cfg.data.token, base_readings=before, n_class=n,
                                guidance=args.guidance, probe=probe)
                row[name] = s.summary()
                saved[name] = s.class_readings
                if len(prefixes) > 1:
                    row[name]["prior_distance_at"] = {
                        k: {f: round(v, 4) for f, v in tv_report(s.class_readings[:k], before[:k]).items()}
                        for k in prefixes}
                if i == 0:
                    sheets += [(f"{label}: {p}", im) for p, seed, im in s.images if seed < 2]
                    sheets += [(f"{label}: a photo of a {subject.shape}", im) for im in s.class_images[:6]]
                runs.append(row[name])
                print(subject.name, name, json.dumps(row[name]))
            if len(runs) > 1:
                row[f"{label}-mean"] = {
                    "seeds": seeds,
                    "subject_fidelity": round(sum(r["subject_fidelity"] for r in runs) / len(runs), 4),
                    "prompt_fidelity": round(sum(r["prompt_fidelity"] for r in runs) / len(runs), 4),
                    "prior_distance": round(sum(r["prior_distance"]["mean"] for r in runs) / len(runs), 4)}
                print(subject.name, f"{label}-mean", json.dumps(row[f"{label}-mean"]))
        results["subjects"][subject.name] = row
        if args.save_readings:
            (out / f"readings-{subject.name}.json").write_text(json.dumps(
                {"guidance": args.guidance, **{k: [{f: r[f] for f in HEADS} for r in v]
                                               for k, v in saved.items()}}))
        contact_sheet([im for _, im in sheets], [t for t, _ in sheets], cell=96).save(
            out / f"{subject.name}.png")
    results["seconds"] = round(time.perf_counter() - started)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out / 'results.json'} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
