"""Base models: load a local diffusers folder (SD 1.x, 2.x, SDXL, FLUX.1, SD 3.x) or single-file
checkpoint (SD 1.x, 2.x, SDXL), or build a tiny one in-process (``dreambooth.tiny``); encode
prompts and latents for the UNet kinds.

Nothing here downloads: loading is ``local_files_only`` and ``HF_HUB_OFFLINE=1`` is set by the
CLI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dreambooth.base_model import PICKLE_SUFFIXES, SINGLE_FILE_SUFFIXES, TINY_NAMES, BaseModel
from dreambooth.errors import ModelError
from dreambooth.tiny import build_tiny

WORLD_MODEL = Path(__file__).parent / "world" / "model"  # the shipped self-trained base model
WORLD_FLUX_MODEL = Path(__file__).parent / "world" / "flux-model"  # its flow-matching (FLUX.1) twin
WORLD_MODELS = {"world": WORLD_MODEL, "world-flux": WORLD_FLUX_MODEL}
EXPECTED = "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/"


# ---------------------------------------------------------------- local folders


def _detect_kind(folder: Path, index: dict) -> str:
    pipeline = index.get("_class_name", "")
    if pipeline.startswith("Flux") or pipeline.startswith("StableDiffusion3"):
        return "flux1" if pipeline.startswith("Flux") else "sd3"
    if "XL" in pipeline or "text_encoder_2" in index:
        return "sdxl"
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    te = json.loads((folder / "text_encoder" / "config.json").read_text())
    if sched.get("prediction_type") == "v_prediction" or te.get("hidden_size") == 1024:
        return "sd2"
    return "sd1"


def check_model_folder(folder: Path, without: tuple = ()) -> dict:
    """Return model_index.json's content, or explain what a model folder should hold."""
    if not folder.exists():
        raise ModelError(
            f"model not found: {folder}. Give a local diffusers folder ({EXPECTED}) or 'tiny'. "
            "Nothing is downloaded: fetch the model once elsewhere, e.g. with "
            "`huggingface-cli download REPO --local-dir FOLDER`, and copy the folder here."
        )
    if folder.is_file():
        raise ModelError(
            f"{folder} is a file, but not a checkpoint this loads: give a diffusers folder "
            f"({EXPECTED}) or a single-file checkpoint (.safetensors; .ckpt/.pt/.bin with "
            "--trust-pickle)."
        )
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
        raise ModelError(
            f"{folder} is not a diffusers model folder: model_index.json is missing "
            f"(found: {found}). Expected {EXPECTED}."
        )
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{index_path} cannot be read ({e}): the folder is damaged; copy it again") from None
    if not isinstance(index, dict):
        raise ModelError(f"{index_path} is not a diffusers model index (a JSON object): copy the folder again")
    needed = ["transformer" if "transformer" in index else "unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    needed += [name for n in (2, 3) for name in (f"text_encoder_{n}", f"tokenizer_{n}") if f"text_encoder_{n}" in index]
    missing = [n for n in needed if not (folder / n).is_dir() and n not in without]
    if missing:
        raise ModelError(
            f"{folder} is incomplete: missing {', '.join(m + '/' for m in missing)}. "
            f"A Stable Diffusion folder holds {EXPECTED}."
        )
    return index


def check_weight_files(folder: Path, parts: list[str], trust_pickle: bool = False) -> bool:
    """Whether every weight folder in ``parts`` holds ``.safetensors`` weights (then only those
    are read). A part with only pickle weights (``.bin``/``.pt``/``.ckpt``) is refused unless
    ``trust_pickle`` (this invocation's --trust-pickle); a part with no weights is an error."""
    pickled = []
    for part in parts:
        files = [f for f in (folder / part).iterdir() if f.is_file()]
        if any(f.suffix == ".safetensors" for f in files):
            continue
        found = [f.name for f in files if f.suffix.lower() in PICKLE_SUFFIXES]
        if not found:
            raise ModelError(f"{folder / part} holds no weights (no .safetensors file): the folder "
                             "is incomplete; copy it again")
        pickled.append(f"{part}/{found[0]}")
    if pickled and not trust_pickle:
        raise ModelError(
            f"{folder} stores {', '.join(pickled)} as pickle, and reading pickle can run code "
            "hidden in the file, so it is refused. Convert the folder to .safetensors (e.g. "
            "`pipe.save_pretrained(DIR, safe_serialization=True)` on a machine you trust), or pass "
            "--trust-pickle on this command if you trust its source")
    return not pickled


def load_base_model(path: str, kind: str = "auto", prediction_type: str = "auto",
                    trust_pickle: bool = False, components: str = "") -> BaseModel:
    """Load ``path`` for training or sampling: a local diffusers folder, a tiny name, or a
    single-file checkpoint in the original layout (``.safetensors``; pickle ``.ckpt``/``.pt``/
    ``.bin`` only with ``trust_pickle``), read offline with the configs shipped for its
    architecture (see ``dreambooth.single_file``). A single-file FLUX.1 / SD 3.x transformer takes
    the rest of its pipeline from ``components``, a diffusers folder of its family."""
    if path in WORLD_MODELS:
        folder, family = WORLD_MODELS[path], " --family flux1" if path == "world-flux" else ""
        if not (folder / "model_index.json").is_file():
            raise ModelError(f"the {path} model is not in {folder}: build it with "
                             f"`dreambooth world pretrain{family} --ship` (docs/world.md)")
        path = str(folder)
    if path in TINY_NAMES:
        model = build_tiny(path)
    elif Path(path).suffix.lower() in SINGLE_FILE_SUFFIXES:
        from dreambooth.single_file import load_single_file
        from dreambooth.transformer_files import holds_transformer

        file = Path(path).expanduser()
        if holds_transformer(file, trust_pickle):
            model = load_transformer_model(file, components, kind, trust_pickle)
        else:
            model = load_single_file(file, kind=kind, trust_pickle=trust_pickle)
    else:
        model = load_folder(Path(path).expanduser(), kind, trust_pickle)
    if prediction_type != "auto" and prediction_type != model.prediction_type:
        from diffusers import DDPMScheduler

        model.scheduler = DDPMScheduler.from_config(model.scheduler.config, prediction_type=prediction_type)
    return model


# What each part of a diffusers folder is, per kind: (library, class). Schedulers are read as
# the scheduler training uses (DDPM, or flow matching's Euler), whatever the folder's says.
_CLIP, _CLIP_PROJ, _CLIP_TOK = ("transformers", "CLIPTextModel"), ("transformers", "CLIPTextModelWithProjection"), \
    ("transformers", "CLIPTokenizer")
_T5, _T5_TOK = ("transformers", "T5EncoderModel"), ("transformers", "T5TokenizerFast")
_SD = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"), "text_encoder": _CLIP,
       "tokenizer": _CLIP_TOK, "scheduler": ("diffusers", "DDPMScheduler")}
_FLOW = {"vae": ("diffusers", "AutoencoderKL"), "tokenizer": _CLIP_TOK,
         "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")}
PARTS = {
    "sd1": _SD, "sd2": _SD,
    "sdxl": {**_SD, "text_encoder_2": _CLIP_PROJ, "tokenizer_2": _CLIP_TOK},
    "flux1": {**_FLOW, "transformer": ("diffusers", "FluxTransformer2DModel"), "text_encoder": _CLIP,
              "text_encoder_2": _T5, "tokenizer_2": _T5_TOK},
    "sd3": {**_FLOW, "transformer": ("diffusers", "SD3Transformer2DModel"), "text_encoder": _CLIP_PROJ,
            "text_encoder_2": _CLIP_PROJ, "tokenizer_2": _CLIP_TOK, "text_encoder_3": _T5, "tokenizer_3": _T5_TOK},
}


def load_transformer_model(file: Path, components: str, kind: str = "auto",
                           trust_pickle: bool = False) -> BaseModel:
    """A single-file FLUX.1 / SD 3.x transformer with the VAE, text encoders, tokenizers and
    scheduler of ``components`` (a diffusers folder of the same family; its own transformer, the
    largest part, is not read)."""
    from dreambooth.transformer_files import family_of, load_transformer_file

    transformer = load_transformer_file(file, trust_pickle=trust_pickle)
    family = "flux1" if family_of(transformer) == "flux" else "sd3"
    if kind not in ("auto", family):
        raise ModelError(f"{file} holds a {family} transformer, but the config says model.kind={kind}")
    if not components:
        raise ModelError(
            f"{file} holds only a {family} transformer; its VAE, text encoders and tokenizers come "
            f"from a local diffusers folder of the same family: set model.components=FOLDER (for "
            f"example the FLUX.1-dev or stable-diffusion-3.5-medium folder; its transformer/ is not read)")
    model = load_folder(Path(components).expanduser(), family, trust_pickle, without=("transformer",))
    model.transformer, model.source = transformer, str(file)
    return model


def load_folder(folder: Path, kind: str = "auto", trust_pickle: bool = False, without: tuple = ()) -> BaseModel:
    """A local diffusers folder as a ``BaseModel`` (float32), less the parts in ``without``. A part
    that cannot be read (a damaged weight file, a broken config) is a ModelError naming that part."""
    import importlib

    import torch

    index = check_model_folder(folder, without)
    detected = read_part(folder, "text_encoder", lambda: _detect_kind(folder, index))
    if kind not in ("auto", detected):
        raise ModelError(f"{folder} looks like {detected}, but the config says model.kind={kind}")
    weights = [p for p in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
               if p in index and p not in without]
    safe = check_weight_files(folder, weights, trust_pickle)

    def loader(name: str, library: str, cls_name: str):
        cls = getattr(importlib.import_module(library), cls_name)
        kwargs: dict = dict(subfolder=name, local_files_only=True)
        if name in weights:  # fp16 weights load as fp32
            kwargs.update({"torch_dtype" if library == "diffusers" else "dtype": torch.float32},
                          use_safetensors=safe or None)
        return lambda: cls.from_pretrained(folder, **kwargs)

    loaded = {name: read_part(folder, name, loader(name, *where)) for name, where in PARTS[detected].items()
              if name not in without}
    return BaseModel(**{"unet": None, **loaded}, kind=detected, source=str(folder))


def read_part(folder: Path, part: str, load):
    """``load()``, with any failure turned into a ModelError naming ``folder/part``."""
    try:
        return load()
    except ModelError:
        raise
    except Exception as e:  # the libraries raise many kinds for a damaged file
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise ModelError(f"{folder / part} cannot be read ({type(e).__name__}: {reason}). The folder "
                         "is damaged or incomplete: copy it again (a run's final/ is rebuilt by "
                         "`dreambooth train --resume RUN_DIR`)") from None


def load_configured(cfg, trust_pickle: bool = False) -> BaseModel:
    """The base model a run's config names (its ``model`` section), set up as the run uses it
    (``configure``). ``trust_pickle`` comes from this invocation's command line, never a file."""
    m = cfg.model
    return configure(load_base_model(m.path, m.kind, m.prediction_type, trust_pickle=trust_pickle,
                                     components=m.components), cfg)


def configure(model: BaseModel, cfg) -> BaseModel:
    """``model`` with the run's settings that its training and sampling share: the T5 length
    (``flow.max_sequence_length``), so a run's images are drawn from the tokens it trained on."""
    model.max_sequence_length = cfg.flow.max_sequence_length or None
    return model


# ---------------------------------------------------------------- conditioning


def tokenize(tokenizer, prompts: list[str]):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_prompts(model: BaseModel, prompts: list[str], device=None) -> dict[str, Any]:
    """UNet conditioning for ``prompts``, as keyword arguments of ``unet(...)``.

    SD 1.x/2.x: the text encoder's last hidden state. SDXL: both encoders' penultimate hidden
    states side by side, plus the second encoder's pooled embedding and the size/crop "time ids"
    (original size = target size = the UNet's native size, no crop), as the SDXL pipeline does.
    Gradients flow when the text encoder is being trained.
    """
    import torch

    device = device or model.unet.device
    ids = tokenize(model.tokenizer, prompts).to(device)
    if model.kind != "sdxl":
        return {"encoder_hidden_states": model.text_encoder(ids)[0]}
    ids_2 = tokenize(model.tokenizer_2, prompts).to(device)
    out_1 = model.text_encoder(ids, output_hidden_states=True)
    out_2 = model.text_encoder_2(ids_2, output_hidden_states=True)
    hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    size = model.unet.config.sample_size * model.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=hidden.dtype, device=device)
    return {"encoder_hidden_states": hidden, "added_cond_kwargs": {
        "text_embeds": out_2.text_embeds, "time_ids": time_ids.repeat(len(prompts), 1)}}


def concat_cond(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: concat_cond(v, b[k]) if isinstance(v, dict) else torch.cat([v, b[k]])
            for k, v in a.items()}


def encode_latents(model: BaseModel, pixels, batch: int = 8):
    """VAE latents of (N, 3, H, W) pixels in [-1, 1]: the posterior *mean* (deterministic, so it
    can be computed once and cached), minus the VAE's ``shift_factor`` (FLUX.1's and SD 3.x's),
    times its ``scaling_factor``, as their pipelines decode them; float32 on the CPU."""
    import torch

    vae = model.vae
    with torch.no_grad():
        out = [vae.encode(pixels[i:i + batch].to(vae.device, vae.dtype)).latent_dist.mean.float().cpu()
               for i in range(0, len(pixels), batch)]
    return (torch.cat(out) - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor
