"""The parts of a Stable Diffusion model that training and sampling use, as one object.

Loading lives in ``dreambooth.models`` and ``dreambooth.single_file``; both build a ``BaseModel``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TINY_NAMES = ("tiny", "tiny-sd2", "tiny-sdxl")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # single files that unpickle (trust_pickle)
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


@dataclass
class BaseModel:
    """The parts of a Stable Diffusion model that training and sampling use."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any  # the training noise scheduler (DDPM)
    kind: str  # sd1 | sd2 | sdxl
    source: str  # the path or tiny name it came from
    text_encoder_2: Any = None  # SDXL only
    tokenizer_2: Any = None

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def components(self) -> dict[str, Any]:
        parts = dict(unet=self.unet, vae=self.vae, text_encoder=self.text_encoder,
                     tokenizer=self.tokenizer, scheduler=self.scheduler)
        if self.kind == "sdxl":
            parts.update(text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2)
        return parts

    def pipeline(self, scheduler=None):
        """A diffusers pipeline over these (shared, not copied) modules."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        parts = self.components()
        if scheduler is not None:
            parts["scheduler"] = scheduler
        if self.kind == "sdxl":
            return StableDiffusionXLPipeline(**parts)
        return StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )

    def save(self, folder: str | Path) -> Path:
        """Write a diffusers folder that ``DiffusionPipeline.from_pretrained`` loads, under
        transformers 4.x as well as 5.x: CLIP text-encoder weights keep the ``text_model.``
        level and the tokenizers carry ``vocab.json``/``merges.txt`` (``dreambooth.hf_names``)."""
        from dreambooth.hf_names import make_folder_portable

        folder = Path(folder)
        for tokenizer in (self.tokenizer, self.tokenizer_2):  # else tokenizer.json records the
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
            for name, p in sorted(self.unet.state_dict().items())[:8]:
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
