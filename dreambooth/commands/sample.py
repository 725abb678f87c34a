"""`dreambooth sample`: draw the subject from a run, with every setting written into each PNG."""

from __future__ import annotations

import json
from pathlib import Path


def run_settings(run, cfg) -> dict:
    """The run's default sampling settings: what `dreambooth sweep` chose, else the config's."""
    s = cfg.sample
    settings = dict(steps=s.steps, guidance=s.guidance, scheduler=s.scheduler, lora_scale=1.0,
                    negative_prompt=s.negative_prompt, source="config.yaml (sample section)")
    if run.sample_settings.is_file():
        saved = json.loads(run.sample_settings.read_text())
        if saved.get("subject_guidance"):  # written by a sweep before subject guidance moved out
            print(f"note: {run.sample_settings.name} asks for subject guidance "
                  f"{saved['subject_guidance']:g}, which moved to research/subject_guidance: drawn without it")
        settings.update({k: saved[k] for k in ("steps", "guidance", "scheduler", "lora_scale") if k in saved})
        settings["source"] = f"{run.sample_settings.name} (chosen by `dreambooth sweep`)"
    return settings


def read_prompts(prompts: list[str] | None, prompts_file: str) -> list[str]:
    """--prompt values, then the lines of --prompts-file (# comments and blank lines skipped)."""
    from dreambooth.errors import DreamboothError

    texts = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise DreamboothError(f"prompts file not found: {path}")
        texts += [line.strip() for line in path.read_text().splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    if not texts:
        raise DreamboothError('no prompt: pass --prompt "a photo of my CLASS on the beach" '
                              "(repeatable) or --prompts-file FILE")
    return texts


def check_flags(**flags) -> None:
    """Each flag backed by a config key gets that key's own check (range, choices)."""
    from dreambooth.config import Config, set_value
    from dreambooth.errors import ConfigError

    for name, (key, value) in flags.items():
        if value is not None:
            try:
                set_value(Config(), key, value)
            except ConfigError as e:
                raise ConfigError(f"--{name.replace('_', '-')}: {e}") from None


def sample(run_dir: str, prompt: list[str] | None = None, prompts_file: str = "", n: int = 4,
           seed: int = 0, steps: int | None = None, guidance: float | None = None,
           negative: str | None = None, scheduler: str | None = None, lora_scale: float | None = None,
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
        steps: solver steps (default: the run's)
        guidance: classifier-free guidance scale (default: the run's)
        negative: negative prompt (default: the run's)
        scheduler: dpmpp, unipc, ddim, ddpm or euler (FLUX.1 and SD 3.x: euler; default: the run's)
        lora_scale: strength of a LoRA run's adapters (default: the run's, usually 1.0)
        checkpoint: final, best or step-N
        out: folder for the images (default: RUN_DIR/samples/sample-N)
        batch: images per forward pass
        progress: show a progress bar
        trust_pickle: allow pickle weights (.ckpt/.pt/.bin) in the run's base model for this command only (unpickling runs code; never read from a config file)
    """
    from tqdm.auto import tqdm

    from dreambooth.errors import DreamboothError
    from dreambooth.rundir import Run
    from dreambooth.sample import draw, expand_prompt

    run = Run(run_dir)
    texts = read_prompts(prompt, prompts_file)
    check_flags(n=("sample.num_images", n), seed=("sample.seed", seed), steps=("sample.steps", steps),
                guidance=("sample.guidance", guidance), scheduler=("sample.scheduler", scheduler))
    if lora_scale is not None and not lora_scale >= 0:
        raise DreamboothError(f"--lora-scale must be at least 0 (0: the base model), got {lora_scale:g}")
    if out:  # before minutes of loading
        run.refuse_output(out, "--out")
    model, cfg, name = run.load(checkpoint, trust_pickle)
    settings = run_settings(run, cfg)
    given = dict(steps=steps, guidance=guidance, scheduler=scheduler, lora_scale=lora_scale,
                 negative_prompt=negative)
    settings.update({k: v for k, v in given.items() if v is not None})
    if cfg.train.mode != "lora" and settings["lora_scale"] != 1.0:
        print("note: --lora-scale does nothing for a full fine-tune (no LoRA adapters)")
        settings["lora_scale"] = 1.0
    token, noun = cfg.data.token, cfg.data.class_noun
    full = list(dict.fromkeys(expand_prompt(t, token, noun) for t in texts))
    jobs = [(p, seed + i) for p in full for i in range(n)]
    folder = Path(out) if out else run.new_folder("sample")
    source = settings.pop("source")
    with tqdm(total=len(jobs), desc="sample", unit="img", disable=not progress) as bar:
        draw(model, folder, jobs, sheet="contact-sheet.png", resolution=cfg.data.resolution,
             batch_size=batch, progress=bar.update, **settings,
             meta={"checkpoint": name, "run": str(run.path.resolve()), "model": cfg.model.path,
                   "token": token, "class": noun})
    print(f"{len(jobs)} images ({len(full)} prompts x {n}) with steps {settings['steps']}, "
          f"guidance {settings['guidance']}, {settings['scheduler']}"
          + (f", LoRA scale {settings['lora_scale']}" if cfg.train.mode == "lora" else "")
          + f" (from {source})")
    for p in full:
        print(f"  {p}")
    print(f"images: {folder}   contact sheet: {folder / 'contact-sheet.png'}")
    return 0
