"""The paper's metrics (Ruiz et al. 2022, section 4.1): DINO, CLIP-I, CLIP-T, PRES and DIV.

Three layers, top to bottom:

1. Preprocessing, as the common DreamBooth evaluation protocol does it: resize the shorter side
   to 256 (bicubic), center-crop 224, scale to [0, 1], then each model's own mean/std.
2. Pure metric math on embedding tensors (no files, no models), tested on hand-made vectors.
3. Encoders loaded from local folders (offline, ``local_files_only``), and ``score_images``
   that ties them together.

The metrics:

- DINO:   mean cosine over ALL pairs (generated, real) of DINO ViT-S/16 CLS embeddings.
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T: mean cosine between each generated image and its own prompt's CLIP text embedding,
          the identifier token removed from the prompt ("a sks dog" -> "a dog").
- PRES:   mean pairwise DINO cosine between class-prompt generations of the fine-tuned model
          ("a dog") and the real subject photos; lower is better (less language drift).
- DIV:    1 − mean pairwise DINO cosine among generations of the same prompt (self-pairs
          excluded), averaged over prompts; higher is more diverse. The paper uses LPIPS here,
          which needs torchvision backbones, so this is "DIV (1 − mean pairwise DINO cosine)"
          and its numbers are not comparable with the paper's DIV column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from dreambooth.errors import InputError, ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINO
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE, CROP = 256, 224

DINO_REPO = "facebook/dino-vits16"
CLIP_REPO = "openai/clip-vit-base-patch32"

# ---------------------------------------------------------------- preprocessing


def resize_and_crop(image, resize: int = RESIZE, crop: int = CROP):
    """The PIL image resized so its shorter side is ``resize`` (bicubic, aspect kept; the longer
    side is ``int(resize * long / short)``), then center-cropped to ``crop`` × ``crop``.

    Sizes and offsets follow torchvision's ``Resize(256)`` + ``CenterCrop(224)`` on PIL images
    (offsets ``int(round((size - crop) / 2))``), so numbers match the usual evaluation scripts.
    """
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(resize * long / short)
    new_w, new_h = (resize, new_long) if w <= h else (new_long, resize)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    if new_w < crop or new_h < crop:
        raise ValueError(f"cannot center-crop {crop}x{crop} from a {new_w}x{new_h} image; "
                         f"resize ({resize}) must be at least crop ({crop})")
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))


def preprocess(images: Sequence, mean: Sequence[float], std: Sequence[float],
               resize: int = RESIZE, crop: int = CROP) -> torch.Tensor:
    """PIL images -> (N, 3, crop, crop) float32: resize/crop, scale to [0, 1], ``(x - mean) / std``.

    Any mode (RGBA, L, ...) is converted to RGB first.
    """
    import numpy as np

    if len(images) == 0:
        return torch.empty(0, 3, crop, crop)
    arrays = [np.asarray(resize_and_crop(im, resize, crop), dtype=np.uint8) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


# ---------------------------------------------------------------- pure metric math


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities; rows need not be normalized."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"cosine_matrix expects (N, D) and (M, D) embeddings, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    dtype = dtype if dtype.is_floating_point else torch.float32
    a = torch.nn.functional.normalize(a.double(), dim=1)
    b = torch.nn.functional.normalize(b.double(), dim=1)
    return (a @ b.T).to(dtype)  # computed in float64, returned in the inputs' dtype


def mean_pairwise_cosine(gen: torch.Tensor, real: torch.Tensor) -> float:
    """Mean cosine over all N × M pairs of (N, D) generated and (M, D) real embeddings.

    With DINO embeddings this is the paper's DINO score; with CLIP image embeddings, CLIP-I.
    """
    if len(gen) == 0 or len(real) == 0:
        raise ValueError(f"need at least one embedding on each side, "
                         f"got {len(gen)} and {len(real)}")
    return float(cosine_matrix(gen.double(), real.double()).mean())


def clip_t(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Mean cosine of each image with its own prompt: (N, D) images, (N, D) texts, row i with
    row i. Repeat a prompt's text embedding once per image generated from it."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2 or len(image_emb) == 0:
        raise ValueError(f"clip_t pairs image i with text i: expected two (N, D) tensors of the "
                         f"same shape, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    a = torch.nn.functional.normalize(image_emb.double(), dim=1)
    b = torch.nn.functional.normalize(text_emb.double(), dim=1)
    return float((a * b).sum(dim=1).mean())


def pres(class_gen_emb: torch.Tensor, real_emb: torch.Tensor) -> float:
    """Prior preservation: mean pairwise cosine between (N, D) embeddings of the fine-tuned
    model's class-prompt generations ("a dog") and (M, D) real subject photos. Lower is better:
    a high value means the class prior collapsed onto the subject."""
    return mean_pairwise_cosine(class_gen_emb, real_emb)


def div(emb: torch.Tensor) -> float:
    """DIV (1 − mean pairwise DINO cosine) of (N, D) embeddings of one prompt's generations,
    over the N(N−1) ordered pairs i ≠ j. 0 for identical images; needs N ≥ 2."""
    n = len(emb)
    if n < 2:
        raise ValueError(f"diversity needs at least 2 images of the same prompt, got {n}")
    sims = cosine_matrix(emb.double(), emb.double())
    off_diagonal = sims.sum() - sims.diagonal().sum()
    return float(1.0 - off_diagonal / (n * (n - 1)))


def strip_identifier(prompt: str, token: str) -> str:
    """The prompt without the identifier token, for CLIP-T: "a photo of sks dog on the beach"
    -> "a photo of dog on the beach". Whole words only ("sksx" stays), case-insensitive (CLIP
    lower-cases text), whitespace collapsed."""
    token = token.strip()
    if not token:
        return " ".join(prompt.split())
    pattern = rf"(?<![\w]){re.escape(token)}(?![\w])"
    return " ".join(re.sub(pattern, " ", prompt, flags=re.IGNORECASE).split())


# ---------------------------------------------------------------- encoders (local folders)


def _no_grad_batches(fn, items: Sequence, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        out = [fn(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def _features(out) -> torch.Tensor:
    """CLIP ``get_*_features`` returns a tensor in transformers 4.x and an output object whose
    ``pooler_output`` holds the projected embedding in 5.x."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclass
class DinoEncoder:
    """DINO ViT: the CLS token of the last hidden state (after the final layer norm)."""

    model: Any
    batch_size: int = 16

    @property
    def crop(self) -> int:
        return int(self.model.config.image_size)

    def embed_images(self, images: Sequence) -> torch.Tensor:
        """PIL images -> (N, D) L2-normalized CLS embeddings."""
        crop = self.crop

        def run(batch):
            x = preprocess(batch, IMAGENET_MEAN, IMAGENET_STD, RESIZE * crop // CROP, crop)
            cls = self.model(pixel_values=x.to(self.model.device)).last_hidden_state[:, 0]
            return torch.nn.functional.normalize(cls.float().cpu(), dim=-1)

        return _no_grad_batches(run, list(images), self.batch_size)


@dataclass
class ClipEncoder:
    """CLIP: projected image and text embeddings, in the same space."""

    model: Any
    tokenizer: Any
    batch_size: int = 16
    max_length: int = 77

    @property
    def crop(self) -> int:
        return int(self.model.config.vision_config.image_size)

    def embed_images(self, images: Sequence) -> torch.Tensor:
        """PIL images -> (N, P) L2-normalized image embeddings."""
        crop = self.crop

        def run(batch):
            x = preprocess(batch, CLIP_MEAN, CLIP_STD, RESIZE * crop // CROP, crop)
            emb = _features(self.model.get_image_features(pixel_values=x.to(self.model.device)))
            return torch.nn.functional.normalize(emb.float().cpu(), dim=-1)

        return _no_grad_batches(run, list(images), self.batch_size)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> (N, P) L2-normalized text embeddings (padded to 77 tokens, truncated)."""

        def run(batch):
            tok = self.tokenizer(list(batch), padding="max_length", max_length=self.max_length,
                                 truncation=True, return_tensors="pt").to(self.model.device)
            emb = _features(self.model.get_text_features(
                input_ids=tok.input_ids, attention_mask=tok.attention_mask))
            return torch.nn.functional.normalize(emb.float().cpu(), dim=-1)

        return _no_grad_batches(run, list(texts), self.batch_size)


def _how_to_get(what: str, repo: str, flag: str) -> str:
    return (f"Nothing is downloaded: fetch {what} once elsewhere with "
            f"`huggingface-cli download {repo} --local-dir DIR`, copy DIR here, and pass it "
            f"with `{flag} DIR` (or set it in the config).")


def _check_folder(path: str | Path, what: str, repo: str, flag: str, model_type: str,
                  needs_tokenizer: bool = False) -> Path:
    """The folder, or a ModelError that says what should be there and how to get it."""
    import json

    how = _how_to_get(what, repo, flag)
    if path is None or str(path).strip() == "":
        raise ModelError(f"no {what} folder given. {how}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        state = "is a file, not a folder" if folder.exists() else "does not exist"
        raise ModelError(f"{what} folder {folder} {state}. Expected a transformers folder with "
                         f"config.json and model.safetensors (or pytorch_model.bin). {how}")
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
    config_path = folder / "config.json"
    weights = [folder / n for n in ("model.safetensors", "pytorch_model.bin",
                                    "model.safetensors.index.json", "pytorch_model.bin.index.json")]
    if not config_path.is_file() or not any(w.is_file() for w in weights):
        raise ModelError(f"{folder} is not a {what} folder: expected config.json and "
                         f"model.safetensors (or pytorch_model.bin), found: {found}. {how}")
    found_type = json.loads(config_path.read_text()).get("model_type")
    if found_type != model_type:
        raise ModelError(f"{folder} holds a '{found_type}' model, but {flag} needs {what} "
                         f"(model_type '{model_type}', e.g. {repo}). {how}")
    has_tokenizer = (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
    if needs_tokenizer and not has_tokenizer:
        raise ModelError(f"{folder} has CLIP weights but no tokenizer (tokenizer.json, or "
                         f"vocab.json + merges.txt), found: {found}. {how}")
    return folder


def tiny_encoders(seed: int = 0):
    """Random DINO-shaped ViT and CLIP models (one layer, 32 wide) with the real CLIP tokenizer:
    what ``--dino tiny`` / ``--clip tiny`` load. Their scores check the pipeline; they measure
    nothing."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from dreambooth.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    vit = ViTModel(ViTConfig(image_size=224, patch_size=32, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=1, intermediate_size=64), add_pooling_layer=False)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=1, max_position_embeddings=77, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=49407)
    vision = dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=1)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    return vit.eval(), clip.eval(), clip_tokenizer()


def load_dino(path: str | Path, device: str = "cpu", batch_size: int = 16) -> DinoEncoder:
    """DINO ViT from a local transformers folder (e.g. facebook/dino-vits16), eval mode, fp32;
    "tiny" gives a random in-process one (see ``tiny_encoders``)."""
    if str(path) == "tiny":
        return DinoEncoder(tiny_encoders()[0].to(device), batch_size)
    folder = _check_folder(path, "the DINO ViT-S/16 model", DINO_REPO, "--dino", "vit")
    from transformers import ViTModel

    try:
        model = ViTModel.from_pretrained(folder, add_pooling_layer=False, local_files_only=True,
                                         dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the DINO model in {folder}: {e}. "
                         + _how_to_get("the DINO ViT-S/16 model", DINO_REPO, "--dino")) from e
    return DinoEncoder(model.to(device).eval(), batch_size)


def load_clip(path: str | Path, device: str = "cpu", batch_size: int = 16) -> ClipEncoder:
    """CLIP model and tokenizer from one local transformers folder (e.g.
    openai/clip-vit-base-patch32), eval mode, fp32; "tiny": random in-process."""
    if str(path) == "tiny":
        _, model, tokenizer = tiny_encoders()
        return ClipEncoder(model.to(device), tokenizer, batch_size)
    what = "the CLIP ViT-B/32 model"
    folder = _check_folder(path, what, CLIP_REPO, "--clip", "clip", needs_tokenizer=True)
    from transformers import CLIPModel, CLIPTokenizer

    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the CLIP model in {folder}: {e}. "
                         + _how_to_get(what, CLIP_REPO, "--clip")) from e
    return ClipEncoder(model.to(device).eval(), tokenizer, batch_size)


@dataclass
class Encoders:
    """The two evaluation encoders, loaded from local folders."""

    dino: DinoEncoder
    clip: ClipEncoder

    @classmethod
    def load(cls, dino: str | Path, clip: str | Path, device: str = "cpu") -> "Encoders":
        return cls(load_dino(dino, device), load_clip(clip, device))


# ---------------------------------------------------------------- scoring


def score_images(generated: dict[str, list], real: list, token: str, dino: DinoEncoder,
                 clip: ClipEncoder, class_generated: list | dict[str, list] | None = None
                 ) -> dict[str, float | None]:
    """The paper's scores for one subject.

    ``generated``: prompt (with the identifier) -> images generated from it. ``real``: the
    subject's photos. ``class_generated``: the fine-tuned model's images for the class prompt
    (a list, or a dict prompt -> images), for PRES. Returns ``dino``, ``clip_i``, ``clip_t``,
    ``div`` (mean over prompts with at least 2 images; None if none has) and, when
    ``class_generated`` is given, ``pres``.
    """
    prompts = [p for p, ims in generated.items() if len(ims) > 0]
    if not prompts:
        raise InputError("no generated images to score: give at least one prompt with images")
    if len(real) == 0:
        raise InputError("no real subject photos to compare with: give the subject's photos")
    images = [im for p in prompts for im in generated[p]]
    owner = [i for i, p in enumerate(prompts) for _ in generated[p]]  # prompt index per image

    gen_dino, real_dino = dino.embed_images(images), dino.embed_images(real)
    gen_clip, real_clip = clip.embed_images(images), clip.embed_images(real)
    texts = clip.embed_texts([strip_identifier(p, token) for p in prompts])

    scores: dict[str, float | None] = {
        "dino": mean_pairwise_cosine(gen_dino, real_dino),
        "clip_i": mean_pairwise_cosine(gen_clip, real_clip),
        "clip_t": clip_t(gen_clip, texts[torch.tensor(owner)]),
    }
    if class_generated is not None:
        cls_images = ([im for ims in class_generated.values() for im in ims]
                      if isinstance(class_generated, dict) else list(class_generated))
        if not cls_images:
            raise InputError("class_generated is empty: give the fine-tuned model's class-prompt "
                             "images for PRES, or leave it out")
        scores["pres"] = pres(dino.embed_images(cls_images), real_dino)
    owner_t = torch.tensor(owner)
    per_prompt = [div(gen_dino[owner_t == i]) for i in range(len(prompts))
                  if int((owner_t == i).sum()) >= 2]
    scores["div"] = sum(per_prompt) / len(per_prompt) if per_prompt else None
    return scores
