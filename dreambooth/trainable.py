"""The weights a run trains, as one object: which modules train, how (full or LoRA), their
optimizer, and their tensors by the names a checkpoint stores.

``make_trainable`` is the one place where full fine-tuning and LoRA differ: full unfreezes whole
modules, LoRA adds peft adapters (the base weights stay frozen) and trains only those. The
family says *which* modules train (the denoiser, the text encoders when asked).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dreambooth.errors import DreamboothError
from dreambooth.family import TEXT_ENCODERS, family_of
from dreambooth.models import BaseModel


@dataclass
class Trainable:
    """The trained modules of a model, ``{"unet": ..., "text_encoder": ...}``, and (after
    ``accelerate.prepare``) their wrappers, through which forward passes run."""

    modules: dict[str, torch.nn.Module]
    wrapped: dict[str, torch.nn.Module] = field(default_factory=dict)

    def weights(self) -> dict[str, torch.Tensor]:
        """The trainable tensors named '<module>.<param>' (what a checkpoint holds)."""
        return {f"{name}.{p_name}": p for name, m in self.modules.items()
                for p_name, p in m.named_parameters() if p.requires_grad}

    def parameters(self) -> list[torch.Tensor]:
        return [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]

    def trains_text(self) -> bool:
        return any(name in self.modules for name in TEXT_ENCODERS)

    def load(self, saved: dict[str, torch.Tensor]) -> None:
        """Put a checkpoint's tensors into the trainable weights; both must name the same tensors."""
        weights = self.weights()
        if saved.keys() != weights.keys():
            odd = sorted(saved.keys() ^ weights.keys())[:3]
            raise DreamboothError(f"the checkpoint does not match the model's trainable weights "
                                  f"({len(saved)} saved, {len(weights)} expected; e.g. {odd})")
        with torch.no_grad():
            for name, tensor in saved.items():
                weights[name].copy_(tensor)


def make_trainable(model: BaseModel, cfg) -> Trainable:
    """Freeze everything, then make trainable what the config asks for (see the module doc)."""
    family = family_of(model, cfg)
    for m in model.modules():
        m.requires_grad_(False)
    parts = family.parts(model, cfg)
    if cfg.train.mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        for name, module in parts.items():
            config = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                init_lora_weights="gaussian", target_modules=family.lora_targets(cfg.lora, name))
            if module is family.denoiser(model):
                module.add_adapter(config)
            else:  # peft directly: transformers' add_adapter insists on a newer peft than exists
                inject_adapter_in_model(config, module)
                for p_name, p in module.named_parameters():
                    p.requires_grad_("lora_" in p_name)
    else:
        for module in parts.values():
            module.requires_grad_(True)
    if cfg.train.train_token and not cfg.train.train_text_encoder:
        train_token_only(model.text_encoder, model.tokenizer, cfg.data.token)
    return Trainable(parts)


def train_token_only(text_encoder, tokenizer, token: str) -> None:
    """Freeze the text encoder except the input-embedding rows of ``token``'s BPE pieces: the
    embedding matrix is trainable, and a gradient hook zeroes every other row (with Adam and no
    weight decay on it, those rows then never move)."""
    ids = tokenizer(token, add_special_tokens=False).input_ids
    text_encoder.requires_grad_(False)
    weight = text_encoder.get_input_embeddings().weight
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype)
    mask[ids] = 1.0
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))


def make_optimizer(cfg, trainable: Trainable, plan: bool = False) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW) over the trainable weights: one parameter group per
    module, the text encoders at ``train.text_encoder_lr`` when set. ``plan``: for a planned step
    (``dreambooth.plan``), plain AdamW stands in for the 8-bit one, whose state the plan scales."""
    t = cfg.train
    token_only = t.train_token and not t.train_text_encoder  # no decay on the untouched rows
    groups = []
    for name, module in trainable.modules.items():
        text = name in TEXT_ENCODERS
        groups.append({"params": [p for p in module.parameters() if p.requires_grad],
                       "lr": (t.text_encoder_lr or t.lr) if text else t.lr,
                       **({"weight_decay": 0.0} if text and token_only else {})})
    kwargs = dict(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
    if t.optimizer == "adamw8bit" and not plan:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise DreamboothError("train.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    # fused (CPU and CUDA, planned steps too): one kernel for the update, no temporaries; on one
    # CPU thread the tiny UNet's update takes 1.7 ms fused, 6-8 ms unfused (docs/performance.md)
    devices = {p.device.type for g in groups for p in g["params"]}
    return torch.optim.AdamW(groups, fused=devices <= {"cpu", "cuda"}, **kwargs)
