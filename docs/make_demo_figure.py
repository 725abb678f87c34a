"""Make docs/images/demo-prior.png, the README's picture of what `dreambooth demo` does.

It uses the demo's subject and settings (the shipped world model, its preset and five rendered,
captioned, masked photos of a held-out kite) and trains twice: once with prior preservation (the
preset) and once without it (``prior.enabled=false``). Then it draws the same prompts and seeds
from the base model and from both runs, one column each:

    OMP_NUM_THREADS=1 python docs/make_demo_figure.py            # about 20 minutes on 2 CPU cores

A subject prompt shows whether the subject was learned. The class prompt ("a photo of a kite")
shows whether the model still draws other kites (prior preservation) or only the subject
(language drift).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images" / "demo-prior.png"
SUBJECT = 7  # the demo's subject: dreambooth.commands.demo.DEMO_SUBJECT
PROMPTS = ["a photo of {token} {class} on the beach", "a photo of {token} {class} in the snow",
           "a photo of a {class}", "a photo of a {class}"]
SEEDS = [0, 1, 2, 3]
CELL = 128


def column(model, token: str, noun: str, cfg) -> list[Image.Image]:
    from dreambooth.prompts import fill_prompt
    from dreambooth.sample import generate

    prompts = [fill_prompt(p, token, noun) for p in PROMPTS]
    return generate(model, prompts, SEEDS, steps=cfg.sample.steps, guidance=cfg.sample.guidance,
                    resolution=cfg.data.resolution, scheduler=cfg.sample.scheduler)


def grid(columns: dict[str, list[Image.Image]], rows: list[str]) -> Image.Image:
    label_w, head_h, pad = 300, 24, 4
    sheet = Image.new("RGB", (label_w + len(columns) * (CELL + pad), head_h + len(rows) * (CELL + pad)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for c, (title, images) in enumerate(columns.items()):
        x = label_w + c * (CELL + pad)
        draw.text((x + 4, 6), title, fill="black", font=font)
        for r, image in enumerate(images):
            sheet.paste(image.resize((CELL, CELL), Image.Resampling.NEAREST), (x, head_h + r * (CELL + pad)))
    for r, text in enumerate(rows):
        draw.text((6, head_h + r * (CELL + pad) + CELL // 2 - 6), text, fill="black", font=font)
    return sheet


def main() -> int:
    from dreambooth.checkpoint import load_run_model
    from dreambooth.config import build_config
    from dreambooth.models import load_base_model
    from dreambooth.world.render import held_out_subjects

    subject = held_out_subjects()[SUBJECT]
    with tempfile.TemporaryDirectory(prefix="demo-figure-") as tmp:
        root = Path(tmp)
        subject.save_photos(root / "photos", 5, seed=0, captions=True, masks=True)
        runs = {"with prior": [], "without prior": ["prior.enabled=false", "prior.null_space=0"]}
        columns, cfg = {}, None
        from dreambooth.train import train

        for name, sets in runs.items():
            cfg = build_config("world", overrides=sets, extra={
                "data.images": str(root / "photos"), "data.class_noun": subject.shape, "data.token": "waj"})
            train(cfg, root / name.replace(" ", "-"), progress=True)
        base = load_base_model("world")
        columns["base model"] = column(base, "waj", subject.shape, cfg)
        for name in runs:
            tuned, run_cfg = load_run_model(root / name.replace(" ", "-"))
            columns[name] = column(tuned, "waj", subject.shape, run_cfg)
        photo = Image.open(root / "photos" / "photo-0.png").convert("RGB")
        columns = {"a training photo": [photo] + [Image.new("RGB", photo.size, "white")] * 3, **columns}
    labels = [f"{p.format(token='waj', **{'class': subject.shape})} (seed {s})" for p, s in zip(PROMPTS, SEEDS)]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    grid(columns, labels).save(OUT)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
