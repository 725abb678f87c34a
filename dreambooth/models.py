"""Base models: load a local diffusers folder or single-file checkpoint (SD 1.x, 2.x, SDXL), or
build a tiny one in-process.

Nothing here downloads: loading is ``local_files_only`` and ``HF_HUB_OFFLINE=1`` is set by the
CLI. ``tiny``, ``tiny-sd2`` and ``tiny-sdxl`` are small random models of the real architectures
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel with the real CLIP tokenizer, DDPM
scheduler) that build in about a second, for tests and CPU runs. Their attention uses one or two
wide heads: many narrow heads dominate CPU time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dreambooth.base_model import PICKLE_SUFFIXES, SINGLE_FILE_SUFFIXES, TINY_NAMES, BaseModel
from dreambooth.errors import ModelError

WORLD_MODEL = Path(__file__).parent / "world" / "model"  # the shipped self-trained base model
EXPECTED = "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/"


# ---------------------------------------------------------------- tiny models


def _tiny_text_encoder(hidden: int, with_projection: bool = False, pad_id: int = 49407):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=1,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_id, hidden_act="quick_gelu",
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config)


def build_tiny(name: str = "tiny", seed: int = 0, resolution: int = 64) -> BaseModel:
    """A tiny random model of the real architecture; the same ``seed`` gives the same weights."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from dreambooth.tokenizer import clip_tokenizer

    if name not in TINY_NAMES:
        raise ModelError(f"unknown tiny model '{name}'; choose one of {', '.join(TINY_NAMES)}")
    kind = {"tiny": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}[name]
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=resolution,
        block_out_channels=(16, 32, 32, 32), norm_num_groups=8, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    unet_args: dict[str, Any] = dict(
        sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=1,
    )
    extra: dict[str, Any] = {}
    if kind == "sd1":
        text_encoder, tokenizer = _tiny_text_encoder(32), clip_tokenizer()
    elif kind == "sd2":  # SD 2.x: linear projections in attention, v-prediction, pads with "!"
        unet_args.update(use_linear_projection=True)
        text_encoder, tokenizer = _tiny_text_encoder(32, pad_id=0), clip_tokenizer(pad_token="!")
    else:  # SDXL: two text encoders (concatenated), pooled text + size/crop "time ids"
        unet_args.update(
            cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        )
        text_encoder, tokenizer = _tiny_text_encoder(32), clip_tokenizer()
        extra = dict(text_encoder_2=_tiny_text_encoder(32, with_projection=True, pad_id=0),
                     tokenizer_2=clip_tokenizer(pad_token="!"))
    unet = UNet2DConditionModel(**unet_args)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1,
        prediction_type="v_prediction" if kind == "sd2" else "epsilon",
    )
    return BaseModel(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                     scheduler=scheduler, kind=kind, source=name, **extra)


# ---------------------------------------------------------------- local folders


def _detect_kind(folder: Path, index: dict) -> str:
    if "XL" in index.get("_class_name", "") or "text_encoder_2" in index:
        return "sdxl"
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    te = json.loads((folder / "text_encoder" / "config.json").read_text())
    if sched.get("prediction_type") == "v_prediction" or te.get("hidden_size") == 1024:
        return "sd2"
    return "sd1"


def check_model_folder(folder: Path) -> dict:
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
    needed = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if "text_encoder_2" in index:
        needed += ["text_encoder_2", "tokenizer_2"]
    missing = [n for n in needed if not (folder / n).is_dir()]
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
                    trust_pickle: bool = False) -> BaseModel:
    """Load ``path`` for training or sampling: a local diffusers folder, a tiny name, or a
    single-file checkpoint in the original layout (``.safetensors``; pickle ``.ckpt``/``.pt``/
    ``.bin`` only with ``trust_pickle``), read offline with the configs shipped for its
    architecture (see ``dreambooth.single_file``)."""
    if path == "world":
        path = str(WORLD_MODEL)
        if not (WORLD_MODEL / "model_index.json").is_file():
            raise ModelError(f"the world model is not in {WORLD_MODEL}: build it with "
                             "`dreambooth world pretrain --ship` (108 minutes on 2 CPU cores when the "
                             "shipped model was made; slower on other CPUs, docs/world.md)")
    if path in TINY_NAMES:
        model = build_tiny(path)
    elif Path(path).suffix.lower() in SINGLE_FILE_SUFFIXES:
        from dreambooth.single_file import load_single_file

        model = load_single_file(Path(path).expanduser(), kind=kind, trust_pickle=trust_pickle)
    else:
        model = load_folder(Path(path).expanduser(), kind, trust_pickle)
    if prediction_type != "auto" and prediction_type != model.prediction_type:
        from diffusers import DDPMScheduler

        model.scheduler = DDPMScheduler.from_config(model.scheduler.config, prediction_type=prediction_type)
    return model


def load_folder(folder: Path, kind: str = "auto", trust_pickle: bool = False) -> BaseModel:
    """A local diffusers folder as a ``BaseModel`` (float32). A part that cannot be read (a
    damaged weight file, a broken config) is a ModelError naming that part."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index = check_model_folder(folder)
    detected = read_part(folder, "text_encoder", lambda: _detect_kind(folder, index))
    if kind not in ("auto", detected):
        raise ModelError(f"{folder} looks like {detected}, but the config says model.kind={kind}")
    parts = [p for p in ("unet", "vae", "text_encoder", "text_encoder_2") if p in index]
    safe = check_weight_files(folder, parts, trust_pickle)
    opts = dict(local_files_only=True)
    fp32 = dict(opts, torch_dtype=torch.float32, use_safetensors=safe or None)  # fp16 weights load as fp32
    fp32_tf = dict(opts, dtype=torch.float32, use_safetensors=safe or None)
    loaders = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **fp32),
        "vae": lambda: AutoencoderKL.from_pretrained(folder, subfolder="vae", **fp32),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **fp32_tf),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **opts),
        "scheduler": lambda: DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **opts),
    }
    if detected == "sdxl":
        loaders["text_encoder_2"] = lambda: CLIPTextModelWithProjection.from_pretrained(
            folder, subfolder="text_encoder_2", **fp32_tf)
        loaders["tokenizer_2"] = lambda: CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2", **opts)
    loaded = {name: read_part(folder, name, load) for name, load in loaders.items()}
    return BaseModel(**loaded, kind=detected, source=str(folder))


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


def load_configured(model_cfg, trust_pickle: bool = False) -> BaseModel:
    """The base model a config's ``model`` section names (path, kind, prediction type).
    ``trust_pickle`` comes from this invocation's command line, never from a file."""
    return load_base_model(model_cfg.path, model_cfg.kind, model_cfg.prediction_type,
                           trust_pickle=trust_pickle)


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
    can be computed once and cached) times ``vae.config.scaling_factor``; float32 on the CPU."""
    import torch

    vae = model.vae
    with torch.no_grad():
        out = [vae.encode(pixels[i:i + batch].to(vae.device, vae.dtype)).latent_dist.mean.float().cpu()
               for i in range(0, len(pixels), batch)]
    return torch.cat(out) * vae.config.scaling_factor
