"""The null space read with output weighting (was ``prior.null_space_weighting: outputs``).

``dreambooth.nullspace`` reads, for every linear and convolutional layer of the UNet, the second
moment ``C = sum x x^T`` of the inputs the class prompt gives it. Here each input row counts in
``C`` by how much the UNet's output depends on that row's output: the squared norm of its
gradient under a random projection of the output (Hutchinson's estimate of J J^T), so energy the
output ignores is not held. The pure math and the hold are the package's; only the reading differs.
"""

from __future__ import annotations

import torch
from torch import nn

from dreambooth.nullspace import PROBE_BATCH, PROBE_SEED, keep_basis, layer_inputs


def add_moment(moments: dict, name: str, rows: torch.Tensor, weights: torch.Tensor | None = None) -> None:
    """moments[name] += sum_i w_i x_i x_i^T over the (rows, in) ``rows`` (w = 1 without weights)."""
    r = rows.double()
    m = (r * weights.double()[:, None]).T @ r if weights is not None else r.T @ r
    moments[name] = moments[name] + m if name in moments else m


def output_rows(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """Per-row squared norm of a layer's output gradient, rows in ``layer_inputs``' order."""
    if isinstance(module, nn.Linear):
        return grad.reshape(-1, grad.shape[-1]).pow(2).sum(1)
    return grad.flatten(2).transpose(1, 2).reshape(-1, grad.shape[1]).pow(2).sum(1)


def input_bases(unet, scheduler, latents: torch.Tensor, conds: list[dict], batches: int, min_t: int,
                energy: float, concat, weighting: str = "outputs") -> dict[str, torch.Tensor]:
    """As ``dreambooth.nullspace.input_bases``; ``weighting`` "inputs" counts every row alike."""
    moments, hooks = {}, []
    grads = weighting == "outputs"

    def hook(name):
        def accumulate(module, args, out):
            rows = layer_inputs(module, args[0].detach())
            if rows is None:
                return
            if grads:  # counted once the backward pass reaches this layer's output
                out.register_hook(lambda g: add_moment(moments, name, rows, output_rows(module, g)))
            else:
                add_moment(moments, name, rows)
        return accumulate

    for name, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            hooks.append(module.register_forward_hook(hook(name)))
    gen = torch.Generator().manual_seed(PROBE_SEED)
    device = next(unet.parameters()).device
    flags = [(p, p.requires_grad) for p in unet.parameters()] if grads else []
    for p, _ in flags:  # weights that need grads: the backward pass reaches every layer's output
        p.requires_grad_(True)
    try:
        with torch.set_grad_enabled(grads):
            for k in range(batches):
                idx = torch.randint(0, len(latents), (PROBE_BATCH,), generator=gen)
                x0 = latents[idx].to(device).contiguous()
                eps = torch.randn(x0.shape, generator=gen).to(device)
                ts = torch.randint(min_t, scheduler.config.num_train_timesteps, (PROBE_BATCH,), generator=gen).to(device)
                batch = cond = conds[k % 2]
                for _ in range(PROBE_BATCH - 1):
                    batch = concat(batch, cond)
                out = unet(scheduler.add_noise(x0, eps, ts), ts, **batch).sample
                if grads:  # Hutchinson: E[g g^T] over random v is J J^T
                    (out * torch.randn(out.shape, generator=gen).to(device)).sum().backward()
    finally:
        for p, wanted in flags:
            p.requires_grad_(wanted)
            p.grad = None
        for h in hooks:
            h.remove()
    return {name: keep_basis(m, energy).to(device) for name, m in moments.items()}
