"""Model families: what differs between kinds of diffusion model, behind one small interface.

The training recipe (``dreambooth.train``) calls only these methods, so a new kind of model
(a flow-matching transformer, say) is a new ``Family``, not a change to the loop:

    denoiser(model)                        the network that is fine-tuned (UNet, transformer)
    parts(model, cfg)                      {name: module} that train, in the optimizer's order
    lora_targets(lora_cfg, part)           module names that get LoRA adapters in that part
    encode_prompts(model, prompts, dev)    the denoiser's conditioning, as keyword arguments
    concat_cond(a, b)                      two conditionings as one batch
    draw_timestep(generator, model)        one training timestep, shape (1,)
    noisy_and_target(model, x0, eps, t)    the noised latents and what the denoiser should predict
    predict(denoiser, noisy, t, cond)      the denoiser's output
    loss_weights(model, t, snr_gamma)      per-sample loss weights, or None

``UNetFamily`` is Stable Diffusion 1.x, 2.x (ε or v prediction) and SDXL: a DDPM noise schedule
and a UNet2DConditionModel conditioned on CLIP text encoders. ``dreambooth.flow_family`` has the
flow-matching transformers, FLUX.1 and SD 3.x.
"""

from __future__ import annotations

from typing import Any

import torch

from dreambooth.loss import min_snr_weights, snr, training_target
from dreambooth.base_model import FLOW_KINDS
from dreambooth.models import BaseModel, concat_cond, encode_prompts

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # module names; the second is SDXL's


class UNetFamily:
    name = "unet"
    denoiser_name = "unet"  # the BaseModel attribute (and the Trainable's key) of the denoiser

    def denoiser(self, model: BaseModel) -> torch.nn.Module:
        return getattr(model, self.denoiser_name)

    def parts(self, model: BaseModel, cfg) -> dict[str, torch.nn.Module]:
        """The UNet, and the text encoders when they train (SDXL conditions on both)."""
        parts = {"unet": model.unet}
        if cfg.train.train_text_encoder or cfg.train.train_token:
            parts["text_encoder"] = model.text_encoder
        if cfg.train.train_text_encoder and model.text_encoder_2 is not None:
            parts["text_encoder_2"] = model.text_encoder_2
        return parts

    def lora_targets(self, lora_cfg, part: str) -> list[str]:
        return lora_cfg.unet_targets if part == "unet" else lora_cfg.text_encoder_targets

    def encode_prompts(self, model: BaseModel, prompts: list[str], device=None) -> dict[str, Any]:
        return encode_prompts(model, prompts, device)

    def concat_cond(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return concat_cond(a, b)

    def draw_timestep(self, generator: torch.Generator, model: BaseModel) -> torch.Tensor:
        """Uniform on the scheduler's [0, T), as the paper and Stable Diffusion train."""
        return torch.randint(0, model.scheduler.config.num_train_timesteps, (1,), generator=generator)

    def noisy_and_target(self, model: BaseModel, x0, eps, t) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = model.scheduler.add_noise(x0, eps, t)
        return noisy, training_target(model.prediction_type, x0, eps, t, model.scheduler.alphas_cumprod)

    def predict(self, denoiser, noisy, t, cond: dict[str, Any]) -> torch.Tensor:
        return denoiser(noisy, t, **cond).sample

    def loss_weights(self, model: BaseModel, t, snr_gamma: float) -> torch.Tensor | None:
        """Min-SNR-γ weights (Hang et al. 2023) when ``snr_gamma`` is set, else None."""
        if not snr_gamma:
            return None
        return min_snr_weights(snr(t.cpu(), model.scheduler.alphas_cumprod), snr_gamma, model.prediction_type)


UNET = UNetFamily()


def family_of(model: BaseModel, cfg=None):
    """The family of ``model`` (by its ``kind``), with the run's ``flow`` settings for the
    flow-matching kinds (``dreambooth.flow_family``)."""
    if model.kind not in FLOW_KINDS:
        return UNET
    from dreambooth.flow_family import FluxFamily, SD3Family

    cls = FluxFamily if model.kind == "flux1" else SD3Family
    return cls(cfg.flow if cfg is not None else None, model,
               cfg.data.resolution if cfg is not None else model.resolution)
