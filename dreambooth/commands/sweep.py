"""`dreambooth sweep`: find good inference settings for a run by scoring a grid of them."""

from __future__ import annotations


def sweep(run_dir: str, checkpoint: str = "final", dino: str | None = None, clip: str | None = None,
          overrides: list[str] | None = None, progress: bool = True, trust_pickle: bool = False) -> int:
    """Score guidance x steps x scheduler (x LoRA scale) on tuning prompts; save the best.

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
        overrides: sweep settings, e.g. --set sweep.guidance=[3,5,7.5] --set sweep.scheduler=[dpmpp]
        progress: show a progress bar
        trust_pickle: allow pickle weights (.ckpt/.pt/.bin) in the run's base model for this command only (unpickling runs code; never read from a config file)
    """
    from dreambooth.commands.evaluate import open_run
    from dreambooth.sweep import Setting, grid, run_sweep

    run, model, cfg, _ = open_run(run_dir, checkpoint, dino, clip, overrides, "sweep", trust_pickle)
    sw, s, lora = cfg.sweep, cfg.sample, cfg.train.mode == "lora"
    settings = grid(sw.guidance, sw.steps, sw.scheduler, sw.lora_scale if lora else (1.0,))
    default = Setting(float(s.guidance), int(s.steps), s.scheduler)  # the run's own, not an earlier pick
    result = run_sweep(run.path, settings, model, cfg, default, progress=progress, checkpoint=checkpoint)
    print(result["table"])
    b, h = result["best"], result["held_out"]
    print(f"\nbest: {b['scheduler']}, {b['steps']} steps, guidance {b['guidance']:g}"
          + (f", LoRA scale {b['lora_scale']:g}" if lora else "")
          + f" (score {b['score']:.4f}; {result['reused']} of {result['settings']} settings reused)")
    print(f"held-out prompts: best {h['best']['score']:.4f} vs the run's defaults {h['default']['score']:.4f}")
    kept = "the pick" if result["adopted"]["pick_confirmed"] else "the run's defaults (the pick did not hold up)"
    print(f"saved {kept} as {run.sample_settings} (used by `dreambooth sample`); table and grid in "
          f"{run.path / 'sweep'}")
    return 0
