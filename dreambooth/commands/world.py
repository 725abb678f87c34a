"""`dreambooth world pretrain`: build the offline base models from the procedural world."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def world(action: str, out: str = "world-pretrain", family: str = "sd1", vae_steps: int = 0,
          decoder_steps: int = 0, unet_steps: int = 0, marks_steps: int = 0, steps: int = 0,
          polish_steps: int = -1, workers: int = 0, ship: bool = False) -> int:
    """Build a self-trained world base model: `world` (UNet, the demo's) or `world-flux`.

    `pretrain` with --family sd1 trains a VAE, then its decoder alone, then a text encoder and
    UNet from scratch on rendered scenes, then both again on scenes where marks are common and
    named. With --family flux1 it trains a FLUX.1-architecture transformer and a small T5 on the
    shipped world model's frozen VAE and CLIP encoder (build `world` first). Resumable: run the
    same command again after a kill. `--ship` copies the result into the package
    (dreambooth/world/model or flux-model, fp16) with a record of how it was made.

    Args:
        action: pretrain
        out: working folder for checkpoints, metrics and the finished model
        family: sd1 (the UNet world model) or flux1 (the flow-matching one)
        vae_steps: sd1: VAE training steps (0: the default)
        decoder_steps: sd1: decoder-only training steps after them (0: the default)
        unet_steps: sd1: UNet + text encoder training steps (0: the default)
        marks_steps: sd1: UNet + text encoder steps of the marks stage after them (0: the default)
        steps: flux1: transformer + T5 training steps (0: the default)
        polish_steps: flux1: steps of a second stage at a lower learning rate (-1: the default)
        workers: one-thread CPU processes that share every batch (0: one per usable core)
        ship: copy the finished model into the package
    """
    from dreambooth.errors import DreamboothError
    from dreambooth.models import WORLD_MODELS

    if action != "pretrain":
        raise DreamboothError(f"unknown world action '{action}'; the action is: pretrain")
    if family not in ("sd1", "flux1"):
        raise DreamboothError(f"--family {family}: choose sd1 or flux1")
    cfg, run, flags = _config(family, vae_steps, decoder_steps, unet_steps, marks_steps, steps, polish_steps)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = workers or min(cores, cfg.max_workers())
    print(f"pretraining with {workers} worker process{'es' if workers > 1 else ''} of one thread")
    final = run(out, cfg, workers=workers)
    print(f"{final.parent.name} model: {final}")
    if ship:
        target = WORLD_MODELS["world" if family == "sd1" else "world-flux"]
        made = json.loads((Path(out) / "made.json").read_text())
        made["command"] = f"dreambooth world pretrain --out {out} --family {family} {flags} --workers {workers} --ship"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(final, target)
        (target / "made.json").write_text(json.dumps(made, indent=1))
        print(f"shipped into {target}")
    return 0


def _config(family: str, vae_steps: int, decoder_steps: int, unet_steps: int, marks_steps: int, steps: int,
            polish_steps: int = -1):
    """(config, pretrain function, the flags that reproduce it) for ``family``."""
    if family == "flux1":
        from dreambooth.world.flux import FluxPretrainConfig, pretrain

        cfg = FluxPretrainConfig()
        cfg.steps = steps or cfg.steps
        cfg.polish_steps = cfg.polish_steps if polish_steps < 0 else polish_steps
        return cfg, pretrain, f"--steps {cfg.steps} --polish-steps {cfg.polish_steps}"
    from dreambooth.world.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig()
    cfg.vae_steps = vae_steps or cfg.vae_steps
    cfg.decoder_steps = decoder_steps or cfg.decoder_steps
    cfg.unet_steps = unet_steps or cfg.unet_steps
    cfg.marks_steps = marks_steps or cfg.marks_steps
    return cfg, pretrain, (f"--vae-steps {cfg.vae_steps} --decoder-steps {cfg.decoder_steps} "
                           f"--unet-steps {cfg.unet_steps} --marks-steps {cfg.marks_steps}")
