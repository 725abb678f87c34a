"""One world-pretraining UNet step in float32 against bfloat16 autocast, on this CPU (docs/world.md).

    OMP_NUM_THREADS=1 python benchmarks/pretrain_precision.py

The unet and marks stages are most of `dreambooth world pretrain`'s time. This times their step
(the world architecture at full size, one worker's half batch of 24 latents with captions:
forward, backward, AdamW) in float32, as pretraining runs today, and under
``torch.autocast("cpu", dtype=torch.bfloat16)``, which CPUs with AVX-512 BF16 or AMX can run
faster, and bf16 with the UNet in channels-last memory format. It alternates them, times the
median of --steps steps each after a warm-up, and prints seconds per step and the ratios to
float32, all measured in this run, and how far bf16's loss is from float32's on the same batch.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per precision")
    ap.add_argument("--batch", type=int, default=24, help="latents per step (one of 2 workers' share of 48)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from dreambooth.world.pretrain import PretrainConfig, architecture

    cfg = PretrainConfig()
    model = architecture(cfg)
    unet, te = model.unet.train(), model.text_encoder.train()
    params = [p for m in (unet, te) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    n = args.batch
    x = torch.randn(n, 4, 16, 16, generator=g)
    noise = torch.randn(n, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    ids = torch.randint(0, 49406, (n, cfg.max_tokens), generator=g)
    noisy = model.scheduler.add_noise(x, noise, t)

    def autocast(precision: str):
        return (torch.autocast("cpu", dtype=torch.bfloat16) if precision.startswith("bf16")
                else contextlib.nullcontext())

    def step(precision: str) -> float:
        fmt = torch.channels_last if precision.endswith("channels-last") else torch.contiguous_format
        unet.to(memory_format=fmt)
        start = time.perf_counter()
        with autocast(precision):
            pred = unet(noisy.contiguous(memory_format=fmt), t, encoder_hidden_states=te(ids)[0]).sample
        loss = (pred.float() - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    def loss_of(precision: str) -> float:
        unet.to(memory_format=torch.contiguous_format)
        with torch.no_grad(), autocast(precision):
            pred = unet(noisy, t, encoder_hidden_states=te(ids)[0]).sample
        return (pred.float() - noise).pow(2).mean().item()

    times = {"fp32": [], "bf16": [], "bf16 channels-last": []}
    for _ in range(2):  # warm-up: oneDNN picks its kernels
        for p in times:
            step(p)
    for _ in range(args.steps):
        for p in times:
            times[p].append(step(p))
    median = {p: statistics.median(v) for p, v in times.items()}
    print(f"unet step, batch {n}, 1 thread, median of {args.steps}:")
    for p, v in median.items():
        print(f"  {p:20s} {v:.3f} s   fp32/this = {median['fp32'] / v:.2f}x")
    a, b = loss_of("fp32"), loss_of("bf16")
    print(f"loss on one batch: fp32 {a:.5f}, bf16 {b:.5f} (relative difference {abs(a - b) / a:.2%})")
    print("torch CPU capability:", torch.backends.cpu.get_cpu_capability())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
