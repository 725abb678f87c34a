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
from dreambooth.prompts import fill_prompt

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


def check_subject_guidance(model, h: float, key: str, off: str = "0") -> None:
    """Subject guidance guides along what the identifier adds to one text encoder's embedding:
    SD 1.x/2.x only. ``key`` and ``off`` name the setting and its off value in the error."""
    if h and model.text_encoder_2 is not None:
        raise ConfigError(f"{key} is for SD 1.x/2.x models; set it to {off} for SDXL")


def generate(model: BaseModel, prompts: list[str], seeds: list[int], *, steps: int = 25,
             guidance: float = 7.5, negative_prompt: str | list[str] = "", resolution: int | None = None,
             scheduler: str = "dpmpp", batch_size: int = 4, lora_scale: float = 1.0,
             subject_guidance: float = 0.0, subject_below: int = 400, token: str = "",
             class_noun: str = "", progress: Callable[[int], None] | None = None) -> list:
    """One PIL image per (prompt, seed) pair, in order, ``batch_size`` at a time.

    ``negative_prompt`` is one for every prompt, or a list with one per prompt.
    ``resolution`` defaults to the model's native size. ``progress`` is called with the number
    of images finished after each batch (e.g. a tqdm bar's ``update``). ``lora_scale`` scales
    the LoRA adapters, if the model has any (1.0: as trained; it does nothing without LoRA). The model's modules are
    put in eval mode for the call and given back in the mode they were in.

    ``subject_guidance`` h > 0 adds, at timesteps below ``subject_below``, h times what the
    identifier ``token`` adds to each prompt that holds it: eps = e(neg) + g (e(p) - e(neg)) +
    h (e(p) - e(p without the identifier)) (``contrast_prompt``). A third UNet pass a step, for
    batches with the identifier only: other prompts are drawn exactly as without it.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"generate needs one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"generate needs one negative prompt, or one per prompt: {len(prompts)} prompts, "
                         f"{len(negatives)} negative prompts")
    if subject_guidance and not token:
        raise ValueError("subject_guidance needs the identifier (token=...): it guides along what the "
                         "identifier adds to each prompt")
    check_subject_guidance(model, subject_guidance, "sample.subject_guidance")
    pipe = model.pipeline(scheduler=make_scheduler(scheduler, model.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    modules = [m for m in model.components().values() if isinstance(m, torch.nn.Module)]
    was_training = [m.training for m in modules]
    size = resolution or model.unet.config.sample_size * model.vae_scale_factor
    extra = {"cross_attention_kwargs": {"scale": lora_scale}} if lora_scale != 1.0 else {}
    images = []
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                batch_prompts = prompts[start:start + batch_size]
                generators = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]]
                contrasts = [contrast_prompt(p, token, class_noun) for p in batch_prompts]
                if subject_guidance and contrasts != batch_prompts:
                    images.extend(_subject_guided(pipe, batch_prompts, negatives[start:start + batch_size],
                                                  contrasts, generators, steps, guidance, subject_guidance,
                                                  subject_below, size, extra))
                else:
                    out = pipe(prompt=batch_prompts, negative_prompt=negatives[start:start + batch_size],
                               num_inference_steps=steps, guidance_scale=guidance, height=size,
                               width=size, generator=generators, output_type="pil", **extra)
                    images.extend(out.images)
                if progress is not None:
                    progress(len(batch_prompts))
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)
    return images


def contrast_prompt(prompt: str, token: str, class_noun: str) -> str:
    """The prompt without its identifier: "a photo of zwx dog on the beach" -> "a photo of a dog on
    the beach" ("TOKEN CLASS" becomes "a CLASS" unless an article or "my" comes before it); a prompt
    without the identifier comes back unchanged."""
    import re

    if not token or not re.search(rf"\b{re.escape(token)}\b", prompt, flags=re.IGNORECASE):
        return prompt
    words = prompt.split()
    out = []
    for i, word in enumerate(words):
        if word.lower() != token.lower():
            out.append(word)
        elif (class_noun and i + 1 < len(words) and words[i + 1].lower() == class_noun.lower()
              and (i == 0 or words[i - 1].lower() not in ("a", "an", "the", "my"))):
            out.append("a")  # "of zwx dog" -> "of a dog"
    return " ".join(out)


def _subject_guided(pipe, prompts, negatives, contrasts, generators, steps, guidance, h, below, size,
                    extra) -> list:
    """``generate``'s sampler for subject guidance: the pipeline's own pieces (prompt encoding,
    starting latents, scheduler, decoder) with three UNet passes a step, the third only below
    ``below``."""
    device = pipe.unet.device
    pos, neg = pipe.encode_prompt(prompts, device, 1, True, negatives)
    con, _ = pipe.encode_prompt(contrasts, device, 1, False)
    pipe.scheduler.set_timesteps(steps, device=device)
    latents = pipe.prepare_latents(len(prompts), pipe.unet.config.in_channels, size, size, pos.dtype,
                                   device, generators)
    # rows without the identifier get no subject term at all (0 x the difference)
    weight = torch.tensor([float(c != p) * h for p, c in zip(prompts, contrasts)],
                          dtype=pos.dtype, device=device).view(-1, 1, 1, 1)
    for t in pipe.scheduler.timesteps:
        third = int(t) < below
        conds = [neg, pos, con] if third else [neg, pos]
        x = pipe.scheduler.scale_model_input(torch.cat([latents] * len(conds)), t)
        out = pipe.unet(x, t, encoder_hidden_states=torch.cat(conds), **extra).sample.chunk(len(conds))
        eps = out[0] + guidance * (out[1] - out[0])
        if third:
            eps = eps + weight * (out[1] - out[2])
        latents = pipe.scheduler.step(eps, t, latents).prev_sample
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(decoded, output_type="pil")


# ---------------------------------------------------------------- prompts and metadata

SETTINGS_FILE = "sample-settings.json"  # RUN_DIR/: the settings `sample` uses by default
A1111_SAMPLERS = {"dpmpp": "DPM++ 2M", "unipc": "UniPC", "ddim": "DDIM", "ddpm": "DDPM"}


def expand_prompt(prompt: str, token: str, class_noun: str) -> str:
    """Fill ``{token}`` and ``{class}``; a bare "my CLASS" becomes "TOKEN CLASS".

    "a photo of my dog on the beach" -> "a photo of waj dog on the beach"; other text is left
    alone, so "a photo of a dog" stays a class prompt.
    """
    import re

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
    line = (f"Steps: {settings.get('steps')}, Sampler: {A1111_SAMPLERS.get(settings.get('scheduler'), settings.get('scheduler'))}, "
            f"CFG scale: {settings.get('guidance')}, Seed: {settings.get('seed')}, Size: {size}x{size}")
    negative = settings.get("negative_prompt") or ""
    info.add_text("parameters", f"{settings.get('prompt')}\n"
                  + (f"Negative prompt: {negative}\n" if negative else "") + line)
    return info
