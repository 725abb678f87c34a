"""Weight names of the original Stable Diffusion checkpoints, from diffusers names: pure functions.

A1111, ComfyUI and Forge load one ``.safetensors`` per model in the layout of the original
CompVis (SD 1.x/2.x) and Stability SGM (SDXL) code:

    model.diffusion_model.*                  the UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*                      the VAE (encoder.down.N.block.M, decoder.up.N, ...)
    cond_stage_model.transformer.text_model.*  SD 1.x: CLIP ViT-L, Hugging Face layout
    cond_stage_model.model.*                 SD 2.x: OpenCLIP ViT-H (fused q/k/v "in_proj")
    conditioner.embedders.0.transformer.*    SDXL: CLIP ViT-L, Hugging Face layout
    conditioner.embedders.1.model.*          SDXL: OpenCLIP ViT-bigG, with its text projection

diffusers ships only the loading direction (``diffusers.loaders.single_file_utils``). The map
here is the other direction, built per block from each model's own config, so it fits any size
(the tiny test models as well as the real ones). A table row says "this diffusers module is
that original module, with these renames inside"; ``rename`` applies the rows to a state dict
and refuses a weight no row claims, rather than silently dropping it.

Limits: only what a diffusers model holds can be written. SD 2.x's diffusers text encoder
stops one layer short of OpenCLIP's 24 (SD uses the penultimate layer) and has no text
projection, so those original weights are absent; the loaders (strict=False) leave them unused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# kind -> text encoder attribute -> (layout, prefix in the single file)
TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("clip", "cond_stage_model.transformer.")},
    "sd2": {"text_encoder": ("openclip", "cond_stage_model.model.")},
    "sdxl": {"text_encoder": ("clip", "conditioner.embedders.0.transformer."),
             "text_encoder_2": ("openclip", "conditioner.embedders.1.model.")},
}

# Renames inside one block, diffusers name -> original name.
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # norm1/conv1/norm2/conv2 keep their names
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1",
                  "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


@dataclass(frozen=True)
class Block:
    """One diffusers module and its original name; ``inner`` renames its direct children."""

    diffusers: str
    original: str
    inner: Mapping[str, str] = field(default_factory=dict)
    conv1x1: bool = False  # the original stores these linear weights as 1x1 convolutions


# ---------------------------------------------------------------- tables, per block


def _per_block(value: Any, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_blocks(config: Mapping[str, Any]) -> list[Block]:
    """Every UNet block of a model with this diffusers ``config``, in the original numbering.

    input_blocks.0 is conv_in; then per down block, one entry per resnet (its attention at .1
    when the block has cross-attention) and one for the downsampler (``.0.op``) unless it is the
    last block. middle_block is resnet, attention, resnet. output_blocks: per up block,
    layers+1 entries (resnet, attention, and the upsampler at the end of all but the last).
    """
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    n = len(down_types)
    layers = _per_block(config["layers_per_block"], n)
    blocks = [Block(d, o) for d, o in UNET_TOP.items()]
    idx = 1
    for i, kind in enumerate(down_types):
        for j in range(layers[i]):
            blocks.append(Block(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", UNET_RESNET))
            if "CrossAttn" in kind:
                blocks.append(Block(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1"))
            idx += 1
        if i < n - 1:
            blocks.append(Block(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{idx}.0.op"))
            idx += 1
    blocks.append(Block("mid_block.resnets.0", "middle_block.0", UNET_RESNET))
    if "CrossAttn" in (config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        blocks.append(Block("mid_block.attentions.0", "middle_block.1"))
        blocks.append(Block("mid_block.resnets.1", "middle_block.2", UNET_RESNET))
    else:
        blocks.append(Block("mid_block.resnets.1", "middle_block.1", UNET_RESNET))
    idx = 0
    for i, kind in enumerate(up_types):
        for j in range(list(reversed(layers))[i] + 1):
            blocks.append(Block(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", UNET_RESNET))
            if "CrossAttn" in kind:
                blocks.append(Block(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1"))
            idx += 1
        if i < n - 1:  # the upsampler closes the block's last entry
            slot = 2 if "CrossAttn" in kind else 1
            blocks.append(Block(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{idx - 1}.{slot}.conv"))
    return blocks


def vae_blocks(config: Mapping[str, Any]) -> list[Block]:
    """Every AutoencoderKL block in the original numbering. The decoder's up blocks count
    down (diffusers up_blocks.0 is the original decoder.up.N-1) and have one resnet more."""
    n = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    blocks = [Block(name, name) for name in ("quant_conv", "post_quant_conv", "encoder.conv_in",
                                             "encoder.conv_out", "decoder.conv_in", "decoder.conv_out")]
    blocks += [Block("encoder.conv_norm_out", "encoder.norm_out"),
               Block("decoder.conv_norm_out", "decoder.norm_out")]
    for i in range(n):
        blocks += [Block(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET)
                   for j in range(layers)]
        if i < n - 1:
            blocks.append(Block(f"encoder.down_blocks.{i}.downsamplers.0.conv",
                                f"encoder.down.{i}.downsample.conv"))
        up = n - 1 - i
        blocks += [Block(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}", VAE_RESNET)
                   for j in range(layers + 1)]
        if i < n - 1:
            blocks.append(Block(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{up}.upsample.conv"))
    for part in ("encoder", "decoder"):
        blocks += [Block(f"{part}.mid_block.resnets.{j}", f"{part}.mid.block_{j + 1}", VAE_RESNET)
                   for j in range(2)]
        if config.get("mid_block_add_attention", True):
            blocks.append(Block(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION,
                                conv1x1=True))
    return blocks


def openclip_blocks(num_layers: int) -> list[Block]:
    """OpenCLIP text-tower names for a CLIP text model of ``num_layers`` (q/k/v are fused apart)."""
    blocks = [Block("embeddings.token_embedding", "token_embedding"),
              Block("final_layer_norm", "ln_final")]
    blocks += [Block(f"encoder.layers.{i}", f"transformer.resblocks.{i}", OPENCLIP_LAYER)
               for i in range(num_layers)]
    return blocks


# ---------------------------------------------------------------- applying a table


class LayoutError(ValueError):
    """A weight the original layout has no place for (an architecture this map does not know)."""


def rename(state: Mapping[str, Any], blocks: list[Block]) -> dict[str, Any]:
    """``state`` with every key renamed by the longest matching block; a key no block claims is
    an error (nothing is dropped silently). Linear weights of ``conv1x1`` blocks get two unit
    dimensions, as the original stores them."""
    table = {b.diffusers: b for b in blocks}
    out: dict[str, Any] = {}
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            block = table.get(".".join(parts[:cut]))
            if block is not None:
                break
        else:
            raise LayoutError(f"no original name for weight '{key}'")
        module, param = ".".join(parts[cut:-1]), parts[-1]
        module = block.inner.get(module, module)
        new = ".".join(p for p in (block.original, module, param) if p)
        if block.conv1x1 and param == "weight" and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def unet_to_original(state: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    return {UNET_PREFIX + k: v for k, v in rename(state, unet_blocks(config)).items()}


def vae_to_original(state: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    return {VAE_PREFIX + k: v for k, v in rename(state, vae_blocks(config)).items()}


def _text_model_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """Keys relative to the text transformer: transformers >= 5.6 flattened ``CLIPTextModel``
    (no ``text_model.``), ``CLIPTextModelWithProjection`` still wraps it. Buffers are dropped."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def clip_to_original(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Hugging Face CLIP layout under ``prefix + "text_model."`` (what SD 1.x and SDXL's first
    encoder store)."""
    return {f"{prefix}text_model.{k}": v for k, v in _text_model_keys(state).items()}


def openclip_to_original(state: Mapping[str, Any], num_layers: int, prefix: str) -> dict[str, Any]:
    """OpenCLIP layout: q, k, v projections concatenated into ``attn.in_proj_*``, the position
    embedding a bare tensor, the text projection transposed (OpenCLIP computes ``x @ P``)."""
    import torch

    state = _text_model_keys(state)
    fused: dict[str, Any] = {}
    for i in range(num_layers):
        attn = f"encoder.layers.{i}.self_attn"
        for param in ("weight", "bias"):
            fused[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(
                [state.pop(f"{attn}.{p}_proj.{param}") for p in "qkv"])
    fused["positional_embedding"] = state.pop("embeddings.position_embedding.weight")
    if "text_projection.weight" in state:
        fused["text_projection"] = state.pop("text_projection.weight").T.contiguous()
    fused.update(rename(state, openclip_blocks(num_layers)))
    return {prefix + k: v for k, v in fused.items()}


def to_original(components: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]],
                kind: str) -> dict[str, Any]:
    """One original-layout state dict from ``{name: (state_dict, config)}`` of the unet, vae and
    text encoder(s) of a ``kind`` (sd1 | sd2 | sdxl) model."""
    out = unet_to_original(*components["unet"])
    out.update(vae_to_original(*components["vae"]))
    for name, (layout, prefix) in TEXT_ENCODERS[kind].items():
        state, config = components[name]
        out.update(clip_to_original(state, prefix) if layout == "clip"
                   else openclip_to_original(state, config["num_hidden_layers"], prefix))
    return out


# ---------------------------------------------------------------- reading a checkpoint's keys


def detect_kind(state: Mapping[str, Any]) -> str:
    """sd1 | sd2 | sdxl from an original-layout checkpoint's keys (and one weight's shape).

    The keys cannot tell SD 2.x's v-prediction (768 px) from its epsilon (512 px "base") models;
    the caller decides that (``model.prediction_type``).
    """
    keys = set(state)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        sample = ", ".join(sorted(keys)[:3]) or "no weights"
        raise LayoutError(
            "not a Stable Diffusion checkpoint: no 'model.diffusion_model.*' (UNet) weights "
            f"(found {sample}{', ...' if len(keys) > 3 else ''}). A LoRA or VAE file is not a base model.")
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise LayoutError(f"the UNet takes {conv_in.shape[1]} input channels, not 4: an inpainting or "
                          "depth model, which is not a base model for DreamBooth here")
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise LayoutError("this is an SDXL refiner (one OpenCLIP encoder, no CLIP-L): fine-tune "
                          "the SDXL base model instead")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise LayoutError("no text encoder weights found (cond_stage_model.* or conditioner.embedders.*): "
                      "a UNet-only file cannot be loaded as a whole model")
