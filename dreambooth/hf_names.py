"""Names and files that transformers 4.x and 5.x both read, for the CLIP text encoders and
tokenizers of the diffusers folders and LoRA files this package writes.

transformers 5 (since 5.6) no longer nests ``CLIPTextModel`` under ``text_model``: its weights
are ``encoder.layers.0...`` instead of ``text_model.encoder.layers.0...``
(``CLIPTextModelWithProjection`` keeps ``text_model.`` beside ``text_projection``). transformers 5
reads either layout, but transformers 4.x, and the clients built on it (diffusers 0.32, kohya's
sd-scripts, ComfyUI's LoRA key map), read only the nested one: a folder without the level loads
with a warning and a text encoder left at random weights, and a diffusers LoRA without it fails
(IndexError in diffusers 0.32) or is skipped (ComfyUI). Every name that leaves this package is
therefore written with the level (``text_model_path``), as the published Stable Diffusion
checkpoints have it.

transformers 5 also saves a CLIP tokenizer as ``tokenizer.json`` only, while diffusers' model
index names the slow ``CLIPTokenizer``, which in transformers 4.x needs ``vocab.json`` and
``merges.txt``: ``write_vocab_files`` adds them (from the same BPE model, so both read the
same ids).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dreambooth.files import atomic_file

TEXT_MODEL = "text_model."
CLIP_MODEL_TYPES = ("clip_text_model",)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def text_model_path(path: str) -> str:
    """A CLIP text encoder's module or weight path with the ``text_model.`` level:
    ``"encoder.layers.0.self_attn.q_proj"`` -> ``"text_model.encoder.layers.0.self_attn.q_proj"``.
    Paths that already have it, and ``text_projection`` (which sits beside ``text_model`` in
    ``CLIPTextModelWithProjection``), are returned unchanged, so it is safe under any
    transformers version and idempotent."""
    if path.startswith((TEXT_MODEL, "text_projection")):
        return path
    return TEXT_MODEL + path


def _rewrite_safetensors(path: Path, rename) -> bool:
    """Rename the tensors of one safetensors file in place (atomically); False if none moved."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        keys = list(f.keys())
        if all(rename(k) == k for k in keys):
            return False
        state = {rename(k): f.get_tensor(k) for k in keys}
    if len(state) != len(keys):
        raise ValueError(f"renaming the weights of {path} would merge two of them")
    metadata.setdefault("format", "pt")  # transformers 4.x refuses a file without it
    atomic_file(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return True


def nest_text_encoder_weights(folder: str | Path) -> bool:
    """Give the saved CLIP text encoder in ``folder`` (``config.json`` + ``*.safetensors``, one
    file or shards with an index) the ``text_model.`` level in its weight names. Other model
    types are left alone. True if anything was renamed."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file() or json.loads(config.read_text()).get("model_type") not in CLIP_MODEL_TYPES:
        return False
    changed = False
    for file in sorted(folder.glob("*.safetensors")):
        changed |= _rewrite_safetensors(file, text_model_path)
    for index in folder.glob("*.safetensors.index.json"):
        data = json.loads(index.read_text())
        data["weight_map"] = {text_model_path(k): v for k, v in data.get("weight_map", {}).items()}
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return changed


def write_vocab_files(tokenizer: Any, folder: str | Path) -> list[Path]:
    """Write ``vocab.json`` and ``merges.txt`` of a BPE tokenizer (CLIP) into ``folder``
    beside its ``tokenizer.json``, so that the slow tokenizer classes of transformers 4.x
    load it. Tokenizers without a BPE model are left as saved."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if model is None or type(model).__name__ != "BPE":
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(p) for p in model.save(str(folder))]


def make_folder_portable(folder: str | Path, tokenizers: dict[str, Any]) -> None:
    """After ``save_pretrained`` of a pipeline into ``folder``: nest its CLIP text encoders'
    weight names and add the slow-tokenizer files (``tokenizers``: subfolder -> tokenizer)."""
    folder = Path(folder)
    for name in TEXT_ENCODERS:
        if (folder / name).is_dir():
            nest_text_encoder_weights(folder / name)
    for name, tokenizer in tokenizers.items():
        if tokenizer is not None and (folder / name).is_dir():
            write_vocab_files(tokenizer, folder / name)
