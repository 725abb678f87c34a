"""kohya-ss / A1111 LoRA key names: pure functions.

A kohya LoRA file holds, per adapted layer NAME,

    NAME.lora_down.weight   A, (r, in)
    NAME.lora_up.weight     B, (out, r)
    NAME.alpha              a scalar: the layer adds alpha / r * B A x

where NAME is ``lora_unet_`` / ``lora_te_`` (SDXL: ``lora_te1_``, ``lora_te2_``) followed by the
module's diffusers path with dots turned into underscores, e.g.
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` and
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``. That is what kohya's sd-scripts
write for SD 1.x/2.x, what A1111 and ComfyUI map onto their models, and what diffusers'
``load_lora_weights`` converts back. (kohya writes SDXL UNet names in its own
input_blocks/output_blocks numbering instead; ComfyUI and diffusers accept both.)

Dots become underscores, so a name is decoded by looking it up among the model's own module
paths, not by string surgery: ``kohya_names`` checks that no two paths collide.

FLUX.1 and SD3 (kinds ``flux1``, ``sd3``) are named by the original models' module paths, as
kohya's ``networks/lora_flux.py`` and ``lora_sd3.py`` write them and ComfyUI (Forge: FLUX) maps them
(``lora_unet_`` + the key of ComfyUI's ``diffusion_model.*`` weight):
``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``,
``lora_unet_joint_blocks_0_x_block_attn_qkv``. diffusers' separate q, k, v (and FLUX's single
block MLP in-projection) become one LoRA on the fused layer (``dreambooth.lora_names``: rank and
alpha n-fold, up block-diagonal). Their text encoders: ``lora_te1_`` (CLIP-L), ``lora_te2_``
(SD3's CLIP-G), ``lora_te3_`` (T5), kohya's prefixes.
"""

from __future__ import annotations

import re
from typing import Any

from dreambooth.lora import LoraLayer

PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
SDXL_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
# the transformer kinds' text encoders; CLIP ones are written under text_model, T5 as it is
TEXT_PREFIXES = {
    "flux1": {"text_encoder": ("lora_te1", True), "text_encoder_2": ("lora_te3", False)},
    "sd3": {"text_encoder": ("lora_te1", True), "text_encoder_2": ("lora_te2", True),
            "text_encoder_3": ("lora_te3", False)},
}
TRANSFORMER_KINDS = tuple(TEXT_PREFIXES)


def kohya_name(key: str, kind: str) -> str:
    """``"unet.down_blocks.0....to_q"`` -> ``"lora_unet_down_blocks_0_..._to_q"``.

    Text encoder paths are written under ``text_model`` whether or not the installed
    transformers nests ``CLIPTextModel`` that way (it stopped in 5.6): the files stay the same
    (``hf_names.text_model_path``, the rule the diffusers-format LoRA and folders share).
    """
    from dreambooth.hf_names import text_model_path

    component, _, path = key.partition(".")
    if kind in TEXT_PREFIXES:
        if component not in TEXT_PREFIXES[kind]:
            raise ValueError(f"'{key}': {kind} LoRA names cover the transformer (to_kohya) and "
                             f"{', '.join(TEXT_PREFIXES[kind])}")
        prefix, clip = TEXT_PREFIXES[kind][component]
        return f"{prefix}_{(text_model_path(path) if clip else path).replace('.', '_')}"
    prefix = (SDXL_PREFIXES if kind == "sdxl" else PREFIXES)[component]
    if component != "unet":
        path = text_model_path(path)
    return f"{prefix}_{path.replace('.', '_')}"


def kohya_names(keys, kind: str) -> dict[str, str]:
    """``{module key: kohya name}`` for every key; an error if two keys would share a name."""
    names = {key: kohya_name(key, kind) for key in keys}
    if len(set(names.values())) != len(names):
        seen: dict[str, str] = {}
        for key, name in names.items():
            if name in seen:
                raise ValueError(f"'{seen[name]}' and '{key}' both become '{name}' in kohya naming")
            seen[name] = key
    return names


def _write(named: dict[str, LoraLayer], dtype) -> dict[str, Any]:
    import torch

    out = {}
    for name, layer in named.items():
        out[f"{name}.lora_down.weight"] = layer.down.to(dtype or layer.down.dtype).contiguous()
        out[f"{name}.lora_up.weight"] = layer.up.to(dtype or layer.up.dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
    return out


def to_kohya(layers: dict[str, LoraLayer], kind: str, dtype=None) -> dict[str, Any]:
    """A kohya state dict of ``layers`` (alpha as a float32 scalar tensor)."""
    if kind in TRANSFORMER_KINDS:
        return to_kohya_transformer(layers, kind, dtype)
    return _write({name: layers[key] for key, name in kohya_names(layers, kind).items()}, dtype)


def to_kohya_transformer(layers: dict[str, LoraLayer], kind: str, dtype=None) -> dict[str, Any]:
    """A kohya state dict of a FLUX.1 (``kind="flux1"``) or SD3 (``"sd3"``) LoRA: the
    ``transformer.`` layers under their original-layout names, fused where the original fuses
    (``lora_names.to_original``), and any text-encoder layers under ``lora_te1/2/3_``."""
    from dreambooth.lora_names import TRANSFORMER, to_original

    named = {f"lora_unet_{path.replace('.', '_')}": layer for path, layer in to_original(layers, kind).items()}
    others = [key for key in layers if key.partition(".")[0] != TRANSFORMER]
    named.update({name: layers[key] for key, name in kohya_names(others, kind).items()})
    return _write(named, dtype)


def _read(state: dict[str, Any]) -> dict[str, LoraLayer]:
    """``{kohya name: LoraLayer}`` of every ``NAME.lora_down.weight`` in ``state`` (alpha = rank
    when the file has none, as kohya and ComfyUI read it)."""
    out = {}
    for full, down in state.items():
        name, _, field = full.partition(".")
        if field == "lora_down.weight":
            alpha = state.get(f"{name}.alpha")
            out[name] = LoraLayer(down=down, up=state[f"{name}.lora_up.weight"],
                                  alpha=float(alpha) if alpha is not None else float(down.shape[0]))
    return out


def from_kohya_transformer(state: dict[str, Any], kind: str, keys=()) -> dict[str, LoraLayer]:
    """The inverse of ``to_kohya_transformer``: ``{"transformer.<diffusers path>": LoraLayer}``
    (fused layers split back, ``lora_names.from_original``), plus the text-encoder layers among
    ``keys`` (the model's text-encoder LoRA module keys; their names are decoded by lookup). A
    name that is neither is an error."""
    from dreambooth.lora_names import BLOCKS, TOP, _check_kind, from_original

    _check_kind(kind)
    vocabulary = {name.replace(".", "_"): name for name in TOP[kind].values()}
    for _, original, table in BLOCKS[kind]:
        for target in table.values():
            name = target[0] if isinstance(target, tuple) else target
            vocabulary[f"{original}_N_{name.replace('.', '_')}"] = f"{original}.N.{name}"
    text = {name: key for key, name in kohya_names(keys, kind).items()}
    original, layers, unknown = {}, {}, []
    for name, layer in _read(state).items():
        if name in text:
            layers[text[name]] = layer
            continue
        rest = name[len("lora_unet_"):] if name.startswith("lora_unet_") else None
        m = re.fullmatch(r"([a-z_]+?)_(\d+)_(.+)", rest or "")
        pattern, index = (f"{m.group(1)}_N_{m.group(3)}", m.group(2)) if m else (rest, None)
        if pattern in vocabulary:
            path = vocabulary[pattern]
            original[path.replace(".N.", f".{index}.") if index is not None else path] = layer
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"{len(unknown)} LoRA layers match no module of a {kind} model, e.g. {unknown[0]}")
    return {**from_original(original, kind), **layers}


def from_kohya(state: dict[str, Any], keys, kind: str) -> dict[str, LoraLayer]:
    """The inverse of ``to_kohya`` for a model whose LoRA module keys are ``keys``. A name in
    ``state`` that is none of theirs is an error (it belongs to another model)."""
    if kind in TRANSFORMER_KINDS:
        from dreambooth.lora_names import TRANSFORMER

        return from_kohya_transformer(state, kind, [k for k in keys if k.partition(".")[0] != TRANSFORMER])
    by_name = {name: key for key, name in kohya_names(keys, kind).items()}
    read = _read(state)
    unknown = [name for name in read if name not in by_name]
    if unknown:
        raise ValueError(f"{len(unknown)} LoRA layers match no module of this model, e.g. {unknown[0]}")
    return {by_name[name]: layer for name, layer in read.items()}
