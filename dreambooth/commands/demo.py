"""`dreambooth demo`: the whole pipeline offline on a built-in model, on a CPU (4-6 minutes on the
2-core machines of its first measurements, one with AVX-512; 15 on a 2-core AVX2 one: docs/world.md)."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

MARKER = ".dreambooth-demo"
DEMO_SUBJECT = 7  # index into dreambooth.world.render.held_out_subjects()
PROMPTS = ["a photo of {token} {class}", "a photo of {token} {class} on the beach",
           "a photo of {token} {class} in the snow", "a photo of a {class}"]


def paint_subject(folder: Path, count: int = 5, size: int = 64, seed: int = 0) -> list[Path]:
    """Paint ``count`` 'photos' of one synthetic subject (a red block with a yellow dot) in
    varied positions, sizes and backgrounds."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):  # each photo gets its own background hue, so no two look alike
        bg = tuple(int(60 + 170 * ((i / count + c / 3) % 1)) for c in range(3))
        img = Image.new("RGB", (size * 2, size * 2), bg)
        draw = ImageDraw.Draw(img)
        s = rng.randrange(size // 2, size)
        x, y = rng.randrange(8, size * 2 - s - 8), rng.randrange(8, size * 2 - s - 8)
        draw.rounded_rectangle([x, y, x + s, y + s], radius=s // 5, fill=(200, 30, 40))
        draw.ellipse([x + s // 3, y + s // 3, x + 2 * s // 3, y + 2 * s // 3], fill=(250, 220, 40))
        paths.append(folder / f"photo-{i}.png")
        img.save(paths[-1])
    return paths


def demo(out: str = "dreambooth-demo", model: str = "auto", steps: int = 0, quick: bool = False,
         progress: bool = True) -> int:
    """Run DreamBooth end to end, offline, and print where the run and its images are.

    Photos of a subject, training with prior preservation, then the subject drawn in new prompts.

    On the shipped world model (the default when present) the subject is a rendered object the
    base model never saw, and the probes score the result; on `tiny` (a random model) the photos
    are painted and the samples are noise: it shows the pipeline, not quality.

    Args:
        out: folder for the demo (photos/, run/); a previous demo there is replaced
        model: auto (world if shipped, else tiny), world, tiny, or a local diffusers folder
        steps: training steps (0: the preset's)
        quick: fewer class images, samples and solver steps (a smoke test, e.g. in CI)
        progress: show progress bars
    """
    from dreambooth.checkpoint import load_run_model
    from dreambooth.config import build_config
    from dreambooth.errors import DreamboothError
    from dreambooth.models import WORLD_MODEL
    from dreambooth.train import train

    if model == "auto":
        model = "world" if (WORLD_MODEL / "model_index.json").is_file() else "tiny"
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

    if model == "world":
        from dreambooth.world.render import held_out_subjects

        # The white striped kite with a band: a combination the base model never saw, whose
        # mark survives the VAE round trip (VAE ceiling 1.0, docs/world.md). Each photo comes with
        # a mask of the kite (photo-N.mask.png), which training uses as its loss mask.
        subject = held_out_subjects()[DEMO_SUBJECT]
        subject.save_photos(root / "photos", 5, seed=0, captions=True, masks=True)
        noun, preset = subject.shape, "world"
        print(f"1/3 rendered 5 photos of a {subject.color} {subject.pattern} {subject.shape} "
              f"with a {subject.mark} mark (a combination the base model never saw), each captioned "
              f"with its background and a mask of the {subject.shape}, in {root / 'photos'}")
    else:
        photos = paint_subject(root / "photos")
        noun, preset, subject = "toy", "tiny", None
        print(f"1/3 painted {len(photos)} photos of the subject in {root / 'photos'}")
    cfg = build_config(preset, overrides=overrides, extra={
        "data.images": str(root / "photos"), "data.class_noun": noun, "model.path": model})
    run_dir = root / "run"
    result = train(cfg, run_dir, progress=progress)
    print(f"2/3 trained {result.step} steps with prior preservation (loss {result.loss:.4f})")
    samples = run_dir / "samples" / "final"
    samples.mkdir(parents=True, exist_ok=True)
    sheet = samples / "contact-sheet.png"
    tuned, cfg = load_run_model(run_dir)  # from the run directory, as any later stage would
    if subject is not None:
        report = _world_samples(tuned, cfg, run_dir, subject, samples, sheet,
                                n_class=16 if quick else 100, progress=progress)
    else:
        report = _plain_samples(tuned, cfg, samples, sheet)
    print(f"3/3 {report}")
    print(f"\nidentifier: '{cfg.data.token}'   class: '{noun}'")
    print(f"run directory: {run_dir}  (config.yaml, metrics.jsonl, checkpoints/, final/)")
    print(f"samples:       {samples}  contact sheet: {sheet}")
    print(f"took {time.perf_counter() - started:.0f} s.")
    if subject is None:
        print("The tiny base model is random, so its samples are noise; use --model world (after "
              "`dreambooth world pretrain --ship`) or a real Stable Diffusion folder.")
    return 0


def _save_samples(images: list, labels: list[str], seeds: list[int], samples: Path, sheet: Path,
                  cell: int = 128) -> None:
    """Each image as NN-seedS.png in ``samples``, and a captioned contact sheet."""
    from dreambooth.data import contact_sheet

    for n, (img, seed) in enumerate(zip(images, seeds)):
        img.save(samples / f"{n:02d}-seed{seed}.png")
    contact_sheet(images, labels, cell=cell).save(sheet)


def _plain_samples(tuned, cfg, samples: Path, sheet: Path) -> str:
    from dreambooth.prompts import fill_prompt
    from dreambooth.sample import generate

    prompts = [fill_prompt(p, cfg.data.token, cfg.data.class_noun) for p in PROMPTS]
    pairs = [(p, s) for p in prompts for s in range(cfg.sample.num_images)]
    images = generate(tuned, [p for p, _ in pairs], [s for _, s in pairs], steps=cfg.sample.steps,
                      guidance=cfg.sample.guidance, resolution=cfg.data.resolution,
                      scheduler=cfg.sample.scheduler, subject_guidance=cfg.sample.subject_guidance,
                      subject_below=cfg.sample.subject_guidance_below, token=cfg.data.token,
                      class_noun=cfg.data.class_noun)
    _save_samples(images, [f"{p} (seed {s})" for p, s in pairs], [s for _, s in pairs], samples, sheet)
    return f"sampled {len(images)} images for {len(prompts)} prompts"


def _world_samples(tuned, cfg, run_dir: Path, subject, samples: Path, sheet: Path, n_class: int,
                   progress: bool = True) -> str:
    import json

    from tqdm.auto import tqdm

    from dreambooth.models import load_base_model
    from dreambooth.world.score import score_world, subject_prompts

    # the subject prompts, then the class prompt before (base model) and after tuning
    total = len(subject_prompts(cfg.data.token, subject.shape)) * cfg.sample.num_images + 2 * n_class
    with tqdm(total=total, desc="sampling and scoring", unit="img", disable=not progress) as bar:
        scores = score_world(tuned, subject, cfg.data.token, base=load_base_model("world"),
                             seeds=cfg.sample.num_images, steps=cfg.sample.steps, n_class=n_class,
                             guidance=cfg.sample.guidance, subject_guidance=cfg.sample.subject_guidance,
                             subject_below=cfg.sample.subject_guidance_below, progress=bar.update)
    _save_samples([im for _, _, im in scores.images], [f"{p} (seed {s})" for p, s, _ in scores.images],
                  [s for _, s, _ in scores.images], samples, sheet, cell=96)
    s = scores.summary()
    (run_dir / "world-scores.json").write_text(json.dumps(s, indent=1))
    return (f"sampled {len(scores.images)} images; probe scores: subject fidelity "
            f"{s['subject_fidelity']:.0%}, prompt fidelity {s['prompt_fidelity']:.0%}, prior "
            f"distance {s['prior_distance']['mean']:.3f} (0 = unchanged), written to "
            f"{run_dir / 'world-scores.json'}")
