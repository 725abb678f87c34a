"""`dreambooth eval` and `dreambooth report`: score a run or one of its checkpoints; write report.html."""

from __future__ import annotations

import json


def open_run(run_dir: str, checkpoint: str, dino: str | None, clip: str | None,
             overrides: list[str] | None, section: str, trust_pickle: bool = False):
    """(run, model, config, checkpoint name), with --dino/--clip and --set applied (bare keys
    belong to ``section``): what `eval` and `sweep` start from."""
    from dreambooth.config import apply_overrides, set_value
    from dreambooth.rundir import Run

    run = Run(run_dir)
    model, cfg, name = run.load(checkpoint, trust_pickle)
    for key, value in (("eval.dino", dino), ("eval.clip", clip)):
        if value is not None:
            set_value(cfg, key, value)
    apply_overrides(cfg, overrides, section)
    return run, model, cfg, name


def eval_run(run_dir: str, checkpoint: str = "final", dino: str | None = None,
             clip: str | None = None, overrides: list[str] | None = None, trust_pickle: bool = False) -> int:
    """Score a run (or one checkpoint of it) with the run's validation prompts and seeds.

    Writes the images and scores.json to RUN_DIR/samples/eval-NAME/ and appends the scores to
    RUN_DIR/evals.jsonl. Metrics: the world probes on the world model; DINO, CLIP-I, CLIP-T,
    PRES and DIV with --dino and --clip (local folders; nothing is downloaded).

    Example: dreambooth eval runs/dog --checkpoint step-400 --dino ~/models/dino-vits16 --clip ~/models/clip-b32

    Args:
        run_dir: a run directory made by `dreambooth train`
        checkpoint: final, best, or step-N (a checkpoint still in RUN_DIR/checkpoints)
        dino: local folder of facebook/dino-vits16 (or "tiny": random, a pipeline check)
        clip: local folder of openai/clip-vit-base-patch32 (or "tiny")
        overrides: eval settings, e.g. --set eval.num_images=4 --set eval.prompts="a {token} {class} in the snow"
        trust_pickle: allow pickle weights (.ckpt/.pt/.bin) in the run's base model for this command only (unpickling runs code; never read from a config file)
    """
    from dreambooth.validation import Evaluator

    run, model, cfg, name = open_run(run_dir, checkpoint, dino, clip, overrides, "eval", trust_pickle)
    record = Evaluator(cfg, run.path)(model, f"eval-{name}")
    record["checkpoint"] = name
    with (run.path / "evals.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    width = max(len(k) for k in record)
    for k, v in record.items():
        if k not in ("kind", "step", "name"):
            print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(f"images and scores: {run.samples / ('eval-' + name)}")
    return 0


def report(run_dir: str) -> int:
    """Write RUN_DIR/report.html: curves, evaluations, image grids, the chosen checkpoint, config.

    Training writes it at the end too; this rebuilds it (e.g. after `dreambooth eval`). It opens
    from disk with no server.

    Args:
        run_dir: a run directory made by `dreambooth train`
    """
    from dreambooth.report import write_report
    from dreambooth.rundir import Run

    print(f"report: {write_report(Run(run_dir).path)}")
    return 0
