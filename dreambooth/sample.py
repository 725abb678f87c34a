"""Image generation with a base or fine-tuned model: inference schedulers and ``generate``.

Every image is drawn from its own ``torch.Generator().manual_seed(seed)``: its starting noise (and
any noise a stochastic scheduler adds) depends on its seed alone, so an image is the same whether
it was made alone, in a batch of four, or after an interruption.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dreambooth.errors import ConfigError
from dreambooth.models import BaseModel

SCHEDULERS = ("dpmpp", "unipc", "ddim", "ddpm")


def make_scheduler(name: str, train_scheduler_config: Any):
    """An inference scheduler built from the training scheduler's config.

    ``from_config`` keeps the noise schedule and ``prediction_type`` (v-prediction for SD 2.x).
    dpmpp: DPM-Solver++ (2nd order multistep), good in 20-25 steps; unipc: UniPC, similar;
    ddim: DDIM (deterministic); ddpm: the ancestral sampler the model was trained with (slow).
    """
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                           UniPCMultistepScheduler)

    # A scheduler built in-process lists the settings it left at their defaults in
    # "_use_default_values", and from_config would then take the *new* class's defaults for
    # those (timestep_spacing "linspace" instead of "leading"): the same model would sample
    # differently before and after a save. Pass every value explicitly.
    train_scheduler_config = {k: v for k, v in dict(train_scheduler_config).items()
                              if k != "_use_default_values"}

    if name == "dpmpp":
        return DPMSolverMultistepScheduler.from_config(train_scheduler_config,
                                                       algorithm_type="dpmsolver++")
    classes = {"unipc": UniPCMultistepScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    if name not in classes:
        raise ConfigError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    return classes[name].from_config(train_scheduler_config)


def generate(model: BaseModel, prompts: list[str], seeds: list[int], *, steps: int = 25,
             guidance: float = 7.5, negative_prompt: str = "", resolution: int | None = None,
             scheduler: str = "dpmpp", batch_size: int = 4,
             progress: Callable[[int], None] | None = None) -> list:
    """One PIL image per (prompt, seed) pair, in order, ``batch_size`` at a time.

    ``resolution`` defaults to the model's native size. ``progress`` is called with the number
    of images finished after each batch (e.g. a tqdm bar's ``update``). The model's modules are
    put in eval mode for the call and given back in the mode they were in.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"generate needs one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    pipe = model.pipeline(scheduler=make_scheduler(scheduler, model.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    modules = [m for m in model.components().values() if isinstance(m, torch.nn.Module)]
    was_training = [m.training for m in modules]
    size = resolution or model.unet.config.sample_size * model.vae_scale_factor
    images = []
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                batch_prompts = prompts[start:start + batch_size]
                generators = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]]
                out = pipe(prompt=batch_prompts, negative_prompt=[negative_prompt] * len(batch_prompts),
                           num_inference_steps=steps, guidance_scale=guidance, height=size,
                           width=size, generator=generators, output_type="pil")
                images.extend(out.images)
                if progress is not None:
                    progress(len(batch_prompts))
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)
    return images
