"""Keep the UNet's change off the weight directions the class prompt reads (``prior.orthogonal_probes``).

Prior preservation asks the class prompt to keep its samples, but the photos' gradient moves weights
that the class prompt reads as well: the drift lies in the direction of the change, not in its size
(docs/world.md). This holds the class prompt to first order along many such directions:

1. Before training, K probes ``g_k = d<r_k, eps_base(x_t, t, c_k)>/d(theta)``: the frozen base UNet's
   output on a batch of noisy class images (t >= ``prior.orthogonal_min_t``, where the class prompt's
   colors and backgrounds are decided), dotted with Gaussian noise ``r_k``; ``c_k`` alternates between
   the class prompt and the empty prompt (the two branches classifier-free guidance samples with).
   Random probes of a Jacobian span its most sensitive directions (a randomized range finder).
2. Each weight tensor's part of the K probes is orthonormalized on its own: a block-diagonal basis,
   min(K, size) directions per tensor. One basis for the whole UNet holds far too few directions:
   the class prompt reads a change through many more than K of them.
3. After every optimizer step, each tensor's change from its base value is projected off its basis.

The probes are seeded and their inputs made contiguous (freshly encoded latents come out channels-last,
latents read from the cache do not, and the convolutions then differ in the last bits, which QR
turns into different bases), so a resumed run and every process probe the same bases.

Memory: K x (UNet weights) x 4 bytes, e.g. 4 GB at K = 256 for the world model's 3.9 M-weight UNet,
so this is for small UNets; a Stable Diffusion UNet (860 M weights) would need 880 GB at that K.
Pure math (``orthonormal_basis``, ``project_off``) is apart from the probing (``probe_bases``).
"""

from __future__ import annotations

import torch

PROBE_SEED = 1234  # the probes' own generator: the same bases on every run and resume
PROBE_BATCH = 8  # noisy class images per probe


def orthonormal_basis(columns: torch.Tensor) -> torch.Tensor:
    """(n, K) probe columns -> (n, min(n, K)) orthonormal columns spanning them (reduced QR)."""
    return torch.linalg.qr(columns)[0]


def project_off(change: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``change`` (flat, n) minus its component in the span of ``basis`` (n, k), orthonormal."""
    return change - basis @ (basis.T @ change)


def estimated_bytes(num_weights: int, probes: int) -> int:
    return num_weights * probes * 4


def free_bytes() -> int:
    """Memory free for the bases: the GPU's when training runs on one, else the machine's."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def probe_bases(unet, scheduler, latents: torch.Tensor, conds: list[dict], probes: int, min_t: int,
                concat, progress: bool = False) -> list[torch.Tensor]:
    """One orthonormal basis per UNet weight tensor (in ``unet.parameters()`` order).

    ``latents``: the class images' latents; ``conds``: encoded [class prompt, empty prompt], each
    for one image; ``concat(a, b)`` joins two encodings along the batch; ``progress``: a bar."""
    from tqdm.auto import tqdm

    params = list(unet.parameters())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(PROBE_SEED)
    device = params[0].device
    num_t = scheduler.config.num_train_timesteps
    # probe k's gradient is row k of each tensor's (K, size) matrix, whose transpose is the
    # column-major (size, K) matrix QR reads: no copy, and the peak is one copy of the probes
    # plus one tensor's QR
    rows = [torch.empty(probes, p.numel(), device=device) for p in params]
    try:
        for k in tqdm(range(probes), desc="class-prompt probes", unit="probe", disable=not progress):
            idx = torch.randint(0, len(latents), (PROBE_BATCH,), generator=gen)
            x0 = latents[idx].to(device).contiguous()
            eps = torch.randn(x0.shape, generator=gen).to(device)
            ts = torch.randint(min_t, num_t, (PROBE_BATCH,), generator=gen).to(device)
            noisy = scheduler.add_noise(x0, eps, ts)
            cond = conds[k % 2]
            batch = cond
            for _ in range(PROBE_BATCH - 1):
                batch = concat(batch, cond)
            out = unet(noisy, ts, **batch).sample
            r = torch.randn(out.shape, generator=gen).to(device)
            grads = torch.autograd.grad((out * r).sum(), params)
            for row, g in zip(rows, grads):
                row[k] = g.reshape(-1)
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
    bases = []
    for i in tqdm(range(len(params)), desc="orthonormalizing", unit="tensor", disable=not progress):
        bases.append(orthonormal_basis(rows[i].T))
        rows[i] = None
    return bases


@torch.no_grad()
def hold(params: list[torch.Tensor], base: list[torch.Tensor], bases: list[torch.Tensor]) -> None:
    """In place: each tensor's change from ``base`` projected off its basis."""
    for p, p0, q in zip(params, base, bases):
        d = project_off((p - p0).reshape(-1), q)
        p.copy_((p0.reshape(-1) + d).reshape(p.shape))
