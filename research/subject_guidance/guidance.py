"""Subject guidance: at low noise, also guide along what the identifier adds to each prompt.

    eps = e(neg) + g (e(p) - e(neg)) + h (e(p) - e(p without the identifier))

for timesteps below ``subject_below`` (400), where the subject's fine detail is drawn and the
layout is already decided. A third UNet pass a step, for batches with the identifier only: other
prompts are drawn exactly as ``dreambooth.sample.generate`` draws them. SD 1.x/2.x (one text
encoder). Not kept in the package: the right h differs by subject, and on the world model it
lifted subject fidelity from 87.1% to 92.4% only with a per-run sweep, below the 95% bar
(research/world/results.md, sessions 27-28; README.md here).
"""

from __future__ import annotations

import re

import torch

from dreambooth.errors import ConfigError
from dreambooth.sample import generate, make_scheduler


def contrast_prompt(prompt: str, token: str, class_noun: str) -> str:
    """The prompt without its identifier: "a photo of zwx dog on the beach" -> "a photo of a dog on
    the beach" ("TOKEN CLASS" becomes "a CLASS" unless an article or "my" comes before it); a prompt
    without the identifier comes back unchanged."""
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


def generate_guided(model, prompts: list[str], seeds: list[int], *, subject_guidance: float,
                    subject_below: int = 400, token: str, class_noun: str = "", steps: int = 25,
                    guidance: float = 7.5, negative_prompt: str | list[str] = "",
                    resolution: int | None = None, scheduler: str = "dpmpp", batch_size: int = 4,
                    lora_scale: float = 1.0, progress=None) -> list:
    """``dreambooth.sample.generate`` with subject guidance h = ``subject_guidance`` below
    ``subject_below``, along what ``token`` adds to each prompt that holds it."""
    if not token:
        raise ValueError("subject guidance needs the identifier (token=...): it guides along what the "
                         "identifier adds to each prompt")
    if model.text_encoder_2 is not None:
        raise ConfigError("subject guidance is for SD 1.x/2.x models (one text encoder), not SDXL")
    kw = dict(steps=steps, guidance=guidance, resolution=resolution, scheduler=scheduler,
              batch_size=batch_size, lora_scale=lora_scale)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = slice(start, start + batch_size)
        contrasts = [contrast_prompt(p, token, class_noun) for p in prompts[batch]]
        if contrasts == prompts[batch] or not subject_guidance:  # no identifier: the plain sampler
            images += generate(model, prompts[batch], seeds[batch], negative_prompt=negatives[batch], **kw)
        else:
            images += _guided_batch(model, prompts[batch], negatives[batch], contrasts, seeds[batch],
                                    subject_guidance, subject_below, kw)
        if progress is not None:
            progress(len(prompts[batch]))
    return images


def _guided_batch(model, prompts, negatives, contrasts, seeds, h, below, kw) -> list:
    """The pipeline's own pieces (prompt encoding, starting latents, scheduler, decoder) with three
    UNet passes a step, the third only below ``below``."""
    pipe = model.pipeline(scheduler=make_scheduler(kw["scheduler"], model.scheduler.config))
    size = kw["resolution"] or model.unet.config.sample_size * model.vae_scale_factor
    extra = {"cross_attention_kwargs": {"scale": kw["lora_scale"]}} if kw["lora_scale"] != 1.0 else {}
    modules = [m for m in model.components().values() if isinstance(m, torch.nn.Module)]
    was_training = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            device = pipe.unet.device
            pos, neg = pipe.encode_prompt(prompts, device, 1, True, negatives)
            con, _ = pipe.encode_prompt(contrasts, device, 1, False)
            pipe.scheduler.set_timesteps(kw["steps"], device=device)
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            latents = pipe.prepare_latents(len(prompts), pipe.unet.config.in_channels, size, size,
                                           pos.dtype, device, generators)
            # rows without the identifier get no subject term at all (0 x the difference)
            weight = torch.tensor([float(c != p) * h for p, c in zip(prompts, contrasts)],
                                  dtype=pos.dtype, device=device).view(-1, 1, 1, 1)
            for t in pipe.scheduler.timesteps:
                third = int(t) < below
                conds = [neg, pos, con] if third else [neg, pos]
                x = pipe.scheduler.scale_model_input(torch.cat([latents] * len(conds)), t)
                out = pipe.unet(x, t, encoder_hidden_states=torch.cat(conds), **extra).sample.chunk(len(conds))
                eps = out[0] + kw["guidance"] * (out[1] - out[0])
                if third:
                    eps = eps + weight * (out[1] - out[2])
                latents = pipe.scheduler.step(eps, t, latents).prev_sample
            decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)
    return pipe.image_processor.postprocess(decoded, output_type="pil")
