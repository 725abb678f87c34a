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
"""

from __future__ import annotations

from typing import Any

from dreambooth.lora import LoraLayer

PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
SDXL_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def kohya_name(key: str, kind: str) -> str:
    """``"unet.down_blocks.0....to_q"`` -> ``"lora_unet_down_blocks_0_..._to_q"``.

    Text encoder paths are written under ``text_model`` whether or not the installed
    transformers nests ``CLIPTextModel`` that way (it stopped in 5.6): the files stay the same
    (``hf_names.text_model_path``, the rule the diffusers-format LoRA and folders share).
    """
    from dreambooth.hf_names import text_model_path

    component, _, path = key.partition(".")
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


def to_kohya(layers: dict[str, LoraLayer], kind: str, dtype=None) -> dict[str, Any]:
    """A kohya state dict of ``layers`` (alpha as a float32 scalar tensor)."""
    import torch

    out = {}
    for key, name in kohya_names(layers, kind).items():
        layer = layers[key]
        out[f"{name}.lora_down.weight"] = layer.down.to(dtype or layer.down.dtype).contiguous()
        out[f"{name}.lora_up.weight"] = layer.up.to(dtype or layer.up.dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
    return out


def from_kohya(state: dict[str, Any], keys, kind: str) -> dict[str, LoraLayer]:
    """The inverse of ``to_kohya`` for a model whose LoRA module keys are ``keys``. A name in
    ``state`` that is none of theirs is an error (it belongs to another model)."""
    by_name = {name: key for key, name in kohya_names(keys, kind).items()}
    layers, unknown = {}, []
    for full in state:
        name, _, field = full.partition(".")
        if field != "lora_down.weight":
            continue
        if name not in by_name:
            unknown.append(name)
            continue
        alpha = state.get(f"{name}.alpha")
        down = state[full]
        layers[by_name[name]] = LoraLayer(down=down, up=state[f"{name}.lora_up.weight"],
                                          alpha=float(alpha) if alpha is not None else float(down.shape[0]))
    if unknown:
        raise ValueError(f"{len(unknown)} LoRA layers match no module of this model, e.g. {unknown[0]}")
    return layers
