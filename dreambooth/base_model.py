"""The parts of a text-to-image model that training and sampling use, as one object: a
Stable Diffusion UNet model (SD 1.x, 2.x, SDXL) or a flow-matching transformer (FLUX.1, SD 3.x).

Loading lives in ``dreambooth.models`` and ``dreambooth.single_file``; both build a ``BaseModel``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TINY_NAMES = ("tiny", "tiny-sd2", "tiny-sdxl", "tiny-flux1", "tiny-sd3")
FLOW_KINDS = ("flux1", "sd3")  # flow-matching transformers
PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "flux1": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # single files that unpickle (trust_pickle)
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


@dataclass
class BaseModel:
    """The parts of a model that training and sampling use. The text encoders are named as the
    diffusers pipelines name them: SDXL's second is CLIP-G; FLUX.1's second is T5; SD 3.x has
    CLIP-L, CLIP-G and T5 as the third."""

    unet: Any  # None for the transformer kinds
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any  # the training noise scheduler (DDPM, or flow matching's Euler)
    kind: str  # sd1 | sd2 | sdxl | flux1 | sd3
    source: str  # the path or tiny name it came from
    text_encoder_2: Any = None  # SDXL, FLUX.1, SD 3.x
    tokenizer_2: Any = None
    transformer: Any = None  # FLUX.1, SD 3.x
    text_encoder_3: Any = None  # SD 3.x's T5
    tokenizer_3: Any = None
    native_size: int | None = None  # pixels, when the denoiser's config does not say
    max_sequence_length: int | None = None  # T5 tokens (flow.max_sequence_length); None: the kind's

    @property
    def prediction_type(self) -> str:
        return "flow" if self.kind in FLOW_KINDS else self.scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The size the model was trained at, in pixels (square)."""
        if self.native_size:
            return self.native_size
        denoiser = self.unet if self.unet is not None else self.transformer
        sample_size = getattr(denoiser.config, "sample_size", None)
        if sample_size:
            return sample_size * self.vae_scale_factor
        return getattr(self.vae.config, "sample_size", None) or 1024  # FLUX.1's transformer has no size

    @property
    def t5_length(self) -> int:
        """T5 tokens per prompt: the setting, else FLUX.1's 512 or SD 3.x's 256, at most the tokenizer's."""
        t5 = self.tokenizer_3 if self.kind == "sd3" else self.tokenizer_2
        return min(self.max_sequence_length or (512 if self.kind == "flux1" else 256), t5.model_max_length)

    def components(self) -> dict[str, Any]:
        if self.kind in FLOW_KINDS:
            parts = dict(transformer=self.transformer, vae=self.vae, text_encoder=self.text_encoder,
                         tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
                         tokenizer_2=self.tokenizer_2, scheduler=self.scheduler)
            if self.kind == "sd3":
                parts.update(text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3)
            return parts
        parts = dict(unet=self.unet, vae=self.vae, text_encoder=self.text_encoder,
                     tokenizer=self.tokenizer, scheduler=self.scheduler)
        if self.kind == "sdxl":
            parts.update(text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2)
        return parts

    def modules(self) -> list[Any]:
        """The model's torch modules (not its tokenizers and scheduler)."""
        import torch

        return [m for m in self.components().values() if isinstance(m, torch.nn.Module)]

    def pipeline(self, scheduler=None):
        """A diffusers pipeline over these (shared, not copied) modules."""
        import diffusers

        parts = self.components()
        if scheduler is not None:
            parts["scheduler"] = scheduler
        if self.kind in PIPELINES:
            return getattr(diffusers, PIPELINES[self.kind])(**parts)
        return diffusers.StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )

    def save(self, folder: str | Path) -> Path:
        """Write a diffusers folder that ``DiffusionPipeline.from_pretrained`` loads, under
        transformers 4.x as well as 5.x: CLIP text-encoder weights keep the ``text_model.``
        level and the tokenizers carry ``vocab.json``/``merges.txt`` (``dreambooth.hf_names``)."""
        from dreambooth.hf_names import make_folder_portable

        folder = Path(folder)
        for tokenizer in (self.tokenizer, self.tokenizer_2, self.tokenizer_3):  # else tokenizer.json records the
            backend = getattr(tokenizer, "backend_tokenizer", None)  # last call's padding and
            if backend is not None:  # truncation, and the same model is saved to other bytes
                backend.no_padding()
                backend.no_truncation()
        self.pipeline().save_pretrained(folder, safe_serialization=True)
        make_folder_portable(folder, {"tokenizer": self.tokenizer, "tokenizer_2": self.tokenizer_2})
        return folder

    def identity(self) -> str:
        """A short hash that changes when the weights change (keys the class-image cache)."""
        if self.source in TINY_NAMES:
            h = hashlib.sha256(self.source.encode())
            denoiser = self.unet if self.unet is not None else self.transformer
            for name, p in sorted(denoiser.state_dict().items())[:8]:
                h.update(name.encode() + p.detach().float().numpy().tobytes()[:4096])
            return h.hexdigest()[:16]
        return folder_identity(Path(self.source))


def folder_identity(folder: Path) -> str:
    """Hash of every weight file's name, size and first/last MiB: fast, and changes with the
    weights. ``folder`` may also be a single-file checkpoint."""
    h = hashlib.sha256()
    files = [folder] if folder.is_file() else sorted(folder.rglob("*"))
    for f in files:
        if f.suffix in (*SINGLE_FILE_SUFFIXES, ".json", ".txt") and f.is_file():
            size = f.stat().st_size
            h.update(f"{f.name if f == folder else f.relative_to(folder)}:{size}".encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(-(1 << 20), 2)
                    h.update(fh.read())
    return h.hexdigest()[:16]
