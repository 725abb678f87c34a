"""DreamBooth loss: pure functions of tensors (no models, no files).

Shapes: latents, noise, pred, target are (B, C, H, W); timesteps are (B,) integer;
``alphas_cumprod`` is the (T,) cumulative product of the noise schedule.

The batch holds the instance half first (``num_instance`` rows) and the class half after it.
The paper's objective (Ruiz et al. 2022, eq. 2) is

    L = E[ w_t || x̂(α_t x + σ_t ε, c) - x ||² ]  +  λ · E[ w_t' || x̂(α_t' x_pr + σ_t' ε', c_pr) - x_pr ||² ]

written here for the noise (or v) prediction that Stable Diffusion is trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossParts:
    total: torch.Tensor  # instance + weight * prior; what is backpropagated
    instance: torch.Tensor
    prior: torch.Tensor  # 0 when the batch has no class half


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio α²/σ² = ᾱ_t / (1 - ᾱ_t) at each timestep, shape (B,)."""
    a = alphas_cumprod.to(torch.float64)[timesteps]
    return (a / (1.0 - a)).to(torch.float32)


def v_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ_t · ε − √(1−ᾱ_t) · x₀ (Salimans & Ho 2022), the SD 2.x 768 training target."""
    a = alphas_cumprod.to(latents.device, torch.float32)[timesteps].view(-1, 1, 1, 1)
    return a.sqrt() * noise - (1.0 - a).sqrt() * latents


def training_target(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return v_target(latents, noise, timesteps, alphas_cumprod)
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got '{prediction_type}'")


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), shape (B,).

    For ε-prediction the weight is min(SNR, γ) / SNR; for v-prediction min(SNR, γ) / (SNR + 1),
    because the v loss already carries a factor (SNR + 1) relative to the x₀ loss.
    """
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1.0)
    return clipped / snr_t


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every dimension but the batch, in float32: shape (B,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE over the cells where ``mask`` (B, 1, H, W), in [0, 1], is set:
    Σ m·(pred − target)² / (C · Σ m), in float32, shape (B,). A mask of ones gives
    ``per_sample_mse``; an all-zero mask gives 0."""
    m = mask.float()
    err = ((pred.float() - target.float()).pow(2) * m).flatten(1).sum(dim=1)
    return err / (m.flatten(1).sum(dim=1) * pred.shape[1]).clamp_min(1e-12)


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, num_instance: int,
                    prior_weight: float = 1.0, weights: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None) -> LossParts:
    """Instance loss + λ · prior loss over a batch whose first ``num_instance`` rows are instances.

    Each half is the mean of its per-sample (optionally weighted) MSE, so λ = 1 weighs the two
    halves equally whatever their sizes. With λ = 0 the total equals the instance loss exactly.
    ``mask`` (B, 1, H, W) restricts each sample's MSE to its masked cells (``masked_mse``).
    """
    per = per_sample_mse(pred, target) if mask is None else masked_mse(pred, target, mask)
    if weights is not None:
        per = per * weights.to(per.device, per.dtype)
    instance = per[:num_instance].mean()
    if per.shape[0] > num_instance:
        prior = per[num_instance:].mean()
        total = instance + prior_weight * prior if prior_weight else instance
    else:
        prior = torch.zeros((), dtype=per.dtype, device=per.device)
        total = instance
    return LossParts(total=total, instance=instance, prior=prior)


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Add a per-sample, per-channel constant (Guttenberg 2023) so the model can learn dark/bright
    images: ε + offset · n with n ~ N(0, 1) of shape (B, C, 1, 1)."""
    if not offset:
        return noise
    shift = torch.randn(noise.shape[:2] + (1, 1), generator=generator, dtype=noise.dtype)
    return noise + offset * shift.to(noise.device)
