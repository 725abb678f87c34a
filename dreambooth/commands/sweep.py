"""`dreambooth sweep`: find good inference settings for a run by scoring a grid of them."""

from __future__ import annotations

from pathlib import Path


def sweep(run_dir: str, checkpoint: str = "final", dino: str | None = None, clip: str | None = None,
          overrides: list[str] | None = None, progress: bool = True, trust_pickle: bool = False) -> int:
    """Score guidance x steps x scheduler (x LoRA scale, x subject guidance) on tuning prompts; save the best.

    Each setting draws the same prompts and seeds; the evaluation metrics score them (world
    probes on the world model, DINO/CLIP-T with --dino/--clip). The ranked table, a grid image and
    a held-out check (best vs the run's defaults on prompts the sweep never saw) go to
    RUN_DIR/sweep/; the best settings to RUN_DIR/sample-settings.json, which `dreambooth sample`
    then uses. Run it again to resume: finished settings are reused.

    Example: dreambooth sweep runs/dog --dino DIR --clip DIR --set sweep.guidance=[5,7.5] --set sweep.steps=[20,30]

    Args:
        run_dir: a run directory made by `dreambooth train`
        checkpoint: final, best or step-N
        dino: local folder of facebook/dino-vits16 (or tiny)
        clip: local folder of openai/clip-vit-base-patch32 (or tiny)
        overrides: sweep settings, e.g. --set sweep.guidance=[3,5,7.5] --set sweep.schedulers=[dpmpp]
            --set sweep.subject_guidance=[0,2.5] (SD 1.x/2.x)
        progress: show a progress bar
        trust_pickle: allow pickle weights (.ckpt/.pt/.bin) in the run's base model for this command only (unpickling runs code; never read from a config file)
    """
    from dreambooth.commands.evaluate import open_run
    from dreambooth.sample import check_subject_guidance
    from dreambooth.sweep import Setting, grid, run_sweep

    run = Path(run_dir)
    model, cfg, _ = open_run(run, checkpoint, dino, clip, overrides, "sweep", trust_pickle)
    sw = cfg.sweep
    check_subject_guidance(model, any(sw.subject_guidance), "sweep.subject_guidance", "[0]")
    lora = cfg.train.mode == "lora"
    s = cfg.sample  # the run's own defaults (not an earlier sweep's pick)
    settings = grid(sw.guidance, sw.steps, sw.schedulers, sw.lora_scales if lora else (1.0,),
                    sw.subject_guidance, s.subject_guidance_below)
    default = Setting(float(s.guidance), int(s.steps), s.scheduler, 1.0, float(s.subject_guidance),
                      int(s.subject_guidance_below))
    result = run_sweep(run, settings, model, cfg, default, progress=progress, checkpoint=checkpoint)
    print(result["table"])
    b, h = result["best"], result["held_out"]
    print(f"\nbest: {b['scheduler']}, {b['steps']} steps, guidance {b['guidance']:g}"
          + (f", LoRA scale {b['lora_scale']:g}" if lora else "")
          + (f", subject guidance {b['subject_guidance']:g} below t = {b['subject_below']}"
             if b["subject_guidance"] else "")
          + f" (score {b['score']:.4f}; {result['reused']} of {result['settings']} settings reused)")
    print(f"held-out prompts: best {h['best']['score']:.4f} vs the run's defaults {h['default']['score']:.4f}")
    a = result["adopted"]
    kept = "the pick" if a["pick_confirmed"] else "the run's defaults (the pick did not hold up)"
    print(f"saved {kept} as {run / 'sample-settings.json'} (used by `dreambooth sample`); "
          f"table and grid in {run / 'sweep'}")
    return 0
