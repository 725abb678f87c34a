"""Single-file FLUX.1 and SD 3.x transformers in their original layouts: detect, read, write.

FLUX.1 is published by Black Forest Labs as one ``.safetensors`` of its transformer with bare names
(``double_blocks.N.img_attn.qkv.weight``, ``single_blocks.N.linear1.weight``, ``guidance_in.*`` on
[dev]); Stability AI's SD 3.5 files and ComfyUI's all-in-one checkpoints keep the MMDiT under
``model.diffusion_model.`` (``joint_blocks.N.x_block.attn.qkv.weight``...) beside the VAE and text
encoders. Both layouts fuse what diffusers keeps apart (q, k and v; in FLUX's single blocks also
the MLP input) and store the final modulation as (shift, scale) where diffusers has (scale, shift).

Reading (``load_transformer_file``) takes the transformer part of such a file, converts it with
diffusers' own converters (``diffusers.loaders.single_file_utils``), and loads it strictly
(every weight used, every parameter filled, every shape equal) into a model built from a local
config, so nothing is downloaded: ``config_dir`` when given, else the config a file written here
carries in its metadata, else the real-size configs shipped in ``assets/single-file/<arch>/``.
Writing (``save_transformer_file``) is the inverse map below, written as pure functions on state
dicts and tested to invert diffusers' converters exactly (same keys, equal tensors).

Known converter quirk: diffusers' FLUX converter splits ``single_blocks.N.linear1`` with a
hard-coded width of 3072 (every released FLUX.1). For other widths (the tiny test models) the
same function is run with that one constant set to the file's width (``flux_converter``).
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from dreambooth.errors import ModelError
from dreambooth.ldm_keys import LayoutError

SHIPPED = Path(__file__).parent / "assets" / "single-file"
PREFIX = "model.diffusion_model."  # SAI / ComfyUI checkpoints: the transformer's names start here
FLUX_RELEASE_WIDTH = 3072  # what diffusers' FLUX converter assumes
CONFIG_KEY = "dreambooth.transformer_config"  # metadata: the diffusers config of a file written here
ARCH_KEY = "dreambooth.architecture"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # as base_model.PICKLE_SUFFIXES (not imported: no cycle)


@dataclass(frozen=True)
class Architecture:
    name: str            # what detect_transformer returns; the shipped folder's name
    family: str          # "flux" | "sd3"
    title: str
    modelspec: str       # modelspec.architecture (kohya / SAI model spec naming)
    shipped: bool        # configs in assets/single-file/<name>/


ARCHITECTURES = {a.name: a for a in (
    Architecture("flux1-dev", "flux", "FLUX.1 [dev]", "flux-1-dev", True),
    Architecture("flux1-schnell", "flux", "FLUX.1 [schnell]", "flux-1-schnell", True),
    Architecture("sd35-medium", "sd3", "Stable Diffusion 3.5 Medium", "stable-diffusion-3.5-medium", True),
    Architecture("sd35-large", "sd3", "Stable Diffusion 3.5 Large", "stable-diffusion-3.5-large", True),
    Architecture("sd3-medium", "sd3", "Stable Diffusion 3 Medium", "stable-diffusion-3-medium", False),
)}
CLASS_NAMES = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel"}
IMPLEMENTATIONS = {"flux": "https://github.com/black-forest-labs/flux",
                   "sd3": "https://github.com/Stability-AI/sd3.5"}
DEFAULT_PREFIX = {"flux": "", "sd3": PREFIX}  # as BFL and SAI publish them
# Released sizes (hidden width, depth) of the SD3 variants, to refuse a file that mixes them.
SD3_RELEASES = {"sd35-medium": (1536, 24), "sd35-large": (2432, 38), "sd3-medium": (1536, 24)}
# Quantised or scaled files: the stored numbers are not the weights, so they are not read as such.
QUANTIZED_MARKERS = (".scale_weight", ".scale_input", "scaled_fp8", ".comfy_quant", ".absmax",
                     ".quant_map", ".quant_state", "bitsandbytes__")


# ---------------------------------------------------------------- detection


def _blocks(state: Mapping[str, Any], prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".", 1)[0]) for k in state
                   if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()})


def transformer_part(state: Mapping[str, Any]) -> dict[str, Any]:
    """The transformer's weights with bare original names: the ``model.diffusion_model.*`` part of
    a whole-pipeline checkpoint, or the whole file when nothing has that prefix (BFL files)."""
    inner = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    return inner if inner else dict(state)


def _found(state: Mapping[str, Any]) -> str:
    keys = sorted(state)
    return (", ".join(keys[:3]) or "no weights") + (", ..." if len(keys) > 3 else "")


def identify_transformer(state_dict: Mapping[str, Any]) -> str:
    """The architecture of an original-layout transformer (any name in ``ARCHITECTURES``, SD3
    Medium 3.0 included), from its key names and a few shapes; a ``LayoutError`` otherwise.

    FLUX.1 [dev] has the guidance embedder (``guidance_in.*``), [schnell] does not. The SD3
    variants differ in structure, not only size: 3.5 Medium's first 13 blocks are MMDiT-X blocks
    with a second, image-only attention (``x_block.attn2.*``) and all blocks have q/k RMS norms
    (``attn.ln_q``); 3.5 Large has the q/k norms and no ``attn2``; SD3 Medium (3.0) has neither
    (and a 192x192 position table where 3.5 Medium has 384x384). At the released widths the depth
    must match too (Medium 24 blocks of 1536, Large 38 of 2432). FLUX.1 Kontext, Krea and other
    fine-tunes of [dev] have [dev]'s exact tensors, so they are reported as ``flux1-dev``.
    """
    state = transformer_part(state_dict)
    keys = set(state)
    if not keys:
        raise LayoutError("no weights in this file")
    if any(m in k for k in keys for m in QUANTIZED_MARKERS):
        raise LayoutError("a quantised or scaled checkpoint (per-layer scales or quantisation state "
                          "beside the weights): its stored numbers are not the weights; use a "
                          "bf16/fp16/fp32 file")
    if any("lora_" in k or ".lora." in k or k.endswith(".alpha") for k in keys):
        raise LayoutError(f"a LoRA file, not a base transformer (found {_found(state)})")
    if "double_blocks.0.img_attn.norm.key_norm.scale" in keys:
        if "double_stream_modulation_img.lin.weight" in keys:
            raise LayoutError("a FLUX.2 transformer: only FLUX.1 is supported")
        if any(k.startswith("distilled_guidance_layer.") for k in keys):
            raise LayoutError("a Chroma transformer (FLUX.1 without modulation layers): not supported")
        if "img_in.weight" not in keys or "double_blocks.0.img_mlp.0.weight" not in keys:
            raise LayoutError(f"a FLUX-like transformer of an unknown variant (found {_found(state)})")
        in_features = state["img_in.weight"].shape[1]
        if in_features in (384, 128):
            variant = "Fill" if in_features == 384 else "Depth or Canny"
            raise LayoutError(f"a FLUX.1 {variant} transformer ({in_features} input channels): a "
                              "conditioned model, not a base model for DreamBooth here")
        return "flux1-dev" if "guidance_in.in_layer.weight" in keys else "flux1-schnell"
    if "joint_blocks.0.context_block.attn.qkv.weight" in keys:
        if any(k.startswith("context_processor.") for k in keys):
            raise LayoutError("an MMDiT with a context processor (not SD3 / SD3.5): not supported")
        if "x_embedder.proj.weight" not in keys or "pos_embed" not in keys:
            raise LayoutError(f"an SD3-like transformer of an unknown variant (found {_found(state)})")
        dual = any(".x_block.attn2." in k for k in keys)
        qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in keys
        name = "sd35-medium" if dual else "sd35-large" if qk_norm else "sd3-medium"
        if dual and not qk_norm:
            raise LayoutError("an SD3-like transformer with dual attention but no q/k norms: unknown variant")
        width, depth = state["x_embedder.proj.weight"].shape[0], len(_blocks(state, "joint_blocks."))
        released = {size: n for n, size in SD3_RELEASES.items()}
        if width in {w for w, _ in SD3_RELEASES.values()} and SD3_RELEASES[name] != (width, depth):
            other = released.get((width, depth), "no released model")
            raise LayoutError(f"an SD3 transformer with {name}'s blocks but {depth} blocks of width "
                              f"{width} (the size of {other}): unknown variant")
        return name
    if "input_blocks.0.0.weight" in keys:
        raise LayoutError("a Stable Diffusion UNet checkpoint (SD 1.x/2.x/XL): that is the SD single-file import")
    if "x_embedder.weight" in keys and "transformer_blocks.0.attn.to_q.weight" in keys:
        raise LayoutError("a FLUX transformer in diffusers names, not the original layout: load its "
                          "folder with from_pretrained")
    if "pos_embed.proj.weight" in keys and "transformer_blocks.0.attn.to_q.weight" in keys:
        raise LayoutError("an SD3 transformer in diffusers names, not the original layout: load its "
                          "folder with from_pretrained")
    raise LayoutError("not a FLUX.1 or SD3 transformer: no 'double_blocks.*' or 'joint_blocks.*' "
                      f"weights (found {_found(state)})")


def detect_transformer(state_dict: Mapping[str, Any]) -> str:
    """``flux1-dev`` | ``flux1-schnell`` | ``sd35-medium`` | ``sd35-large`` from an original-layout
    state dict (bare BFL names or ``model.diffusion_model.*``); a ``LayoutError`` naming what was
    found otherwise, SD3 Medium 3.0 included (told apart as ``identify_transformer`` says; no
    config is shipped for it: ``load_transformer_file(path, config_dir=...)`` reads it)."""
    name = identify_transformer(state_dict)
    if not ARCHITECTURES[name].shipped:
        raise LayoutError(f"a {ARCHITECTURES[name].title} (3.0) transformer (no q/k norms, no dual "
                          "attention): no config is shipped for it; pass a diffusers folder of it as config_dir")
    return name


def architecture_of(transformer) -> str:
    """The architecture name of a diffusers transformer, from its class and config."""
    config = transformer.config
    kind = type(transformer).__name__
    if kind == CLASS_NAMES["flux"]:
        return "flux1-dev" if config.guidance_embeds else "flux1-schnell"
    if kind == CLASS_NAMES["sd3"]:
        if config.get("dual_attention_layers"):
            return "sd35-medium"
        return "sd35-large" if config.get("qk_norm") else "sd3-medium"
    raise LayoutError(f"{kind} is not a FLUX.1 or SD3 transformer")


# ---------------------------------------------------------------- diffusers -> original (pure)


class _Take:
    """Pops weights from a copy of a state dict; ``done`` refuses any weight nobody took."""

    def __init__(self, state: Mapping[str, Any]):
        self.state = dict(state)

    def __call__(self, key: str):
        try:
            return self.state.pop(key)
        except KeyError:
            raise LayoutError(f"missing weight '{key}'") from None

    def has(self, key: str) -> bool:
        return key in self.state

    def done(self) -> None:
        if self.state:
            extra = sorted(self.state)
            raise LayoutError(f"no original name for weight '{extra[0]}'"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def _swap_halves(t):
    """(a, b) -> (b, a) along dim 0: diffusers' ``swap_scale_shift``, which is its own inverse."""
    import torch

    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _writer(take: _Take, out: dict[str, Any]) -> tuple[Callable, Callable, Callable, Callable]:
    import torch

    def linear(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = take(f"{src}.weight")
        if take.has(f"{src}.bias"):
            out[f"{dst}.bias"] = take(f"{src}.bias")

    def fused(srcs: list[str], dst: str) -> None:
        out[f"{dst}.weight"] = torch.cat([take(f"{s}.weight") for s in srcs], dim=0)
        out[f"{dst}.bias"] = torch.cat([take(f"{s}.bias") for s in srcs], dim=0)

    def norm(src: str, dst: str) -> None:
        out[dst] = take(src)

    def swapped(src: str, dst: str) -> None:  # a modulation diffusers stores (scale, shift), the original (shift, scale)
        out[f"{dst}.weight"] = _swap_halves(take(f"{src}.weight"))
        out[f"{dst}.bias"] = _swap_halves(take(f"{src}.bias"))

    return linear, fused, norm, swapped


def flux_to_original(state: Mapping[str, Any]) -> dict[str, Any]:
    """BFL FLUX.1 names (bare) from a diffusers ``FluxTransformer2DModel`` state dict: the inverse
    of ``convert_flux_transformer_checkpoint_to_diffusers``."""
    take, out = _Take(state), {}
    linear, fused, norm, swapped = _writer(take, out)
    linear("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    linear("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    linear("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    linear("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    if take.has("time_text_embed.guidance_embedder.linear_1.weight"):
        linear("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
        linear("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    linear("context_embedder", "txt_in")
    linear("x_embedder", "img_in")
    for i in _blocks(state, "transformer_blocks."):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        linear(d + "norm1.linear", o + "img_mod.lin")
        linear(d + "norm1_context.linear", o + "txt_mod.lin")
        fused([d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], o + "img_attn.qkv")
        fused([d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"], o + "txt_attn.qkv")
        norm(d + "attn.norm_q.weight", o + "img_attn.norm.query_norm.scale")
        norm(d + "attn.norm_k.weight", o + "img_attn.norm.key_norm.scale")
        norm(d + "attn.norm_added_q.weight", o + "txt_attn.norm.query_norm.scale")
        norm(d + "attn.norm_added_k.weight", o + "txt_attn.norm.key_norm.scale")
        linear(d + "ff.net.0.proj", o + "img_mlp.0")
        linear(d + "ff.net.2", o + "img_mlp.2")
        linear(d + "ff_context.net.0.proj", o + "txt_mlp.0")
        linear(d + "ff_context.net.2", o + "txt_mlp.2")
        linear(d + "attn.to_out.0", o + "img_attn.proj")
        linear(d + "attn.to_add_out", o + "txt_attn.proj")
    for i in _blocks(state, "single_transformer_blocks."):
        s, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        linear(s + "norm.linear", o + "modulation.lin")
        fused([s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"], o + "linear1")
        norm(s + "attn.norm_q.weight", o + "norm.query_norm.scale")
        norm(s + "attn.norm_k.weight", o + "norm.key_norm.scale")
        linear(s + "proj_out", o + "linear2")
    linear("proj_out", "final_layer.linear")
    swapped("norm_out.linear", "final_layer.adaLN_modulation.1")
    take.done()
    return out


def sd3_to_original(state: Mapping[str, Any]) -> dict[str, Any]:
    """SAI MMDiT names (bare, without ``model.diffusion_model.``) from a diffusers
    ``SD3Transformer2DModel`` state dict: the inverse of ``convert_sd3_transformer_checkpoint_to_diffusers``.
    The last block is context-pre-only (no text output projection or MLP) and stores its text
    modulation as (shift, scale), like the final layer."""
    take, out = _Take(state), {}
    linear, fused, norm, swapped = _writer(take, out)
    norm("pos_embed.pos_embed", "pos_embed")
    linear("pos_embed.proj", "x_embedder.proj")
    linear("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    linear("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    linear("context_embedder", "context_embedder")
    linear("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    linear("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    blocks = _blocks(state, "transformer_blocks.")
    for i in blocks:
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == blocks[-1]
        fused([d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], x + "attn.qkv")
        fused([d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"], c + "attn.qkv")
        if take.has(d + "attn.norm_q.weight"):
            norm(d + "attn.norm_q.weight", x + "attn.ln_q.weight")
            norm(d + "attn.norm_k.weight", x + "attn.ln_k.weight")
            norm(d + "attn.norm_added_q.weight", c + "attn.ln_q.weight")
            norm(d + "attn.norm_added_k.weight", c + "attn.ln_k.weight")
        linear(d + "attn.to_out.0", x + "attn.proj")
        if not last:
            linear(d + "attn.to_add_out", c + "attn.proj")
        if take.has(d + "attn2.to_q.weight"):
            fused([d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"], x + "attn2.qkv")
            if take.has(d + "attn2.norm_q.weight"):
                norm(d + "attn2.norm_q.weight", x + "attn2.ln_q.weight")
                norm(d + "attn2.norm_k.weight", x + "attn2.ln_k.weight")
            linear(d + "attn2.to_out.0", x + "attn2.proj")
        linear(d + "norm1.linear", x + "adaLN_modulation.1")
        if last:
            swapped(d + "norm1_context.linear", c + "adaLN_modulation.1")
        else:
            linear(d + "norm1_context.linear", c + "adaLN_modulation.1")
        linear(d + "ff.net.0.proj", x + "mlp.fc1")
        linear(d + "ff.net.2", x + "mlp.fc2")
        if not last:
            linear(d + "ff_context.net.0.proj", c + "mlp.fc1")
            linear(d + "ff_context.net.2", c + "mlp.fc2")
    linear("proj_out", "final_layer.linear")
    swapped("norm_out.linear", "final_layer.adaLN_modulation.1")
    take.done()
    return out


TO_ORIGINAL = {"flux": flux_to_original, "sd3": sd3_to_original}


def family_of(transformer) -> str:
    return ARCHITECTURES[architecture_of(transformer)].family


def to_original(transformer, prefix: str | None = None) -> dict[str, Any]:
    """The transformer's weights in its original layout, under ``prefix`` (default: as BFL / SAI
    publish them: bare for FLUX.1, ``model.diffusion_model.`` for SD3)."""
    family = family_of(transformer)
    prefix = DEFAULT_PREFIX[family] if prefix is None else prefix
    state = TO_ORIGINAL[family](transformer.state_dict())
    return {prefix + k: v for k, v in state.items()}


# ---------------------------------------------------------------- original -> diffusers (diffusers' converters)


def flux_converter(width: int = FLUX_RELEASE_WIDTH) -> Callable[..., dict[str, Any]]:
    """diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` for a FLUX transformer of
    this hidden ``width``. diffusers hard-codes ``inner_dim = 3072`` (the released FLUX.1 models)
    to split the single blocks' fused ``linear1``; for another width the same code runs with that
    constant replaced. If a later diffusers reads the width itself the constant is gone and its
    function is returned unchanged."""
    from diffusers.loaders import single_file_utils

    fn = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
    code = fn.__code__
    if width == FLUX_RELEASE_WIDTH or FLUX_RELEASE_WIDTH not in code.co_consts:
        return fn
    consts = tuple(width if type(c) is int and c == FLUX_RELEASE_WIDTH else c for c in code.co_consts)
    return types.FunctionType(code.replace(co_consts=consts), fn.__globals__, fn.__name__,
                              fn.__defaults__, fn.__closure__)


def from_original(state: Mapping[str, Any], family: str) -> dict[str, Any]:
    """diffusers names from original-layout names (bare or ``model.diffusion_model.*``), by
    diffusers' own converter; a weight the converter leaves unused is an error."""
    from diffusers.loaders import single_file_utils

    work = transformer_part(state)  # a copy: diffusers' converters pop what they use
    if family == "flux":
        converter = flux_converter(work["img_in.weight"].shape[0])
    else:
        converter = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers
    try:
        converted = converter(work)
    except KeyError as e:
        raise LayoutError(f"the {family} converter found no weight {e}") from None
    except RuntimeError as e:
        raise LayoutError(f"the {family} converter could not split a weight: {str(e).splitlines()[0]}") from None
    if work:
        extra = sorted(work)
        raise LayoutError(f"weight '{extra[0]}' has no place in a {family} transformer"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return converted


# ---------------------------------------------------------------- files


def holds_transformer(path: Path, trust_pickle: bool = False) -> bool:
    """Whether a single file holds a FLUX.1 / SD 3.x transformer (BFL names, or SAI's MMDiT under
    ``model.diffusion_model.``), read from its key names alone where it is a ``.safetensors``."""
    from dreambooth.single_file import read_checkpoint

    if not path.is_file():
        return False
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception:
            return False  # load_single_file names the damage
    else:
        keys = list(read_checkpoint(path, trust_pickle)[0])
    marks = ("double_blocks.", "single_blocks.", "joint_blocks.")
    return any(k.removeprefix(PREFIX).startswith(marks) for k in keys)


def read_transformer_state(path: str | Path, trust_pickle: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """(transformer weights with bare original names, safetensors metadata) of one file. Only
    the transformer's tensors are read from a whole-pipeline ``.safetensors``; pickle files are
    refused unless trusted (``single_file.read_checkpoint``)."""
    from dreambooth.single_file import read_checkpoint

    def transformer_keys(keys: list[str]) -> list[str]:
        return [k for k in keys if k.startswith(PREFIX)] or keys

    state, metadata = read_checkpoint(Path(path), trust_pickle, select=transformer_keys)
    return transformer_part(state), metadata


def _config(name: str, config_dir: str | Path | None, metadata: Mapping[str, str]) -> tuple[dict, str]:
    """(diffusers transformer config, where it came from)."""
    if config_dir is not None:
        folder = Path(config_dir).expanduser()
        for candidate in (folder / "transformer" / "config.json", folder / "config.json"):
            if candidate.is_file():
                return json.loads(candidate.read_text()), str(candidate)
        raise ModelError(f"{folder} has no transformer/config.json or config.json")
    if CONFIG_KEY in metadata:
        return json.loads(metadata[CONFIG_KEY]), "the file's own metadata"
    arch = ARCHITECTURES[name]
    if not arch.shipped:
        raise ModelError(f"this is a {arch.title} (3.0) transformer; no config is shipped for it: pass "
                         "config_dir, a diffusers folder of that model (transformer/config.json)")
    path = SHIPPED / name / "transformer" / "config.json"
    return json.loads(path.read_text()), str(path)


def load_transformer_file(path: str | Path, config_dir: str | Path | None = None, *, dtype=None,
                          trust_pickle: bool = False):
    """A diffusers ``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` (CPU, eval mode, ``dtype``,
    default float32) from one original-layout file, offline.

    ``path``: a BFL FLUX.1 file, an SAI SD 3.5 file, or a whole-pipeline checkpoint (ComfyUI,
    SAI "incl_clips") whose transformer is under ``model.diffusion_model.`` (only that part is
    read). ``config_dir``: a diffusers pipeline folder (``transformer/config.json``) or a
    transformer folder (``config.json``); default: the config a file written by
    ``save_transformer_file`` carries, else the shipped config of the detected architecture.
    Every weight must land on a parameter of the same shape and every parameter must be filled.
    """
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"transformer file not found: {path}; nothing is downloaded")
    state, metadata = read_transformer_state(path, trust_pickle)
    try:
        name = identify_transformer(state)
    except LayoutError as e:
        raise ModelError(f"{path}: {e}") from None
    family = ARCHITECTURES[name].family
    config, source = _config(name, config_dir, metadata)
    cls = {"flux": FluxTransformer2DModel, "sd3": SD3Transformer2DModel}[family]
    if config.get("_class_name", cls.__name__) != cls.__name__:
        raise ModelError(f"{path} holds a {ARCHITECTURES[name].title} transformer, but {source} "
                         f"configures a {config.get('_class_name')}")
    try:
        converted = from_original(state, family)
    except LayoutError as e:
        raise ModelError(f"{path}: {e}") from None
    del state
    with init_empty_weights(include_buffers=True):
        model = cls.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = sorted(k for k in set(expected) & set(converted) if tuple(converted[k].shape) != expected[k])
    if missing or unexpected or wrong:
        what = (f"{len(missing)} parameters missing (e.g. {missing[0]})" if missing else
                f"{len(unexpected)} weights without a parameter (e.g. {unexpected[0]})" if unexpected else
                f"{len(wrong)} shapes differ (e.g. {wrong[0]}: {tuple(converted[wrong[0]].shape)} in the "
                f"file, {expected[wrong[0]]} in the config)")
        raise ModelError(f"{path} has {ARCHITECTURES[name].title} weights that do not fit {source}: {what}. "
                         "A model of another size needs its own config: pass config_dir")
    dtype = dtype or torch.float32
    for k in list(converted):  # own, 64-byte-aligned copies: safetensors hands out tensors at the
        v = converted.pop(k)   # file's 8-byte offsets, and CPU kernels then round differently
        converted[k] = v.to(dtype=dtype if v.is_floating_point() else v.dtype, copy=True)
    model.load_state_dict(converted, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelError(f"{path}: {left[0]} was not loaded")
    return model.eval()


def save_transformer_file(transformer, path: str | Path, dtype=None, *, prefix: str | None = None,
                          metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``transformer`` as one original-layout ``.safetensors`` (cast to ``dtype`` when given):
    bare BFL names for FLUX.1, ``model.diffusion_model.*`` SAI names for SD3 (``prefix`` overrides).
    The metadata names the architecture (``modelspec.architecture``, ``dreambooth.architecture``)
    and carries the diffusers config, so ``load_transformer_file`` rebuilds this exact model."""
    from safetensors.torch import save_file

    path = Path(path)
    name = architecture_of(transformer)
    arch = ARCHITECTURES[name]
    state = {}
    for k, v in to_original(transformer, prefix).items():
        v = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        state[k] = v.detach().contiguous().cpu()
    info = {"format": "pt", ARCH_KEY: name, CONFIG_KEY: transformer.to_json_string(),
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch.modelspec,
            "modelspec.implementation": IMPLEMENTATIONS[arch.family],
            "modelspec.title": arch.title, "modelspec.resolution": "1024x1024"}
    info.update(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=info)
    return path


def shipped_folder(name: str) -> Path:
    """The shipped diffusers configs (no weights) of a detected architecture."""
    if name not in ARCHITECTURES or not ARCHITECTURES[name].shipped:
        raise ModelError(f"no configs are shipped for {name!r}; shipped: "
                         + ", ".join(n for n, a in ARCHITECTURES.items() if a.shipped))
    return SHIPPED / name
