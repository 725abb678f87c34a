"""LoRA adapters of a model (peft): read them out, scale them, fold them into the weights.

A LoRA run's model carries peft adapters on some linear layers of the UNet (and text
encoders): ``y = W x + s * B A x`` with ``s = alpha / r``. Exports see them as plain tensors,
``LoraLayer(down=A, up=B, alpha)`` keyed ``"<component>.<module path>"``; the file formats
(diffusers, kohya) are written from that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from dreambooth.models import BaseModel

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class LoraLayer:
    down: Any  # A: (r, in) or (r, in, k, k)
    up: Any  # B: (out, r) or (out, r, 1, 1)
    alpha: float  # the layer computes W x + alpha / r * B A x (r = down.shape[0])

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def _tuner_layers(model: BaseModel) -> Iterator[tuple[str, str, Any]]:
    """(component, module path, peft layer) for every LoRA-wrapped layer of the model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component in COMPONENTS:
        module = getattr(model, component, None)
        if module is None:
            continue
        for path, layer in module.named_modules():
            if isinstance(layer, BaseTunerLayer):
                yield component, path, layer


def has_lora(model: BaseModel) -> bool:
    return next(_tuner_layers(model), None) is not None


def _adapter(layer) -> str:
    names = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(names) != 1:
        raise ValueError(f"expected one active LoRA adapter, found {names or 'none'}")
    return names[0]


def collect_lora(model: BaseModel) -> dict[str, LoraLayer]:
    """Every LoRA layer as plain tensors (copies), with its effective alpha (scaling x rank:
    it already includes any ``scale_lora``)."""
    out = {}
    for component, path, layer in _tuner_layers(model):
        name = _adapter(layer)
        down = layer.lora_A[name].weight.detach().clone()
        out[f"{component}.{path}"] = LoraLayer(down=down, up=layer.lora_B[name].weight.detach().clone(),
                                               alpha=float(layer.scaling[name] * down.shape[0]))
    return out


def scale_lora(model: BaseModel, scale: float) -> None:
    """Multiply every adapter's strength by ``scale``, in place (1.0: as trained)."""
    for _, _, layer in _tuner_layers(model):
        layer.scale_layer(scale)


def merge_lora(model: BaseModel, scale: float = 1.0) -> None:
    """Fold the adapters into the base weights (``W += scale * alpha / r * B A``) and remove
    them, in place: the model becomes a plain full model."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    scale_lora(model, scale)
    adapted = set()
    for component, _, layer in _tuner_layers(model):
        layer.merge(adapter_names=[_adapter(layer)])
        adapted.add(component)
    for component in adapted:
        module = getattr(model, component)
        recurse_remove_peft_layers(module)
        if hasattr(module, "peft_config"):
            del module.peft_config
        module._hf_peft_config_loaded = False


def diffusers_lora_layers(layers: dict[str, LoraLayer], dtype=None) -> dict[str, dict[str, Any]]:
    """``{component: state dict}`` for ``save_lora_weights`` (keys ``<path>.lora.down.weight``
    etc., as diffusers writes them). That format has no alpha: ``alpha / r`` is folded into the
    up weights, so the file loads at the right strength in any diffusers version. Text-encoder
    paths are written under ``text_model.`` whatever the installed transformers nests
    (``hf_names.text_model_path``): diffusers on transformers 4.x reads only those, 5.x both."""
    from diffusers.utils import convert_state_dict_to_diffusers

    from dreambooth.hf_names import text_model_path

    peft_style: dict[str, dict[str, Any]] = {}
    for key, layer in layers.items():
        component, _, path = key.partition(".")
        if component.startswith("text_encoder"):
            path = text_model_path(path)
        up = layer.up * (layer.alpha / layer.rank)
        part = peft_style.setdefault(component, {})
        part[f"{path}.lora_A.weight"] = layer.down.to(dtype or layer.down.dtype).contiguous()
        part[f"{path}.lora_B.weight"] = up.to(dtype or up.dtype).contiguous()
    # the transformer families' files keep peft's names, as diffusers' own FLUX.1 / SD3 scripts save them
    return {c: sd if c == "transformer" else convert_state_dict_to_diffusers(sd) for c, sd in peft_style.items()}
