"""The training data: the subject's photos encoded once, and what every training sample draws.

Every random choice for training sample k (which photo, which class image, timestep, noise) is
drawn from a generator seeded by (seed, k). A step's randomness is therefore a function of the
step alone: resuming from a checkpoint replays exactly what an uninterrupted run would have
done, and N processes of batch b see the same samples as one process of batch N·b.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dreambooth.errors import DreamboothError
from dreambooth.loss import offset_noise
from dreambooth.models import BaseModel, encode_latents
from dreambooth.prompts import fill_prompt


@dataclass
class Source:
    """One half of every batch: the subject's photos, or the class images."""

    latents: torch.Tensor  # (N, C, h, w)
    prompts: list[str]  # one per latent
    masks: torch.Tensor | None = None  # (N, 1, h, w) loss masks on the latent grid, or None


def sample_seed(seed: int, k: int, stream: int) -> int:
    """A distinct 63-bit seed for sample k of stream (0: instance, 1: class, 2-3: order)."""
    return ((seed * 1_000_003 + k) * 7 + stream) % (2**63 - 1)


def nth_of_shuffle(seed: int, n: int, k: int, stream: int) -> int:
    """Index of the k-th draw when 0..n-1 is reshuffled every epoch (epoch = k // n)."""
    if n == 1:  # (and a planned step, whose tensors hold no values, has one latent per source)
        return 0
    g = torch.Generator().manual_seed(sample_seed(seed, k // n, 2 + stream))
    return int(torch.randperm(n, generator=g)[k % n])


def draw_samples(sources: list[Source], ks: list[int], seed: int,
                 draw_timestep: Callable[[torch.Generator], torch.Tensor], noise_offset: float = 0.0):
    """(latents, noise, timesteps, prompts, masks) of global samples ``ks`` from each source in
    turn (the subject's photos first, then the class images). Each sample has its own generator;
    ``draw_timestep(generator)`` is the family's. ``masks`` is None when no source has any."""
    latents, noise, tsteps, prompts, masks = [], [], [], [], []
    masked = any(s.masks is not None for s in sources)
    for stream, source in enumerate(sources):
        for k in ks:
            i = nth_of_shuffle(seed, len(source.latents), k, stream)
            g = torch.Generator().manual_seed(sample_seed(seed, k, stream))
            tsteps.append(draw_timestep(g))
            n = torch.randn(source.latents[i].shape, generator=g)
            noise.append(offset_noise(n[None], noise_offset, g)[0])
            latents.append(source.latents[i])
            prompts.append(source.prompts[i])
            if masked:
                masks.append(source.masks[i] if source.masks is not None
                             else torch.ones((1, *source.latents[i].shape[1:])))
    return (torch.stack(latents), torch.stack(noise), torch.cat(tsteps), prompts,
            torch.stack(masks) if masked else None)


def instance_source(cfg, model: BaseModel, intake) -> Source:
    """The subject's photos (and their mirror images when ``data.flip`` > 0) as latents, with
    their prompts (a photo's caption, else ``data.instance_prompt``) and loss masks (None when no
    photo has one or ``data.masks`` is off; a photo without one counts everywhere).
    ``intake``: ``data.read_photos`` of ``data.images``."""
    from dreambooth.data import square_crop, to_tensor

    d = cfg.data
    for w in intake.warnings:
        print(f"warning: {w}")
    default = fill_prompt(d.instance_prompt, d.token, d.class_noun)
    use_masks = d.masks and any(p.mask is not None for p in intake.photos)
    crops, prompts, masks = [], [], []
    for photo in intake.photos:
        prompt = fill_prompt(photo.caption, d.token, d.class_noun) if (photo.caption and d.captions) else default
        for flip in ((False, True) if d.flip > 0 else (False,)):
            crops.append(square_crop(photo.image, d.resolution, flip=flip))
            prompts.append(prompt)
            if use_masks:
                mask = photo.mask if photo.mask is not None else Image.new("L", photo.image.size, 255)
                masks.append(np.asarray(square_crop(mask, d.resolution, flip=flip)) > 127)
                if not masks[-1].any():
                    raise DreamboothError(f"{photo.path}: its mask is empty after the center crop "
                                          "(the subject is outside the square middle of the photo) "
                                          "— crop the photo around the subject, or remove its mask")
    latents = encode_latents(model, torch.stack([to_tensor(c) for c in crops]))
    if not use_masks:
        return Source(latents, prompts)
    return Source(latents, prompts, latent_masks(torch.from_numpy(np.stack(masks)), latents.shape[-1]))


def latent_masks(pixel_masks: torch.Tensor, latent_size: int) -> torch.Tensor:
    """Bool pixel masks (N, H, W) -> float (N, 1, h, w) on the latent grid: a cell counts when
    any of its pixels is set, because the VAE spreads an edge into the cells around it."""
    factor = pixel_masks.shape[-1] // latent_size
    return torch.nn.functional.max_pool2d(pixel_masks[:, None].float(), factor)
