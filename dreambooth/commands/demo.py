"""`dreambooth demo`: the whole pipeline offline on a built-in model, in about a minute on a CPU."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

MARKER = ".dreambooth-demo"
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


def demo(out: str = "dreambooth-demo", model: str = "tiny", steps: int = 0, progress: bool = True) -> int:
    """Run DreamBooth end to end, offline: paint photos of a subject, train with prior
    preservation, then draw the subject in new prompts. Prints where everything went.

    Args:
        out: folder for the demo (photos/, run/); a previous demo there is replaced
        model: base model: tiny (built in-process) or a local diffusers folder
        steps: training steps (0: the preset's)
        progress: show progress bars
    """
    from dreambooth.checkpoint import load_run_model
    from dreambooth.config import build_config
    from dreambooth.data import contact_sheet
    from dreambooth.errors import DreamboothError
    from dreambooth.sample import generate
    from dreambooth.train import train

    root = Path(out)
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise DreamboothError(f"{root} exists and is not a demo folder; pass --out NEW_FOLDER")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / MARKER).write_text("made by `dreambooth demo`; safe to delete\n")
    started = time.perf_counter()

    photos = paint_subject(root / "photos")
    print(f"1/3 painted {len(photos)} photos of the subject in {root / 'photos'}")
    overrides = [f"train.steps={steps}"] if steps else []
    cfg = build_config("tiny", overrides=overrides, extra={
        "data.images": str(root / "photos"), "data.class_noun": "toy", "model.path": model})
    run_dir = root / "run"
    result = train(cfg, run_dir, progress=progress)
    print(f"2/3 trained {result.step} steps with prior preservation (loss {result.loss:.4f})")

    tuned, cfg = load_run_model(run_dir)
    prompts = [p.format(token=cfg.data.token, **{"class": cfg.data.class_noun}) for p in PROMPTS]
    seeds = list(range(cfg.sample.num_images))
    pairs = [(p, s) for p in prompts for s in seeds]
    images = generate(tuned, [p for p, _ in pairs], [s for _, s in pairs], steps=cfg.sample.steps,
                      guidance=cfg.sample.guidance, resolution=cfg.data.resolution,
                      scheduler=cfg.sample.scheduler)
    samples = run_dir / "samples" / "final"
    samples.mkdir(parents=True, exist_ok=True)
    for n, (img, (prompt, seed)) in enumerate(zip(images, pairs)):
        img.save(samples / f"{n:02d}-seed{seed}.png")
    sheet = samples / "contact-sheet.png"
    contact_sheet(images, [f"{p} (seed {s})" for p, s in pairs]).save(sheet)
    print(f"3/3 sampled {len(images)} images for {len(prompts)} prompts")
    print(f"\nidentifier: '{cfg.data.token}'   class: '{cfg.data.class_noun}'")
    print(f"run directory: {run_dir}  (config.yaml, metrics.jsonl, checkpoints/, final/)")
    print(f"samples:       {samples}  contact sheet: {sheet}")
    print(f"took {time.perf_counter() - started:.0f} s. The tiny base model is random, so samples "
          "are noise; point --model at a real Stable Diffusion folder for real pictures.")
    return 0
