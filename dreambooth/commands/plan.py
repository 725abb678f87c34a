"""`dreambooth plan`: whether a training run fits the GPU, before anything is downloaded or loaded."""

from __future__ import annotations


def plan(model: str | None = None, preset: str | None = None, config: str | None = None,
         overrides: list[str] | None = None, gpu: str | None = None, gpus: int | None = None) -> int:
    """Predict a run's peak GPU memory and, when it does not fit, the switches that make it fit.

    One training step of the real-size model runs on fake tensors (nothing is allocated or read
    but configs), so the prediction follows the code a run executes. Example:
    dreambooth plan --model flux1-dev --preset flux1-dev-lora --gpu 24GB

    Args:
        model: a local diffusers folder or single file, tiny, world, or an architecture: sd15, sd21, sdxl, flux1-dev, flux1-schnell, sd35-medium, sd35-large (default: the preset's)
        preset: a preset name from dreambooth/configs
        config: a YAML config file (applied after the preset)
        overrides: key=value (repeatable), as for train
        gpu: the GPU's memory to plan against, e.g. 24GB; auto: this machine's GPU
        gpus: the number of GPUs (one process each): the peak on each; with --set train.shard=fsdp the denoiser is split over them
    """
    from dreambooth.config import build_config
    from dreambooth.plan import fits, parse_budget, plan_run, report

    if gpus is not None and gpus < 1:
        from dreambooth.errors import DreamboothError

        raise DreamboothError(f"--gpus {gpus}: give the number of GPUs the run will use (1 or more)")
    cfg = build_config(preset, config, overrides, extra={"model.path": model})
    budget = parse_budget(gpu)
    estimate, advice = plan_run(cfg, budget, gpus or 1)
    print(report(cfg, estimate, budget, advice))
    return 0 if budget is None or fits(estimate, budget) or (advice and fits(advice[-1][2], budget)) else 1
