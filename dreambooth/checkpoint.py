"""Checkpoints in ``RUN_DIR/checkpoints/step-NNNNNN/`` that survive a kill at any moment.

A checkpoint holds everything needed to continue bit-exactly:
  trainable.safetensors   the trainable weights (whole UNet/text encoder, or only LoRA weights)
  optimizer.pt            optimizer state (and the fp16 grad scaler's, when one is used)
  lr_scheduler.pt         learning-rate scheduler state
  rng.pt                  python, numpy, torch CPU and CUDA generator states
  state.json              step, data position, last loss
  config.yaml             the resolved config, so the checkpoint stands on its own

It is written into a hidden temporary folder and renamed into place only when complete; a
kill mid-write leaves a ``.tmp-*`` folder that is ignored (and cleaned up by the next save),
and the previous checkpoint untouched.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into a temporary sibling of ``final``, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.rglob("*"):  # make the bytes durable before the rename publishes them
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(run_dir: Path, step: int, *, weights: dict[str, torch.Tensor],
                    optimizer_state: dict, lr_scheduler_state: dict, state: dict[str, Any],
                    config_yaml: str, keep: int = 2, protect: frozenset[int] = frozenset()) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically, then keep only the newest ``keep`` (and the
    steps in ``protect``, e.g. the best evaluated one)."""
    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()},
                  str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(lr_scheduler_state, tmp / "lr_scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))

    root = run_dir / "checkpoints"
    path = atomic_dir(root / step_dir_name(step), write)
    for stale in root.glob(".tmp-*"):  # leftovers of a killed write
        shutil.rmtree(stale, ignore_errors=True)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            if checkpoint_step(old) not in protect:
                shutil.rmtree(old, ignore_errors=True)
    return path


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name[len(PREFIX):])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob(f"{PREFIX}*") if (p / "state.json").is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Only a checkpoint's trainable weights (no optimizer state): to inspect or export a step."""
    return load_file(str(Path(path) / "trainable.safetensors"))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Everything a checkpoint holds, as tensors and dicts (RNG states are not applied here)."""
    return {
        "weights": load_weights(path),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=False),
        "lr_scheduler": torch.load(path / "lr_scheduler.pt", weights_only=False),
        "rng": torch.load(path / "rng.pt", weights_only=False),
        "state": json.loads((path / "state.json").read_text()),
    }


def load_run_model(run_dir: Path):
    """The fine-tuned model of a finished run: ``final/`` as a full diffusers folder, or the
    base model from the run's config with ``final/``'s LoRA weights loaded into it."""
    from dreambooth.config import load_config
    from dreambooth.errors import DreamboothError
    from dreambooth.models import load_base_model, load_configured

    run_dir = Path(run_dir)
    final = run_dir / "final"
    if not (final / "config.yaml").is_file():
        raise DreamboothError(f"{run_dir} has no finished model (final/ is missing): "
                              f"finish it with `dreambooth train --resume {run_dir}`")
    cfg = load_config(final / "config.yaml")
    if cfg.train.mode == "full":
        return load_base_model(str(final)), cfg
    model = load_configured(cfg.model)
    model.pipeline().load_lora_weights(str(final))
    return model, cfg


def load_checkpoint_model(run_dir: Path, which: str = "final"):
    """(model, config, name) for ``which``: "final", "best" (the step best.json names), or
    "step-N" / "N" (a checkpoint's trainable weights put into the run's base model)."""
    from dreambooth.config import load_config
    from dreambooth.errors import DreamboothError
    from dreambooth.models import load_configured
    from dreambooth.train import copy_weights, setup_trainable, trainable_weights

    run_dir = Path(run_dir)
    if which == "best":
        best = run_dir / "best.json"
        if not best.is_file():
            raise DreamboothError(f"{run_dir} has no best.json: it was trained without evaluation "
                                  f"(eval.every=0); use --checkpoint final or step-N")
        info = json.loads(best.read_text())
        which = "final" if info.get("final_is_best") else step_dir_name(info["step"])
    if which == "final":
        model, cfg = load_run_model(run_dir)
        return model, cfg, "final"
    step = int(which[len(PREFIX):]) if which.startswith(PREFIX) else int(which) if which.isdigit() else None
    found = {checkpoint_step(p): p for p in list_checkpoints(run_dir)}
    if step not in found:
        names = ", ".join(p.name for p in found.values()) or "none"
        raise DreamboothError(f"no checkpoint '{which}' in {run_dir}; it has: final, best, {names}")
    cfg = load_config(found[step] / "config.yaml")
    model = load_configured(cfg.model)
    copy_weights(trainable_weights(setup_trainable(model, cfg)), load_weights(found[step]))
    return model, cfg, step_dir_name(step)
