"""`dreambooth sample`: draw the subject from a run, with every setting written into each PNG."""

from __future__ import annotations

import json
from pathlib import Path


def run_settings(run: Path, cfg) -> dict:
    """The run's default sampling settings: what `dreambooth sweep` chose, else the config's."""
    from dreambooth.sample import SETTINGS_FILE

    s = cfg.sample
    settings = dict(steps=s.steps, guidance=s.guidance, scheduler=s.scheduler, lora_scale=1.0,
                    negative_prompt=s.negative_prompt, subject_guidance=s.subject_guidance,
                    subject_below=s.subject_guidance_below, source="config.yaml (sample section)")
    chosen = run / SETTINGS_FILE
    if chosen.is_file():
        saved = json.loads(chosen.read_text())
        settings.update({k: saved[k] for k in ("steps", "guidance", "scheduler", "lora_scale",
                                               "subject_guidance", "subject_below") if k in saved})
        settings["source"] = f"{chosen.name} (chosen by `dreambooth sweep`)"
    return settings


def sample(run_dir: str, prompt: list[str] | None = None, prompts_file: str = "", n: int = 4,
           seed: int = 0, steps: int = 0, guidance: float = -1.0, negative: str | None = None,
           scheduler: str = "", lora_scale: float = -1.0, subject_guidance: float = -1.0,
           checkpoint: str = "final", out: str = "", batch: int = 4, progress: bool = True,
           trust_pickle: bool = False) -> int:
    """Generate images of the subject from a finished run.

    Prompts may use {token} and {class}, or say "my CLASS" ("a photo of my dog on the beach").
    Unset settings come from RUN_DIR/sample-settings.json (written by `dreambooth sweep`) or
    else the run's config. Each PNG carries its prompt, seed and settings in its text metadata
    (also in the AUTOMATIC1111 "parameters" layout); a captioned contact sheet is written too.

    Example: dreambooth sample runs/dog --prompt "a photo of my dog on the beach" --n 4

    Args:
        run_dir: a run directory made by `dreambooth train`
        prompt: a prompt (repeatable)
        prompts_file: a text file with one prompt per line (# comments and blank lines skipped)
        n: images per prompt (seeds SEED .. SEED+n-1)
        seed: first seed
        steps: solver steps (0: the run's default)
        guidance: classifier-free guidance scale (-1: the run's default)
        negative: negative prompt (default: the run's)
        scheduler: dpmpp, unipc, ddim or ddpm (default: the run's)
        lora_scale: strength of a LoRA run's adapters (-1: the run's default, usually 1.0)
        subject_guidance: extra guidance along what the identifier adds to each prompt, at low noise (-1: the run's default; 0: off)
        checkpoint: final, best or step-N
        out: folder for the images (default: RUN_DIR/samples/sample-N)
        batch: images per forward pass
        progress: show a progress bar
        trust_pickle: allow pickle weights (.ckpt/.pt/.bin) in the run's base model for this command only (unpickling runs code; never read from a config file)
    """
    from tqdm.auto import tqdm

    from dreambooth.checkpoint import load_checkpoint_model
    from dreambooth.data import contact_sheet
    from dreambooth.errors import DreamboothError
    from dreambooth.rundir import refuse_inside_photos, require_run
    from dreambooth.sample import SCHEDULERS, expand_prompt, generate, png_metadata

    run = require_run(run_dir)
    texts = list(prompt or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise DreamboothError(f"prompts file not found: {path}")
        texts += [line.strip() for line in path.read_text().splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    if not texts:
        raise DreamboothError('no prompt: pass --prompt "a photo of my CLASS on the beach" '
                              "(repeatable) or --prompts-file FILE")
    if scheduler and scheduler not in SCHEDULERS:
        raise DreamboothError(f"unknown scheduler '{scheduler}'; choose one of {', '.join(SCHEDULERS)}")
    if n < 1:
        raise DreamboothError("--n must be at least 1")
    if steps < 0:
        raise DreamboothError(f"--steps must be at least 1 (or 0: the run's default), got {steps}")
    for flag, value in (("--guidance", guidance), ("--lora-scale", lora_scale),
                        ("--subject-guidance", subject_guidance)):
        if value < 0 and value != -1:
            raise DreamboothError(f"{flag} must be 0 or more (or -1: the run's default), got {value:g}")

    if out:  # before minutes of loading
        from dreambooth.config import load_config

        refuse_inside_photos(out, load_config(run / "config.yaml").data.images, "--out")
    model, cfg, name = load_checkpoint_model(run, checkpoint, trust_pickle)
    settings = run_settings(run, cfg)
    for key, value, unset in (("steps", steps, 0), ("guidance", guidance, -1.0),
                              ("scheduler", scheduler, ""), ("lora_scale", lora_scale, -1.0),
                              ("subject_guidance", subject_guidance, -1.0)):
        if value != unset:
            settings[key] = value
    if negative is not None:
        settings["negative_prompt"] = negative
    if cfg.train.mode != "lora" and settings["lora_scale"] != 1.0:
        print("note: --lora-scale does nothing for a full fine-tune (no LoRA adapters)")
        settings["lora_scale"] = 1.0
    token, noun = cfg.data.token, cfg.data.class_noun
    full = [expand_prompt(t, token, noun) for t in texts]
    jobs = [(p, seed + i) for p in full for i in range(n)]

    if out:
        folder = Path(out)
    else:
        k = 1
        while (run / "samples" / f"sample-{k}").exists():
            k += 1
        folder = run / "samples" / f"sample-{k}"
    folder.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(jobs), desc="sample", unit="img", disable=not progress)
    images = generate(model, [p for p, _ in jobs], [s for _, s in jobs], steps=settings["steps"],
                      guidance=settings["guidance"], negative_prompt=settings["negative_prompt"],
                      resolution=cfg.data.resolution, scheduler=settings["scheduler"],
                      batch_size=batch, lora_scale=settings["lora_scale"],
                      subject_guidance=settings["subject_guidance"], subject_below=settings["subject_below"],
                      token=token, class_noun=noun, progress=bar.update)
    bar.close()
    labels = []
    for i, ((p, s), image) in enumerate(zip(jobs, images)):
        meta = dict(prompt=p, negative_prompt=settings["negative_prompt"], seed=s,
                    steps=settings["steps"], guidance=settings["guidance"],
                    scheduler=settings["scheduler"], lora_scale=settings["lora_scale"],
                    subject_guidance=settings["subject_guidance"], subject_below=settings["subject_below"],
                    resolution=cfg.data.resolution, checkpoint=name, run=str(run.resolve()),
                    model=cfg.model.path, token=token, **{"class": noun})
        image.save(folder / f"{i:03d}-p{full.index(p):02d}-seed{s}.png", pnginfo=png_metadata(meta))
        labels.append(f"{p} ({s})")
    contact_sheet(images, labels).save(folder / "contact-sheet.png")
    print(f"{len(images)} images ({len(full)} prompts x {n}) with steps {settings['steps']}, "
          f"guidance {settings['guidance']}, {settings['scheduler']}"
          + (f", LoRA scale {settings['lora_scale']}" if cfg.train.mode == "lora" else "")
          + f" (from {settings['source']})")
    for p in full:
        print(f"  {p}")
    print(f"images: {folder}   contact sheet: {folder / 'contact-sheet.png'}")
    return 0
