"""The flow-matching transformer families: FLUX.1 (dev, schnell) and Stable Diffusion 3 / 3.5.

They implement the interface of ``dreambooth.family`` with rectified-flow training (the math is in
``dreambooth.flow``): a sample's time u is drawn by ``flow.timestep_sampling``, mapped onto the
scheduler's (shifted) σ grid as the diffusers reference scripts do, the latents are noised to
(1 − σ) x₀ + σ ε, and the transformer is trained toward the velocity ε − x₀, weighted per
sample by ``flow.weighting``. T5 never trains: its embedding of each prompt is computed once and
cached. The CLIP text encoders can train (full or LoRA).
"""

from __future__ import annotations

from typing import Any

import torch

from dreambooth import flow
from dreambooth.models import BaseModel, concat_cond, tokenize


class FlowFamily:
    denoiser_name = "transformer"

    def __init__(self, settings=None, model: BaseModel | None = None, resolution: int | None = None):
        from dreambooth.config import FlowConfig

        self.settings = settings or FlowConfig()
        self.resolution = resolution
        self._t5: dict[str, torch.Tensor] = {}  # prompt -> T5 embedding, (1, L, D)
        self._grid = None  # the scheduler's (sigmas, timesteps) training grid

    def denoiser(self, model: BaseModel) -> torch.nn.Module:
        return model.transformer

    def parts(self, model: BaseModel, cfg) -> dict[str, torch.nn.Module]:
        """The transformer, and the CLIP text encoders when they train (T5 never does)."""
        parts = {"transformer": model.transformer}
        if cfg.train.train_text_encoder or cfg.train.train_token:
            parts["text_encoder"] = model.text_encoder
        if cfg.train.train_text_encoder and model.kind == "sd3":
            parts["text_encoder_2"] = model.text_encoder_2
        return parts

    def lora_targets(self, lora_cfg, part: str) -> list[str]:
        return lora_cfg.transformer_targets if part == "transformer" else lora_cfg.text_encoder_targets

    def concat_cond(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return concat_cond(a, b)

    # ------------------------------------------------------------------ time and noise

    def draw_timestep(self, generator: torch.Generator, model: BaseModel) -> torch.Tensor:
        """One training timestep σ·T, shape (1,), float: u by ``flow.timestep_sampling``, then the
        scheduler's σ grid at index ⌊u·T⌋ (the reference scripts' pick), or with
        ``flow.resolution_shift`` FLUX.1's shift for the training resolution."""
        s, num_t = self.settings, model.scheduler.config.num_train_timesteps
        u = flow.sample_u(generator, 1, s.timestep_sampling, s.logit_mean, s.logit_std, s.mode_scale)
        if self._grid is None:  # unshifted when the resolution's shift applies instead
            self._grid = flow.train_schedule(num_t, 1.0 if s.resolution_shift else self.shift(model))
        sigma, t = flow.sigmas_from_u(u, *self._grid)
        if not s.resolution_shift:
            return t
        side = self.resolution // model.vae_scale_factor
        return flow.time_shift(flow.flux_mu((side // 2) ** 2), sigma) * num_t

    def shift(self, model: BaseModel) -> float:
        """``flow.shift``, else the scheduler's static shift (none where it shifts dynamically)."""
        config = model.scheduler.config
        return self.settings.shift or (1.0 if config.get("use_dynamic_shifting") else config.get("shift", 1.0))

    def noisy_and_target(self, model: BaseModel, x0, eps, t) -> tuple[torch.Tensor, torch.Tensor]:
        sigmas = t / model.scheduler.config.num_train_timesteps
        return flow.noised(x0, eps, sigmas), flow.flow_target(x0, eps)

    def loss_weights(self, model: BaseModel, t, snr_gamma: float) -> torch.Tensor:
        return flow.loss_weights(self.settings.weighting, t.float().cpu() / model.scheduler.config.num_train_timesteps)

    # ------------------------------------------------------------------ text

    def t5(self, model: BaseModel, prompts: list[str], device) -> torch.Tensor:
        """T5's last hidden state for ``prompts``, (B, L, D), each prompt encoded once."""
        encoder, tokenizer = (model.text_encoder_3, model.tokenizer_3) if model.kind == "sd3" else \
            (model.text_encoder_2, model.tokenizer_2)
        for p in dict.fromkeys(prompts):
            if p not in self._t5:
                ids = tokenizer([p], padding="max_length", max_length=model.t5_length, truncation=True,
                                return_tensors="pt").input_ids
                encoder.eval()  # frozen: never its dropout
                with torch.no_grad():
                    self._t5[p] = encoder(ids.to(encoder.device))[0]
        return torch.cat([self._t5[p] for p in prompts]).to(device)


class FluxFamily(FlowFamily):
    """FLUX.1: CLIP-L's pooled output and T5's hidden states condition a transformer over 2×2
    packed latent patches; [dev] also takes a distilled-guidance value (``flow.guidance``)."""

    name = "flux1"

    def __init__(self, settings=None, model: BaseModel | None = None, resolution: int | None = None):
        super().__init__(settings, model, resolution)
        self.guidance_embeds = bool(model is not None and model.transformer.config.guidance_embeds)

    def encode_prompts(self, model: BaseModel, prompts: list[str], device=None) -> dict[str, Any]:
        device = device or model.transformer.device
        pooled = model.text_encoder(tokenize(model.tokenizer, prompts).to(device), output_hidden_states=False)
        return {"encoder_hidden_states": self.t5(model, prompts, device), "pooled_projections": pooled.pooler_output}

    def predict(self, denoiser, noisy, t, cond: dict[str, Any]) -> torch.Tensor:
        b, _, h, w = noisy.shape
        text = cond["encoder_hidden_states"]
        guidance = flow.guidance_vector(b, self.settings.guidance, noisy.device) if self.guidance_embeds else None
        out = denoiser(hidden_states=flow.pack_latents(noisy), timestep=t / 1000, guidance=guidance,
                       pooled_projections=cond["pooled_projections"], encoder_hidden_states=text,
                       txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                       img_ids=flow.latent_image_ids(h, w, noisy.device, noisy.dtype), return_dict=False)[0]
        return flow.unpack_latents(out, h, w)


class SD3Family(FlowFamily):
    """Stable Diffusion 3 / 3.5: CLIP-L and CLIP-G side by side (their penultimate layers, padded
    to T5's width) followed by T5's tokens, and both CLIPs' pooled outputs, condition an MMDiT."""

    name = "sd3"

    def encode_prompts(self, model: BaseModel, prompts: list[str], device=None) -> dict[str, Any]:
        device = device or model.transformer.device
        hidden, pooled = [], []
        for encoder, tokenizer in ((model.text_encoder, model.tokenizer), (model.text_encoder_2, model.tokenizer_2)):
            out = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        t5 = self.t5(model, prompts, device)
        clip = torch.nn.functional.pad(torch.cat(hidden, dim=-1), (0, t5.shape[-1] - sum(h.shape[-1] for h in hidden)))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, dim=-1)}

    def predict(self, denoiser, noisy, t, cond: dict[str, Any]) -> torch.Tensor:
        return denoiser(hidden_states=noisy, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                        pooled_projections=cond["pooled_projections"], return_dict=False)[0]
