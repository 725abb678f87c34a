"""Single-file checkpoints (one ``.safetensors`` in the original layout): read them, write them.

Reading (``load_single_file``) is diffusers' own conversion (``from_single_file`` per part),
given local configs so nothing is downloaded: by default the per-architecture configs shipped in
``assets/single-file/<arch>/`` (SD 1.5, SD 2.1 768-v, SDXL 1.0 base), or any diffusers folder
with matching configs (``config=``; tests use the tiny models' own). The tokenizers are built
from the vendored CLIP vocabulary. Writing (``save_single_file``) uses ``ldm_keys``.

Pickle checkpoints (``.ckpt``, ``.pt``, ``.bin``) run code when they are read: they are refused
unless the caller trusts the file (``trust_pickle``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dreambooth.errors import ModelError
from dreambooth.base_model import PICKLE_SUFFIXES, BaseModel

SHIPPED = Path(__file__).parent / "assets" / "single-file"
ARCH_FOLDERS = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}
V_PRED_MARKER = "v_pred"  # an empty tensor ComfyUI and Forge read as "v-prediction model"


def read_checkpoint(path: Path, trust_pickle: bool = False, select=None) -> tuple[dict[str, Any], dict[str, str]]:
    """(state dict, safetensors metadata) of a single-file checkpoint, on the CPU. ``select``
    (key list -> the keys to read) reads part of a ``.safetensors`` without loading the rest."""
    import torch
    from safetensors import safe_open

    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise ModelError(
                f"{path} is a pickle checkpoint ({suffix}); reading one can run arbitrary code hidden "
                "in the file, so it is refused. Convert it to .safetensors (e.g. with a trusted "
                "tool), or pass --trust-pickle on this command if you trust its source.")
        state = torch.load(path, map_location="cpu", weights_only=False)
        while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # Lightning checkpoints nest the weights
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            return {k: f.get_tensor(k) for k in (select(keys) if select else keys)}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ModelError(f"{path} is not a readable .safetensors file ({e})") from None


def config_folder(kind: str) -> Path:
    return SHIPPED / ARCH_FOLDERS[kind]


def load_single_file(path: str | Path, config: str | Path | None = None, kind: str = "auto",
                     trust_pickle: bool = False) -> BaseModel:
    """A ``BaseModel`` (float32, CPU) from one original-layout checkpoint, offline.

    ``config``: a folder with the diffusers configs of this exact architecture (model_index.json,
    unet/, vae/, text_encoder/, scheduler/, and tokenizer/ if it has its own); default: the shipped
    configs of the detected architecture. The prediction type comes from a ``v_pred`` marker or
    the file's ``prediction_type`` metadata when present, else from the config folder's
    scheduler: v-prediction for SD 2.x, which the keys cannot tell from its 512 px epsilon
    "base" model; ``model.prediction_type=epsilon`` overrides it (see ``load_base_model``).
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth.ldm_keys import TEXT_ENCODERS, LayoutError, detect_kind

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}. Give an existing single-file checkpoint "
                         "(.safetensors), a diffusers folder, or 'tiny'; nothing is downloaded")
    state, metadata = read_checkpoint(path, trust_pickle)
    try:
        detected = detect_kind(state)
    except LayoutError as e:
        raise ModelError(f"{path}: {e}") from None
    if kind not in ("auto", detected):
        raise ModelError(f"{path} looks like {detected}, but the config says model.kind={kind}")
    folder = Path(config) if config else config_folder(detected)
    opts = dict(config=str(folder), local_files_only=True, torch_dtype=torch.float32)
    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    try:
        parts: dict[str, Any] = {
            "unet": UNet2DConditionModel.from_single_file(state, subfolder="unet", **opts),
            "vae": AutoencoderKL.from_single_file(state, subfolder="vae", **opts),
        }
        for name, (_, prefix) in TEXT_ENCODERS[detected].items():
            # Only this encoder's weights: diffusers tells SDXL's two encoders apart by width,
            # which fails for models (like the tiny one) whose encoders are equally wide.
            own = {k: v for k, v in state.items() if k.startswith(prefix)}
            parts[name] = create_diffusers_clip_model_from_ldm(
                classes[name], own, subfolder=name, config=str(folder), local_files_only=True,
                torch_dtype=torch.float32)
    except (ValueError, RuntimeError, KeyError) as e:
        raise ModelError(
            f"{path} has {detected} weights that do not fit the configs in {folder}: "
            f"{str(e).splitlines()[0][:300]}. A model of another size needs its own diffusers "
            "configs: convert it to a diffusers folder and pass that as --model") from None
    parts.update(_tokenizers(folder, detected))
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    prediction = "v_prediction" if V_PRED_MARKER in state else metadata.get("prediction_type")
    if prediction and prediction != scheduler.config.prediction_type:
        scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=prediction)
    return BaseModel(scheduler=scheduler, kind=detected, source=str(path), **parts)


def _tokenizers(folder: Path, kind: str) -> dict[str, Any]:
    """The config folder's own tokenizers when it has them, else the vendored CLIP vocabulary
    (SD 2.x and SDXL's second encoder pad with "!", as their released tokenizers do)."""
    from transformers import CLIPTokenizer

    from dreambooth.tokenizer import clip_tokenizer

    pads = {"sd1": {"tokenizer": None}, "sd2": {"tokenizer": "!"},
            "sdxl": {"tokenizer": None, "tokenizer_2": "!"}}[kind]
    out = {}
    for name, pad in pads.items():
        if (folder / name).is_dir():
            out[name] = CLIPTokenizer.from_pretrained(folder, subfolder=name, local_files_only=True)
        else:
            out[name] = clip_tokenizer(pad_token=pad) if pad else clip_tokenizer()
    return out


# ---------------------------------------------------------------- writing


def original_state_dict(model: BaseModel) -> dict[str, Any]:
    """The model's weights in the original layout, plus a ``v_pred`` marker for v-prediction."""
    import torch

    from dreambooth.ldm_keys import TEXT_ENCODERS, to_original

    parts = {"unet": (model.unet.state_dict(), model.unet.config),
             "vae": (model.vae.state_dict(), model.vae.config)}
    for name in TEXT_ENCODERS[model.kind]:
        encoder = getattr(model, name)
        parts[name] = (encoder.state_dict(), encoder.config.to_dict())
    state = to_original(parts, model.kind)
    if model.prediction_type == "v_prediction":
        state[V_PRED_MARKER] = torch.zeros(0)
    return state


def save_single_file(model: BaseModel, path: str | Path, dtype=None) -> Path:
    """Write ``model`` as one original-layout ``.safetensors`` (cast to ``dtype`` when given)."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {}
    for k, v in original_state_dict(model).items():
        v = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        state[k] = v.detach().contiguous().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt", "prediction_type": model.prediction_type})
    return path


def write_configs(model: BaseModel, folder: str | Path) -> Path:
    """The diffusers configs of ``model`` without its weights: what ``load_single_file`` (and
    ``from_single_file(config=...)``) needs to rebuild this exact architecture."""
    folder = Path(folder)
    pipe = model.pipeline()
    index = {"_class_name": type(pipe).__name__}
    for name, part in model.components().items():
        if hasattr(part, "save_config"):  # diffusers models and schedulers
            part.save_config(folder / name)
        elif hasattr(part, "save_pretrained") and name.startswith("tokenizer"):
            part.save_pretrained(folder / name)
        else:  # transformers models: the config only
            part.config.save_pretrained(folder / name)
        library = "diffusers" if type(part).__module__.startswith("diffusers") else "transformers"
        index[name] = [library, type(part).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
