"""Image generation with a base or fine-tuned model: inference schedulers, ``generate``, and
``draw``, which saves what it generates (PNGs with their settings, a contact sheet).

Every image is drawn from its own ``torch.Generator().manual_seed(seed)``: its starting noise (and
any noise a stochastic scheduler adds) depends on its seed alone, so an image is the same whether
it was made alone, in a batch of four, or after an interruption.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dreambooth.errors import ConfigError
from dreambooth.base_model import FLOW_KINDS
from dreambooth.models import BaseModel
from dreambooth.prompts import fill_prompt

SCHEDULERS = ("dpmpp", "unipc", "ddim", "ddpm", "euler")
A1111_SAMPLERS = {"dpmpp": "DPM++ 2M", "unipc": "UniPC", "ddim": "DDIM", "ddpm": "DDPM", "euler": "Euler"}


def make_scheduler(name: str, train_scheduler_config: Any, kind: str = "sd1"):
    """An inference scheduler built from the training scheduler's config.

    ``from_config`` keeps the noise schedule and ``prediction_type`` (v-prediction for SD 2.x).
    dpmpp: DPM-Solver++ (2nd order multistep), good in 20-25 steps; unipc: UniPC, similar;
    ddim: DDIM (deterministic); ddpm: the ancestral sampler the model was trained with (slow);
    euler: Euler. The flow-matching kinds (FLUX.1, SD 3.x) sample with flow matching's Euler only.
    """
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)

    if kind in FLOW_KINDS:
        if name != "euler":
            raise ConfigError(f"scheduler '{name}': FLUX.1 and SD 3.x sample with flow matching's Euler; "
                              "set the scheduler to euler")
        return FlowMatchEulerDiscreteScheduler.from_config(dict(train_scheduler_config))

    # A scheduler built in-process lists the settings it left at their defaults in
    # "_use_default_values", and from_config would then take the *new* class's defaults for
    # those (timestep_spacing "linspace" instead of "leading"): the same model would sample
    # differently before and after a save. Pass every value explicitly.
    train_scheduler_config = {k: v for k, v in dict(train_scheduler_config).items()
                              if k != "_use_default_values"}
    if name == "dpmpp":
        return DPMSolverMultistepScheduler.from_config(train_scheduler_config,
                                                       algorithm_type="dpmsolver++")
    classes = {"unipc": UniPCMultistepScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler,
               "euler": EulerDiscreteScheduler}
    if name not in classes:
        raise ConfigError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    return classes[name].from_config(train_scheduler_config)


def generate(model: BaseModel, prompts: list[str], seeds: list[int], *, steps: int = 25,
             guidance: float = 7.5, negative_prompt: str | list[str] = "", resolution: int | None = None,
             scheduler: str = "dpmpp", batch_size: int = 4, lora_scale: float = 1.0,
             progress: Callable[[int], None] | None = None) -> list:
    """One PIL image per (prompt, seed) pair, in order, ``batch_size`` at a time.

    ``negative_prompt`` is one for every prompt, or a list with one per prompt.
    ``resolution`` defaults to the model's native size. ``progress`` is called with the number
    of images finished after each batch (e.g. a tqdm bar's ``update``). ``lora_scale`` scales
    the LoRA adapters, if the model has any (1.0: as trained; it does nothing without LoRA). The
    model's modules are put in eval mode for the call and given back in the mode they were in.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"generate needs one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"generate needs one negative prompt, or one per prompt: {len(prompts)} prompts, "
                         f"{len(negatives)} negative prompts")
    pipe = model.pipeline(scheduler=make_scheduler(scheduler, model.scheduler.config, model.kind))
    pipe.set_progress_bar_config(disable=True)
    modules = model.modules()
    was_training = [m.training for m in modules]
    size = resolution or model.resolution
    flow = model.kind in FLOW_KINDS
    extra = {"joint_attention_kwargs" if flow else "cross_attention_kwargs": {"scale": lora_scale}} \
        if lora_scale != 1.0 else {}
    if flow:
        extra["max_sequence_length"] = model.t5_length
    # FLUX.1 [dev] guides by its distilled guidance input, not by a negative prompt; a FLUX.1
    # transformer without that input (schnell, world-flux) takes true CFG when guidance > 1
    true_cfg = model.kind == "flux1" and not model.transformer.config.guidance_embeds and guidance > 1
    if true_cfg:
        extra["true_cfg_scale"] = guidance
    elif model.kind == "flux1" and any(negatives):
        print("note: FLUX.1 ignores negative prompts (it has distilled guidance, no second pass)")
    images = []
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                batch = slice(start, start + batch_size)
                negative = {} if model.kind == "flux1" and not true_cfg else {"negative_prompt": negatives[batch]}
                out = pipe(prompt=prompts[batch], **negative,
                           num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                           generator=[torch.Generator().manual_seed(s) for s in seeds[batch]],
                           output_type="pil", **extra)
                images.extend(out.images)
                if progress is not None:
                    progress(len(out.images))
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)
    return images


def draw(model: BaseModel, folder: Path, *groups: list[tuple[str, int]], sheet: str = "grid.png",
         cell: int = 128, meta: dict | None = None, **settings) -> list:
    """``generate`` one image per (prompt, seed) job of each group (a group's batches never mix
    with another's), save each as ``pNN-seedS.png`` in ``folder`` (NN: the prompt's place among
    all the jobs' prompts) and a captioned contact sheet of them all, ``sheet``. With ``meta``
    (e.g. the run and checkpoint), each PNG's text holds it, its prompt, seed and every setting
    (``png_metadata``). ``settings`` go to ``generate``. Returns the images, in job order."""
    from dreambooth.data import contact_sheet

    jobs = [job for group in groups for job in group]
    images = [im for group in groups if group
              for im in generate(model, [p for p, _ in group], [s for _, s in group], **settings)]
    folder.mkdir(parents=True, exist_ok=True)
    order = list(dict.fromkeys(p for p, _ in jobs))
    shown = {k: v for k, v in settings.items() if k not in ("progress", "batch_size")}
    for (prompt, seed), image in zip(jobs, images):
        info = None if meta is None else png_metadata({"prompt": prompt, "seed": seed, **shown, **meta})
        image.save(folder / f"p{order.index(prompt):02d}-seed{seed}.png", pnginfo=info)
    contact_sheet(images, [f"{p} ({s})" for p, s in jobs], cell=cell).save(folder / sheet)
    return images


def expand_prompt(prompt: str, token: str, class_noun: str) -> str:
    """Fill ``{token}`` and ``{class}``; a bare "my CLASS" becomes "TOKEN CLASS".

    "a photo of my dog on the beach" -> "a photo of waj dog on the beach"; other text is left
    alone, so "a photo of a dog" stays a class prompt.
    """
    if "{token}" in prompt or "{class}" in prompt:
        return fill_prompt(prompt, token, class_noun)
    return re.sub(rf"\bmy\s+{re.escape(class_noun)}\b", f"{token} {class_noun}", prompt,
                  flags=re.IGNORECASE)


def png_metadata(settings: dict[str, Any]) -> Any:
    """PNG text chunks: every setting as its own key, plus "parameters" in the AUTOMATIC1111
    layout (prompt / Negative prompt / Steps, Sampler, CFG scale, Seed, Size) that image
    browsers and A1111's "PNG Info" read."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in settings.items():
        info.add_text(key, str(value))
    size = settings.get("resolution", "")
    sampler = A1111_SAMPLERS.get(settings.get("scheduler"), settings.get("scheduler"))
    line = (f"Steps: {settings.get('steps')}, Sampler: {sampler}, CFG scale: {settings.get('guidance')}, "
            f"Seed: {settings.get('seed')}, Size: {size}x{size}")
    negative = settings.get("negative_prompt") or ""
    info.add_text("parameters", f"{settings.get('prompt')}\n"
                  + (f"Negative prompt: {negative}\n" if negative else "") + line)
    return info
