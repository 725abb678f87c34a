"""Evaluation during a long DreamBooth run on the world model (the curves in docs/evaluation.md).

    OMP_NUM_THREADS=1 python -m research.world.world_eval_curves --out docs/evaluation --steps 1600

Trains subject 0 (the one the world preset was chosen on) with the world preset for longer than the preset does, evaluating every
--every steps with the world probes, then copies the run's curves, best.json, the evaluation
records and the grids of the first, chosen and last evaluations into --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/evaluation")
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--subject", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], dest="sets")
    args = ap.parse_args(argv)

    import torch

    from dreambooth.config import build_config
    from dreambooth.report import loss_figure, metric_figure
    from dreambooth.runlog import read_metrics
    from dreambooth.train import train
    from dreambooth.validation import eval_history
    from dreambooth.world.render import held_out_subjects

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="world-curves-"))
    subject = held_out_subjects()[args.subject]
    subject.save_photos(work / "photos", 5, seed=0, captions=True)
    cfg = build_config("world", overrides=[f"train.steps={args.steps}", f"eval.every={args.every}",
                                           f"train.checkpoint_every={args.every}", *args.sets],
                       extra={"data.images": str(work / "photos"), "data.class_noun": subject.shape})
    result = train(cfg, work / "run", progress=True)
    history = eval_history(work / "run" / "metrics.jsonl")
    best = json.loads((work / "run" / "best.json").read_text())
    rows = read_metrics(work / "run" / "metrics.jsonl")
    (out / "loss.png").write_bytes(loss_figure(rows))
    (out / "metrics.png").write_bytes(metric_figure(history, best["step"]))
    for e in (history[0], next(h for h in history if h["step"] == best["step"]), history[-1]):
        shutil.copy(work / "run" / "samples" / e["name"] / "grid.png", out / f"grid-step-{e['step']}.png")
    (out / "results.json").write_text(json.dumps({
        "subject": subject.name, "steps": args.steps, "every": args.every, "sets": args.sets,
        "best": best, "evaluations": history, "final_step": result.step}, indent=1))
    print(json.dumps(best, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
