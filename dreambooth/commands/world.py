"""`dreambooth world pretrain`: build the offline base model from the procedural world."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def world(action: str, out: str = "world-pretrain", vae_steps: int = 0, decoder_steps: int = 0,
          unet_steps: int = 0, marks_steps: int = 0, workers: int = 0, ship: bool = False) -> int:
    """Build the self-trained "world" base model that `--model world` and the demo use.

    `pretrain` trains a VAE, then its decoder alone, then a text encoder and UNet from scratch on
    rendered scenes, then both again on scenes where marks are common and named (resumable: run
    the same command again after a kill). `--ship` copies the result into the package
    (dreambooth/world/model, fp16) with a record of how it was made.

    Args:
        action: pretrain
        out: working folder for checkpoints, metrics and the finished model
        vae_steps: VAE training steps (0: the default)
        decoder_steps: decoder-only training steps after them (0: the default)
        unet_steps: UNet + text encoder training steps (0: the default)
        marks_steps: UNet + text encoder steps of the marks stage after them (0: the default)
        workers: one-thread CPU processes that share every batch (0: one per usable core)
        ship: copy the finished model into the package
    """
    from dreambooth.errors import DreamboothError
    from dreambooth.models import WORLD_MODEL
    from dreambooth.world.pretrain import PretrainConfig, pretrain

    if action != "pretrain":
        raise DreamboothError(f"unknown world action '{action}'; the action is: pretrain")
    cfg = PretrainConfig()
    cfg.vae_steps = vae_steps or cfg.vae_steps
    cfg.decoder_steps = decoder_steps or cfg.decoder_steps
    cfg.unet_steps = unet_steps or cfg.unet_steps
    cfg.marks_steps = marks_steps or cfg.marks_steps
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = workers or min(cores, cfg.max_workers())
    print(f"pretraining with {workers} worker process{'es' if workers > 1 else ''} of one thread")
    final = pretrain(out, cfg, workers=workers)
    print(f"world model: {final}")
    if ship:
        import json

        made = json.loads((Path(out) / "made.json").read_text())
        made["command"] = (f"dreambooth world pretrain --out {out} --vae-steps {cfg.vae_steps} "
                           f"--decoder-steps {cfg.decoder_steps} --unet-steps {cfg.unet_steps} "
                           f"--marks-steps {cfg.marks_steps} --workers {workers} --ship")
        shutil.rmtree(WORLD_MODEL, ignore_errors=True)
        shutil.copytree(final, WORLD_MODEL)
        (WORLD_MODEL / "made.json").write_text(json.dumps(made, indent=1))
        print(f"shipped into {WORLD_MODEL}")
    return 0
