"""Flow-matching math for FLUX.1 and Stable Diffusion 3 / 3.5: pure functions of tensors.

Rectified flow (Esser et al. 2024, "Scaling Rectified Flow Transformers", the SD3 paper, §2–3)
joins the data x₀ and the noise ε by a straight line and trains the transformer to predict its
velocity:

    x_σ = (1 − σ) x₀ + σ ε,   σ ∈ [0, 1]          (σ = 1: pure noise)
    v   = dx_σ/dσ = ε − x₀                         (the target)

A training step, as diffusers' reference scripts do it (examples/dreambooth/
train_dreambooth_lora_flux.py and train_dreambooth_lora_sd3.py):

    u = sample_u(gen, B, "logit_normal")                 # compute_density_for_timestep_sampling
    sigmas, timesteps = sigmas_from_u(u, *train_schedule(1000, shift))
    noisy = noised(x0, eps, sigmas); target = flow_target(x0, eps)
    loss = mean_b( loss_weights(scheme, sigmas)_b · mean((pred − target)²)_b )

which is ``dreambooth.loss.dreambooth_loss(pred, target, n, λ, weights=loss_weights(...))``.
The SD3 transformer takes ``timesteps`` (0…1000), FLUX.1's takes ``timesteps / 1000`` (it
multiplies by 1000 inside). FLUX.1 also takes its latents packed into 2×2 patches
(``pack_latents``) with position ids (``latent_image_ids``), and FLUX.1 [dev] a guidance value
(``guidance_vector``).

Shapes: x0, noise (B, C, H, W) latents (any (B, ...) for the noising math); sigmas, u,
timesteps (B,); a schedule is (T,), T = num_train_timesteps, ordered from σ = 1 down.
"""

from __future__ import annotations

import math

import torch

SAMPLING_SCHEMES = ("uniform", "logit_normal", "mode")
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "cosmap")


def noised(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ) x₀ + σ ε (SD3 paper §2–3, rectified flow; the scripts'
    ``noisy_model_input``). x0, noise (B, ...); sigmas (B,) or (B, 1, ...), cast to x0's dtype."""
    s = sigmas.to(x0.device, x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity v = ε − x₀ that the transformer predicts (the scripts' ``noise - model_input``),
    same shape as x0."""
    return noise - x0


def x0_from_velocity(noisy: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x̂₀ = x_σ − σ v, shape of ``noisy``: train_dreambooth_lora_sd3.py's ``--precondition_outputs``
    (default 1) turns the prediction into this and trains it toward x₀, which is the velocity
    loss weighted by σ² (x̂₀ − x₀ = −σ (v̂ − v))."""
    s = sigmas.to(noisy.device, noisy.dtype).reshape(-1, *([1] * (noisy.ndim - 1)))
    return noisy - s * velocity


def mode_map(u: torch.Tensor, scale: float = 1.29) -> torch.Tensor:
    """The SD3 paper's mode sampling (§3.1): f(u) = 1 − u − s (cos²(π u / 2) − 1 + u), applied
    elementwise to uniform u; symmetric about ½ (f(1 − u) = 1 − f(u)), which it favours for s > 0,
    and monotone in [0, 1] for −1 ≤ s ≤ 2 / (π − 2)."""
    return 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


def sample_u(generator: torch.Generator, n: int, scheme: str = "uniform", logit_mean: float = 0.0,
             logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """n draws of the training time u ∈ [0, 1], shape (n,), on the generator's device: ``uniform``,
    ``logit_normal`` (sigmoid of N(mean, std²); SD3 paper §3.1, its best setting mean 0, std 1)
    or ``mode`` (``mode_map`` of a uniform draw). The same torch ops as diffusers'
    ``compute_density_for_timestep_sampling``, so equal seeds give equal values."""
    device = generator.device
    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(mean=logit_mean, std=logit_std, size=(n,), device=device,
                                          generator=generator))
    if scheme == "mode":
        return mode_map(torch.rand(size=(n,), device=device, generator=generator), mode_scale)
    if scheme == "uniform":
        return torch.rand(size=(n,), device=device, generator=generator)
    raise ValueError(f"timestep sampling must be one of {SAMPLING_SCHEMES}, got '{scheme}'")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Static timestep shift σ' = s σ / (1 + (s − 1) σ), elementwise (SD3 paper §5.3.2 with
    s = √(m/n); FlowMatchEulerDiscreteScheduler's ``shift``: 3.0 for SD3 / 3.5). s > 1 moves
    training and sampling toward noise; s = 1 is the identity."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX.1's resolution-dependent μ, linear in the packed sequence length (H/2)(W/2) of the
    latents: base_shift at base_seq_len (256 px), max_shift at max_seq_len (1024 px), extrapolated
    beyond (BFL flux ``sampling.get_lin_function``; diffusers ``flux.calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def time_shift(mu: float, sigmas: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """FLUX.1's shift exp(μ) / (exp(μ) + (1/σ − 1)^power), elementwise; σ = 0 maps to 0 (BFL flux
    ``sampling.time_shift``; the scheduler's ``use_dynamic_shifting``). With power 1 it is
    ``shift_sigmas(sigmas, exp(μ))``."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** power)


def train_schedule(num_train_timesteps: int = 1000, shift: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps), each (T,) float32 from σ = 1 down to 1/T, shifted by ``shift``: the grid
    that FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift) holds before set_timesteps
    and that the reference scripts index. A scheduler with ``use_dynamic_shifting`` (FLUX.1 [dev])
    ignores its ``shift`` there: its grid is ``train_schedule(T, 1.0)``."""
    sigmas = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32) / num_train_timesteps
    if shift != 1.0:
        sigmas = shift_sigmas(sigmas, shift)
    return sigmas, sigmas * num_train_timesteps


def sigmas_from_u(u: torch.Tensor, schedule_sigmas: torch.Tensor, schedule_timesteps: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training (sigmas, timesteps), each (B,), for u (B,) in [0, 1], as the reference scripts
    pick them: ``indices = (u * T).long()`` into the scheduler's (T,) grid (``train_schedule``),
    so u near 0 is σ near 1. The index is clamped to [0, T − 1], which changes nothing but u = 1
    (``mode`` gives it for a uniform draw of exactly 0), where the scripts would fail."""
    n = schedule_sigmas.shape[0]
    indices = (u * n).long().clamp(0, n - 1).to(schedule_sigmas.device)
    return schedule_sigmas[indices], schedule_timesteps.to(schedule_sigmas.device)[indices]


def loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights, shape of sigmas (diffusers ``compute_loss_weighting_for_sd3``):
    ``none`` 1; ``sigma_sqrt`` σ⁻² (meant for the x₀ loss of ``x0_from_velocity``, where it
    cancels the σ²; huge near σ = 0); ``cosmap`` 2 / (π (1 − 2σ + 2σ²)) (SD3 paper §3.1)."""
    if scheme == "none":
        return torch.ones_like(sigmas)
    if scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    raise ValueError(f"loss weighting must be one of {WEIGHTING_SCHEMES}, got '{scheme}'")


def script_scheme(weighting_scheme: str) -> tuple[str, str]:
    """(timestep sampling, loss weighting) for the reference scripts' single ``--weighting_scheme``:
    ``logit_normal`` and ``mode`` change the sampling and weigh uniformly; ``sigma_sqrt`` and
    ``cosmap`` sample uniformly and weigh; ``none`` does neither."""
    if weighting_scheme in ("logit_normal", "mode"):
        return weighting_scheme, "none"
    if weighting_scheme in ("sigma_sqrt", "cosmap", "none"):
        return "uniform", weighting_scheme
    raise ValueError(f"weighting_scheme must be one of logit_normal, mode, sigma_sqrt, cosmap, none, "
                     f"got '{weighting_scheme}'")


def _check_even(h: int, w: int) -> None:
    if h % 2 or w % 2:
        raise ValueError(f"FLUX.1 packs 2×2 latent patches: latent height and width must be even, "
                         f"got {h}×{w}")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, (H/2)(W/2), 4C): 2×2 patches in row-major order, each patch's features
    channel-major then row, column (BFL flux ``rearrange "b c (h ph) (w pw) -> b (h w) (c ph pw)"``;
    diffusers ``FluxPipeline._pack_latents``). H and W must be even."""
    b, c, h, w = latents.shape
    _check_even(h, w)
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, (H/2)(W/2), 4C) → (B, C, H, W), the inverse of ``pack_latents``. ``height`` and ``width``
    are the LATENT sizes H, W (diffusers' ``FluxPipeline._unpack_latents`` takes pixel sizes and
    the VAE's scale factor instead)."""
    _check_even(height, width)
    b, _, d = packed.shape
    x = packed.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """FLUX.1's position ids of the packed latents, ((H/2)(W/2), 3): row k = (0, patch row, patch
    column) in ``pack_latents``' order, for latent sizes H, W (BFL flux ``sampling.prepare``;
    diffusers ``FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, ...)``)."""
    _check_even(height, width)
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


def guidance_vector(batch: int, scale: float, device=None) -> torch.Tensor:
    """FLUX.1 [dev]'s distilled-guidance input, (B,) float32 filled with ``scale``, passed as the
    transformer's ``guidance`` when its config has ``guidance_embeds`` (FLUX.1 [schnell] has none:
    pass None). The reference script uses ``--guidance_scale`` (default 3.5; its README's
    DreamBooth commands pass 1); the transformer multiplies it by 1000 as it does the timestep."""
    return torch.full((batch,), float(scale), dtype=torch.float32, device=device)
