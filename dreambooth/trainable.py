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


EIGHT_BIT = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit"}  # train.optimizer -> bitsandbytes
OFFLOAD_MIN_SIZE = 4096  # torchao's default minimal_size: smaller tensors keep their AdamW on the GPU


def check_optimizer(cfg, cuda: bool) -> None:
    """Refuse the optimizer settings that need a CUDA GPU on a machine without one (config.py
    refuses the combinations that cannot work anywhere)."""
    t = cfg.train
    if t.optimizer in EIGHT_BIT and not cuda:
        raise DreamboothError(f"train.optimizer={t.optimizer} needs a CUDA GPU (bitsandbytes); "
                              "use train.optimizer=adamw on CPU")
    if t.offload_optimizer and not cuda:
        raise DreamboothError("train.offload_optimizer=true moves AdamW's state from a CUDA GPU to host memory "
                              "(torchao); on CPU the state is in host memory already: set train.offload_optimizer=false")


def make_optimizer(cfg, trainable: Trainable, plan: bool = False) -> torch.optim.Optimizer:
    """AdamW (bitsandbytes' 8-bit or paged 8-bit AdamW; or AdamW offloaded to the CPU by torchao)
    over the trainable weights: one parameter group per module, the text encoders at
    ``train.text_encoder_lr`` when set. ``plan``: for a planned step (``dreambooth.plan``), plain
    AdamW stands in for the 8-bit and the offloaded ones, whose state the plan scales or moves."""
    t = cfg.train  # (train.check_run has refused, through check_optimizer, what this machine cannot run)
    token_only = t.train_token and not t.train_text_encoder  # no decay on the untouched rows
    groups = []
    for name, module in trainable.modules.items():
        text = name in TEXT_ENCODERS
        groups.append({"params": [p for p in module.parameters() if p.requires_grad],
                       "lr": (t.text_encoder_lr or t.lr) if text else t.lr,
                       **({"weight_decay": 0.0} if text and token_only else {})})
    kwargs = dict(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
    if t.optimizer in EIGHT_BIT and not plan:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise DreamboothError(f"train.optimizer={t.optimizer} needs bitsandbytes: pip install bitsandbytes") from None
        return getattr(bnb.optim, EIGHT_BIT[t.optimizer])(groups, **kwargs)
    if t.offload_optimizer and not plan:
        return _offloaded(groups, kwargs, clipped=t.max_grad_norm > 0)
    # fused (CPU and CUDA, planned steps too): one kernel for the update, no temporaries; on one
    # CPU thread the tiny UNet's optimizer step takes 21-25% less CPU time (docs/performance.md)
    devices = {p.device.type for g in groups for p in g["params"]}
    return torch.optim.AdamW(groups, fused=devices <= {"cpu", "cuda"}, **kwargs)


def _offloaded(groups: list[dict], kwargs: dict, clipped: bool) -> torch.optim.Optimizer:
    """torchao's ``CPUOffloadOptimizer`` (fused CPU AdamW on pinned host copies of the weights;
    tensors under ``OFFLOAD_MIN_SIZE`` values keep a GPU AdamW), with two changes the training loop
    needs. It copies each gradient to the host as the backward pass leaves it, before the loop
    clips the gradients: with ``train.max_grad_norm`` the step copies the clipped ones again. And
    it copies the weights to the host only when built: a resume loads the checkpoint's weights
    into the GPU's after that, so loading the optimizer state copies them again.

    Not run here: CPUOffloadOptimizer needs a CUDA device, and no GPU was lent to this work, so
    neither the step nor a resume through it has run (the plan's figures for it are computed)."""
    try:
        from torchao.optim import CPUOffloadOptimizer
    except ImportError:
        raise DreamboothError("train.offload_optimizer=true needs torchao: pip install 'dreambooth[quantize]'") from None

    class Offloaded(CPUOffloadOptimizer):
        @torch.no_grad()
        def step(self, closure=None):
            if clipped:
                for p_device, copied in self.queue.items():
                    copied.synchronize()  # the hook's copy is done; overwrite it with the clipped gradient
                    self.param_d2h_map[p_device].grad.copy_(p_device.grad)
            return super().step(closure)

        @torch.no_grad()
        def load_state_dict(self, state_dict):
            for p_device, p_host in self.param_d2h_map.items():
                p_host.copy_(p_device)
            super().load_state_dict(state_dict)

    return Offloaded(groups, torch.optim.AdamW, minimal_size=OFFLOAD_MIN_SIZE, **kwargs)
