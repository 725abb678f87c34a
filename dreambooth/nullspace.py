"""Keep each UNet layer's change off the inputs the class prompt gives it (``prior.null_space``).

The world preset's option (docs/world.md): it holds the class prompt's prediction layer by layer,
as AlphaEdit does for language models (Fang et al., 2024): a linear or convolutional layer's output
changes by ``dW x``, so a change ``dW`` with ``dW x = 0`` for every input ``x`` the layer sees under
the class prompt leaves that layer's output, and so the next layer's input, as it was. By induction
the class prompt's whole prediction stays put, not only to first order, while inputs the class
prompt never produces (the identifier's token, the subject's mark) still move the layers.

1. Before training, forward passes of the frozen UNet on noisy class images (t >=
   ``prior.null_space_min_t``) under the class prompt and the empty prompt (classifier-free
   guidance's two branches) accumulate, for every ``nn.Linear`` and ``nn.Conv2d``, the
   second-moment matrix ``C = sum x x^T`` of its inputs: unfolded patches for a convolution, and a
   constant 1 appended when the layer has a bias (so the bias is held as one more input).
2. ``keep_basis``: the eigenvectors of ``C`` that carry the fraction ``prior.null_space`` of its
   energy (0.95 measured best on the world model, docs/world.md). The rest of what the class
   prompt feeds the layer is below that, and free to move.
3. After every optimizer step each layer's change from its base value, as an (out, in) matrix,
   loses its component on those inputs: ``dW <- dW - (dW U) U^T``. Norm layers, whose scale and
   shift every input reads, are held at their base values.

Memory is one (in, in) second moment per layer while reading (float64) and one (in, k) basis after
(in = in_channels x kernel area + 1), all layers at once: 0.36 GiB for the world model, but 79 GiB
for a Stable Diffusion UNet (``estimated_bytes``), which training refuses; reading one layer at a
time would fit it, and is not written. Pure math (``keep_basis``, ``project_inputs_off``)
is apart from the probing (``input_bases``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PROBE_SEED = 4321  # the probing's own generator: the same bases on every run and resume
PROBE_BATCH = 8  # noisy class images per forward pass


def keep_basis(second_moment: torch.Tensor, energy: float) -> torch.Tensor:
    """(d, d) symmetric PSD matrix -> (d, k) orthonormal eigenvectors with the k largest eigenvalues,
    k the fewest whose eigenvalues sum to at least ``energy`` of the trace (d, 0 if the trace is 0)."""
    values, vectors = torch.linalg.eigh(second_moment.double())
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    total = values.sum()
    if total <= 0:
        return vectors[:, :0].float()
    k = int(torch.searchsorted(torch.cumsum(values, 0) / total, torch.tensor(energy, dtype=values.dtype)))
    return vectors[:, :min(k + 1, len(values))].float()


def project_inputs_off(change: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """An (out, in) change minus its action on the span of ``basis`` (in, k), orthonormal:
    afterwards ``change @ x == 0`` for every ``x`` in that span."""
    return change - (change @ basis) @ basis.T


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The (rows, in) inputs a layer's weight matrix multiplies, bias column included; None for
    layers this cannot read as one matrix product (grouped or non-zero-padded convolutions)."""
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, module.in_features)
    elif isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" \
            and not isinstance(module.padding, str):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        return None
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(len(rows), 1)], 1)
    return rows


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's (out, in) matrix: weight flattened (F.unfold's order), bias as the last column."""
    w = module.weight.reshape(module.weight.shape[0], -1)
    return torch.cat([w, module.bias[:, None]], 1) if module.bias is not None else w


def input_size(module: nn.Module) -> int:
    """Columns of ``weight_matrix(module)``: inputs per output, bias included."""
    return module.weight[0].numel() + (module.bias is not None)


def estimated_bytes(unet) -> int:
    """Peak memory of ``input_bases``: every layer's float64 second moment plus its float32 basis."""
    return sum(input_size(m) ** 2 * 12 for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def add_moment(moments: dict, name: str, rows: torch.Tensor) -> None:
    """moments[name] += sum_i x_i x_i^T over the (rows, in) ``rows``."""
    r = rows.double()
    moments[name] = moments[name] + r.T @ r if name in moments else r.T @ r


@torch.no_grad()
def input_bases(unet, scheduler, latents: torch.Tensor, conds: list[dict], batches: int, min_t: int,
                energy: float, concat, progress: bool = False) -> dict[str, torch.Tensor]:
    """{layer name: (in, k) basis of the class prompt's inputs to it} for the UNet's linear and
    convolutional layers. ``conds``: encoded [class prompt, empty prompt] for one image each."""
    from tqdm.auto import tqdm

    moments, hooks = {}, []

    def hook(name):
        def accumulate(module, args, out):
            rows = layer_inputs(module, args[0])
            if rows is not None:
                add_moment(moments, name, rows)
        return accumulate

    for name, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            hooks.append(module.register_forward_hook(hook(name)))
    gen = torch.Generator().manual_seed(PROBE_SEED)
    device = next(unet.parameters()).device
    num_t = scheduler.config.num_train_timesteps
    try:
        for k in tqdm(range(batches), desc="class-prompt layer inputs", unit="batch", disable=not progress):
            idx = torch.randint(0, len(latents), (PROBE_BATCH,), generator=gen)
            x0 = latents[idx].to(device).contiguous()
            eps = torch.randn(x0.shape, generator=gen).to(device)
            ts = torch.randint(min_t, num_t, (PROBE_BATCH,), generator=gen).to(device)
            batch = cond = conds[k % 2]
            for _ in range(PROBE_BATCH - 1):
                batch = concat(batch, cond)
            unet(scheduler.add_noise(x0, eps, ts), ts, **batch)
    finally:
        for h in hooks:
            h.remove()
    return {name: keep_basis(m, energy).to(device) for name, m in moments.items()}


def held_layers(unet, bases: dict[str, torch.Tensor]):
    """(layers with a basis, every other parameter): the first are projected, the rest held whole."""
    layers = [(m, bases[n]) for n, m in unet.named_modules() if n in bases]
    covered = {id(p) for m, _ in layers for p in (m.weight, m.bias) if p is not None}
    return layers, [p for p in unet.parameters() if id(p) not in covered]


@torch.no_grad()
def hold(layers, fixed, base_layers: list[torch.Tensor], base_fixed: list[torch.Tensor]) -> None:
    """In place: each layer's change projected off its class-prompt inputs; other parameters reset."""
    for (module, basis), w0 in zip(layers, base_layers):
        w = w0 + project_inputs_off(weight_matrix(module) - w0, basis)
        n = module.weight[0].numel()
        module.weight.copy_(w[:, :n].reshape(module.weight.shape))
        if module.bias is not None:
            module.bias.copy_(w[:, n])
    for p, p0 in zip(fixed, base_fixed):
        p.copy_(p0)


BATCHES = 32  # forward passes of PROBE_BATCH noisy class images read before training


def class_prompt_projection(model, family, latents: torch.Tensor, class_prompt: str, energy: float,
                            min_t: int, device, progress: bool = False):
    """A call to make after every optimizer step: it projects each UNet layer's change off the
    inputs the class prompt gives it (fraction ``energy`` of them) and resets every other tensor.
    The bases are read here, from the base UNet before any weight changes; they are seeded, so
    every process and a resumed run get the same."""
    import functools

    unet = family.denoiser(model)
    with torch.no_grad():
        conds = [family.encode_prompts(model, [p], device) for p in (class_prompt, "")]
    print(f"prior.null_space: reading the class prompt's layer inputs ({BATCHES} batches)")
    bases = input_bases(unet, model.scheduler, latents, conds, BATCHES, min_t, energy, family.concat_cond,
                        progress=progress)
    layers, fixed = held_layers(unet, bases)
    kept = sum(b.shape[1] for _, b in layers) / max(1, sum(b.shape[0] for _, b in layers))
    print(f"prior.null_space: {len(layers)} layers, {kept:.0%} of their input dimensions held; "
          f"{len(fixed)} other tensors held whole")
    with torch.no_grad():
        base_layers = [weight_matrix(m).detach().clone() for m, _ in layers]
    return functools.partial(hold, layers, fixed, base_layers, [p.detach().clone() for p in fixed])
