"""Quantized frozen base weights for LoRA training (``train.quantize_base``).

A LoRA run never changes its base weights, so the denoiser's linear layers can be stored in fewer
bits while the adapters train beside them in full precision (QLoRA, Dettmers et al. 2023):

    int8   torchao's int8 weight-only format: one int8 per weight and one scale per output row
           (the denoiser's dtype: float32 on CPU, the mixed-precision dtype on GPU). CPU and CUDA.
    nf4    bitsandbytes' 4-bit NormalFloat with double quantization (``Linear4bit``): half a byte
           per weight, one 8-bit absmax per 64 weights, one float32 per 256 of those. CUDA only.

``quantize_base`` converts every frozen ``nn.Linear`` of the denoiser in place, once the LoRA
adapters are attached: the layers peft wrapped (their ``base_layer``) and the others, never the
adapters. Their names do not change, so checkpoints and LoRA exports hold the same keys as without
it. Convolutions, norms and embeddings stay as they are. Only training quantizes: ``sample``,
``eval`` and every export read the base model again at full precision and put the LoRA on it, so
a fused export (``--format merged``/``diffusers``/``single-file``) merges into the original
weights, as QLoRA's adapters are merged.

The int8 layers run through ``FrozenInt8Linear``: the backward pass dequantizes the int8 weight
again instead of keeping the forward pass's full-precision copy alive until then (a plain
``F.linear`` on torchao's weight saves it, which would cost every layer's full weights), and
under autocast they compute in the autocast dtype, as the layers they replace do.

``stored_bytes`` is the resident size of a quantized layer, for ``dreambooth.plan``.
"""

from __future__ import annotations

import math

import torch

from dreambooth.errors import DreamboothError

NF4_BLOCK = 64  # weights per absmax (bitsandbytes' default blocksize for 4-bit)
NF4_NESTED_BLOCK = 256  # absmax values per float32 scale in the second (double) quantization


class QuantizeError(DreamboothError):
    pass


def check_available(mode: str, cuda: bool) -> None:
    """Refuse, before any work, a mode this machine cannot run: what is missing and what to do."""
    if mode == "int8" and not _has("torchao"):
        raise QuantizeError("train.quantize_base=int8 needs torchao: pip install 'dreambooth[quantize]' "
                            "(or pip install torchao)")
    if mode == "nf4" and not cuda:
        raise QuantizeError("train.quantize_base=nf4 needs a CUDA GPU (bitsandbytes' 4-bit layers); "
                            "on CPU use train.quantize_base=int8")
    if mode == "nf4" and not _has("bitsandbytes"):
        raise QuantizeError("train.quantize_base=nf4 needs bitsandbytes: pip install bitsandbytes")


def _has(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def frozen_linears(module: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The layers ``quantize_base`` converts: every frozen plain ``nn.Linear``, by its path (not
    peft's adapters, which are linear layers too)."""
    return {name: m for name, m in module.named_modules()
            if type(m) is torch.nn.Linear and "lora_" not in name and not m.weight.requires_grad}


def quantize_base(module: torch.nn.Module, mode: str) -> int:
    """Store ``module``'s frozen linear weights as ``mode`` (see the module doc), in place, where
    they are (device and dtype as placed); returns how many layers were converted. "none": nothing.
    DDP is told to leave the converted weights alone (it would broadcast every parameter at the
    start, which a quantized tensor does not support; each process converts the same weights)."""
    if mode == "none":
        return 0
    layers = frozen_linears(module)
    for name, layer in layers.items():
        new = _int8(layer) if mode == "int8" else _nf4(layer)
        if new is not layer:
            module.set_submodule(name, new)
    ignored = getattr(module, "_ddp_params_and_buffers_to_ignore", [])
    module._ddp_params_and_buffers_to_ignore = [*ignored, *(f"{name}.weight" for name in layers)]
    return len(layers)


class FrozenInt8Linear(torch.autograd.Function):
    """``x W^T + b`` for a frozen int8 ``W`` (torchao's ``Int8Tensor``) that keeps only the int8
    weight (already resident) for the backward pass and dequantizes it there."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        w = weight.dequantize()  # in the weight's own dtype (the mixed-precision one on GPU)
        return (grad.to(w.dtype) @ w).to(ctx.x_dtype), None, None


class Int8Linear(torch.nn.Linear):
    """An ``nn.Linear`` whose frozen weight is a torchao ``Int8Tensor`` (``FrozenInt8Linear``).
    Under autocast its input is cast to the autocast dtype first, as ``F.linear``'s would be:
    torchao computes in the input's dtype, so a float32 input would give float32 outputs and
    twice the activation memory of the unquantized layer's."""

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return FrozenInt8Linear.apply(x, self.weight, self.bias)


def _int8(layer: torch.nn.Linear) -> torch.nn.Linear:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(layer, Int8WeightOnlyConfig(), filter_fn=lambda m, _: m is layer)
    layer.__class__ = Int8Linear  # the same module, its weight converted, with the forward above
    return layer


def _nf4(layer: torch.nn.Linear) -> torch.nn.Module:
    import bitsandbytes as bnb

    weight = layer.weight
    new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                            compute_dtype=weight.dtype, compress_statistics=True, quant_type="nf4",
                            device="meta")
    new.weight = bnb.nn.Params4bit(weight.data, requires_grad=False, quant_type="nf4",
                                   compress_statistics=True, blocksize=NF4_BLOCK)
    new.bias = layer.bias
    return new.to(weight.device)  # bitsandbytes quantizes the weight as it moves to the GPU


def stored_bytes(out_features: int, in_features: int, mode: str, dtype_bytes: int) -> int:
    """Resident bytes of one ``out x in`` weight stored as ``mode`` (bias excluded). int8, as
    torchao keeps it: one byte per weight, and per row one ``dtype_bytes`` scale and one int8 zero
    point (0: the quantization is symmetric). nf4, as bitsandbytes keeps it: half a
    byte per weight, one 8-bit absmax per block of 64, one float32 per 256 absmax values, and per
    layer the 16-value NF4 code, the 256-value code of the absmax quantization and its offset
    (float32). "none": ``dtype_bytes`` per weight."""
    n = out_features * in_features
    if mode == "int8":
        return n + out_features * (dtype_bytes + 1)
    if mode == "nf4":
        blocks = math.ceil(n / NF4_BLOCK)
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 4 * (16 + 256 + 1)
    return n * dtype_bytes
