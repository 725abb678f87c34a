"""`dreambooth demo`: the whole pipeline offline on a built-in model, on a CPU (4-6 minutes on the
2-core machines of its first measurements, one with AVX-512; 15 on a 2-core AVX2 one: docs/world.md)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

MARKER = ".dreambooth-demo"
DEMO_SUBJECT = 7  # index into dreambooth.world.render.held_out_subjects()
FAMILIES = {"sd1": ("world", "tiny"), "flux1": ("world-flux", "tiny-flux1")}  # (world model, fallback)
PROMPTS = ["a photo of {token} {class}", "a photo of {token} {class} on the beach",
           "a photo of {token} {class} in the snow", "a photo of a {class}"]


def demo(out: str = "dreambooth-demo", model: str = "auto", family: str = "sd1", steps: int | None = None,
         quick: bool = False, progress: bool = True) -> int:
    """Run DreamBooth end to end, offline, and print where the run and its images are.

    Photos of a subject, training with prior preservation, then the subject drawn in new prompts.

    The subject is a rendered object of the world (docs/world.md) that the shipped world model
    never saw; on that model (the default when present) the probes score the result. On `tiny`
    (a random model) the samples are noise: it shows the pipeline, not quality.

    Args:
        out: folder for the demo (photos/, run/); a previous demo there is replaced
        model: auto (the family's world model if shipped, else its tiny one), world, world-flux,
            tiny, tiny-flux1, or a local diffusers folder
        family: sd1 (the UNet world model) or flux1 (the flow-matching world model)
        steps: training steps (default: the preset's)
        quick: fewer class images, samples and solver steps (a smoke test, e.g. in CI)
        progress: show progress bars
    """
    from dreambooth.config import build_config
    from dreambooth.errors import DreamboothError
    from dreambooth.models import WORLD_MODELS
    from dreambooth.rundir import Run
    from dreambooth.train import train
    from dreambooth.world.render import held_out_subjects

    if family not in FAMILIES:
        raise DreamboothError(f"--family {family}: choose one of {', '.join(FAMILIES)}")
    world, tiny = FAMILIES[family]
    if model == "auto":
        model = world if (WORLD_MODELS[world] / "model_index.json").is_file() else tiny
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise DreamboothError(f"--out {root} is a file, not a folder; pass --out NEW_FOLDER")
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise DreamboothError(f"{root} exists and is not a demo folder; pass --out NEW_FOLDER")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / MARKER).write_text("made by `dreambooth demo`; safe to delete\n")
    started = time.perf_counter()
    overrides = [f"train.steps={steps}"] if steps else []
    if quick:
        overrides += ["prior.num_images=8", "prior.steps=8", "sample.num_images=1", "sample.steps=8"]

    # The white striped kite with a band: a combination the world model never saw, whose mark
    # survives the VAE round trip (VAE ceiling 1.0, docs/world.md). Each photo comes with its
    # caption (the background) and a mask of the kite, which training uses as its loss mask.
    subject = held_out_subjects()[DEMO_SUBJECT]
    subject.save_photos(root / "photos", 5, seed=0, captions=True, masks=True)
    print(f"1/3 rendered 5 photos of a {subject.color} {subject.pattern} {subject.shape} with a "
          f"{subject.mark} mark (a combination the world model never saw), each captioned with its "
          f"background and a mask of the {subject.shape}, in {root / 'photos'}")
    preset = {"world": "world", "world-flux": "world-flux", "tiny-flux1": "tiny-flux1"}.get(model, "tiny")
    cfg = build_config(preset, overrides=overrides, extra={
        "data.images": str(root / "photos"), "data.class_noun": subject.shape, "model.path": model})
    result = train(cfg, root / "run", progress=progress)
    print(f"2/3 trained {result.step} steps with prior preservation (loss {result.loss:.4f})")
    run = Run(root / "run")
    tuned, cfg, _ = run.load("final")  # from the run directory, as any later stage would
    samples = run.samples / "final"
    if model in WORLD_MODELS:
        report = _world_scores(run, tuned, cfg, n_class=16 if quick else 100, progress=progress)
    else:
        report = _samples(tuned, cfg, samples)
    print(f"3/3 {report}")
    print(f"\nidentifier: '{cfg.data.token}'   class: '{subject.shape}'")
    print(f"run directory: {run.path}  (config.yaml, metrics.jsonl, checkpoints/, final/)")
    print(f"samples:       {samples}  contact sheet: {samples / 'grid.png'}")
    print(f"took {time.perf_counter() - started:.0f} s.")
    if model not in WORLD_MODELS:
        print("The tiny base model is random, so its samples are noise; use --model world (after "
              "`dreambooth world pretrain --ship`) or a real Stable Diffusion folder.")
    return 0


def _samples(tuned, cfg, folder: Path) -> str:
    from dreambooth.prompts import fill_prompt
    from dreambooth.sample import draw

    s = cfg.sample
    prompts = [fill_prompt(p, cfg.data.token, cfg.data.class_noun) for p in PROMPTS]
    images = draw(tuned, folder, [(p, seed) for p in prompts for seed in range(s.num_images)],
                  steps=s.steps, guidance=s.guidance, scheduler=s.scheduler, resolution=cfg.data.resolution)
    return f"sampled {len(images)} images for {len(prompts)} prompts"


def _world_scores(run, tuned, cfg, n_class: int, progress: bool) -> str:
    """The subject in the plain prompt and on every background, and the class prompt before and
    after, scored by the evaluator's world probes (``dreambooth.validation``)."""
    import json

    from tqdm.auto import tqdm

    from dreambooth.validation import Evaluator
    from dreambooth.world.render import BACKGROUND_PHRASES

    e, s = cfg.eval, cfg.sample
    e.prompts = ["a photo of {token} {class}"] + [f"a photo of {{token}} {{class}} {phrase}"
                                                  for phrase in BACKGROUND_PHRASES.values()]
    e.num_images, e.seed, e.class_images, e.metrics = s.num_images, 0, n_class, "world"
    e.steps, e.guidance, e.scheduler = s.steps, s.guidance, s.scheduler
    total = len(e.prompts) * e.num_images + 2 * n_class  # the class prompt before and after tuning
    with tqdm(total=total, desc="sampling and scoring", unit="img", disable=not progress) as bar:
        scores = Evaluator(cfg, run.path)(tuned, "final", progress=bar.update)
    scores = {k: v for k, v in scores.items() if k not in ("step", "kind", "name")}
    (run.path / "world-scores.json").write_text(json.dumps(scores, indent=1))
    return (f"sampled {len(e.prompts) * e.num_images} images; probe scores: subject fidelity "
            f"{scores['subject_fidelity']:.0%}, prompt fidelity {scores['prompt_fidelity']:.0%}, prior "
            f"distance {scores['prior_distance']:.3f} (0 = unchanged), written to "
            f"{run.path / 'world-scores.json'}")
