"""Train the world's probe (``dreambooth.world.probe.ProbeNet``) on fresh renders and write the
files the package ships (``probe.safetensors``, fp16, and ``probe.json``). Moved out of the
package: the probe ships as a fixed asset, like the CLIP vocabulary.

Renders are augmented with blur, down/up-sampling, noise, quantization and slight
brightness/contrast changes so the probe also reads the slightly soft images a 64 px diffusion
model makes. Retrain and rewrite the shipped files (16 minutes on one thread)::

    python -m research.world.train_probe --train --steps 3000 --seed 0 --batch 64 --lr 0.003 --out dreambooth/world/
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from dreambooth.data import arrays_to_tensor
from dreambooth.world.probe import (HEADS, HERE, HIDDEN, META, POSE, RESOLUTION, WEIGHTS, WIDTHS,
                                    ProbeNet, load_probe)
from dreambooth.world.render import render_array, sample_scenes

EVAL_SEED = -1  # the scenes accuracy is measured on; training seeds are >= 0
TRAINING = dict(steps=3000, seed=0, batch=64, lr=3e-3)  # how the shipped probe was trained


# ---------------------------------------------------------------- data

def render_batch(scenes) -> torch.Tensor:
    """(B, 3, 64, 64) float in [-1, 1]."""
    return arrays_to_tensor(np.stack([render_array(s, RESOLUTION) for s in scenes]))


def targets(scenes) -> dict[str, torch.Tensor]:
    out = {k: torch.tensor([names.index(getattr(s, k)) for s in scenes]) for k, names in HEADS.items()}
    out["pose"] = torch.tensor([[s.x, s.y, s.size] for s in scenes], dtype=torch.float32)
    return out


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Make clean renders look like generated ones: blur, down/up-sampling, noise, quantization,
    brightness/contrast. x: (B, 3, H, W) in [-1, 1]; about a third of images stay clean."""
    b, _, h, w = x.shape
    r = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    keep = (r(b) < 0.35).view(b, 1, 1, 1)
    y = x
    # Gaussian blur, sigma in [0, 1] px per image, as a grouped separable conv.
    sigma = (r(b) * 1.0).clamp_min(1e-3)
    t = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (3B, 5)
    z = y.reshape(1, b * 3, h, w)
    z = F.conv2d(F.pad(z, (2, 2, 0, 0), mode="replicate"), k[:, None, None, :], groups=b * 3)
    z = F.conv2d(F.pad(z, (0, 0, 2, 2), mode="replicate"), k[:, None, :, None], groups=b * 3)
    y = z.reshape(b, 3, h, w)
    # Half the resolution and back for some images (a VAE's softness).
    soft = (r(b) < 0.3).view(b, 1, 1, 1)
    down = F.interpolate(F.interpolate(y, scale_factor=0.5, mode="bilinear", antialias=True),
                         size=(h, w), mode="bilinear")
    y = torch.where(soft, down, y)
    # Brightness / contrast.
    y = y * (1 + (r(b, 1, 1, 1) - 0.5) * 0.12) + (r(b, 1, 1, 1) - 0.5) * 0.1
    # Noise and quantization.
    y = y + torch.randn(y.shape, generator=g) * r(b, 1, 1, 1) * 0.06
    levels = torch.where(r(b, 1, 1, 1) < 0.3, 24.0, 255.0)
    y = torch.round((y + 1) / 2 * levels) / levels * 2 - 1
    return torch.where(keep, x, y.clamp(-1, 1))


# ---------------------------------------------------------------- training

def evaluate(model: ProbeNet, n: int = 1000, seed: int = EVAL_SEED, aug: bool = False) -> dict[str, float]:
    """Accuracy per factor on n fresh renders (and mean absolute pose error, in pixels)."""
    scenes = sample_scenes(n, seed)
    model.eval()
    hits, pose_err = Counter(), 0.0
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in range(0, n, 250):
            chunk = scenes[i:i + 250]
            x = render_batch(chunk)
            out = model(augment(x, g) if aug else x)
            tgt = targets(chunk)
            for k in HEADS:
                hits[k] += (out[k].argmax(1) == tgt[k]).sum().item()
            pose_err += (out["pose"] - tgt["pose"]).abs().sum(0).mul(RESOLUTION).sum().item() / 3
    acc = {k: hits[k] / n for k in HEADS}
    acc["pose_mae_px"] = pose_err / n
    return acc


def train_probe(steps: int = TRAINING["steps"], seed: int = TRAINING["seed"],
                batch: int = TRAINING["batch"], lr: float = TRAINING["lr"],
                widths=WIDTHS, hidden: int = HIDDEN, log_every: int = 100):
    """Train a probe on fresh renders (every step draws new scenes); -> (model, accuracy dict)."""
    torch.manual_seed(seed)
    model = ProbeNet(widths, hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        model.train()
        scenes = sample_scenes(batch, seed=seed * 10**5 + step)
        x, tgt = augment(render_batch(scenes), g), targets(scenes)
        out = model(x)
        parts = {k: F.cross_entropy(out[k], tgt[k]) for k in HEADS}
        parts["pose"] = 20 * F.mse_loss(out["pose"], tgt["pose"])
        loss = sum(parts.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            heads = " ".join(f"{k} {v.item():.3f}" for k, v in parts.items())
            print(f"step {step:5d}  loss {loss.item():.4f}  ({heads})  {time.time() - t0:6.1f}s", flush=True)
    model.eval()
    return model, evaluate(model)


def save_probe(model: ProbeNet, folder: str | Path, meta: dict) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    save_file(state, str(folder / WEIGHTS))
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")



# ---------------------------------------------------------------- command line

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m research.world.train_probe", description=__doc__.split("\n")[0])
    ap.add_argument("--train", action="store_true", help="train a probe and write it to --out")
    ap.add_argument("--eval", action="store_true", help="measure the probe in --out on fresh renders")
    for name, value in TRAINING.items():
        ap.add_argument(f"--{name}", type=type(value), default=value)
    ap.add_argument("--out", default=str(HERE))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.train:
        t0 = time.time()
        model, acc = train_probe(args.steps, args.seed, args.batch, args.lr)
        minutes = (time.time() - t0) / 60
        acc_aug = evaluate(model, aug=True)
        meta = {"widths": list(WIDTHS), "hidden": HIDDEN, "resolution": RESOLUTION,
                "heads": {k: list(v) for k, v in HEADS.items()}, "pose": list(POSE),
                "command": f"python -m research.world.train_probe --train --steps {args.steps} --seed {args.seed} "
                           f"--batch {args.batch} --lr {args.lr} --out {args.out}",
                "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
                "train_minutes_1_thread": round(minutes, 2),
                "accuracy_fresh_1000": {k: round(v, 4) for k, v in acc.items()},
                "accuracy_fresh_1000_augmented": {k: round(v, 4) for k, v in acc_aug.items()},
                "eval_seed": EVAL_SEED}
        save_probe(model, args.out, meta)
        print(json.dumps(meta["accuracy_fresh_1000"]), f"augmented: {json.dumps(meta['accuracy_fresh_1000_augmented'])}")
        print(f"trained in {minutes:.1f} min; wrote {Path(args.out) / WEIGHTS} and {META}")
    if args.eval or not args.train:
        probe = load_probe(args.out)
        print("clean:", evaluate(probe.model), "augmented:", evaluate(probe.model, aug=True))


if __name__ == "__main__":
    main()
