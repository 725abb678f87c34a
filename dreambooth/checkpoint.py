"""Checkpoints in ``RUN_DIR/checkpoints/step-NNNNNN/`` that survive a kill at any moment.

A checkpoint holds everything needed to continue bit-exactly, and nothing that runs code when read:
  trainable.safetensors   the trainable weights (whole UNet/text encoder, or only LoRA weights)
  state.safetensors       the tensors of the optimizer state and of the RNG states
  state.json              step, data position, last loss; the optimizer, LR scheduler and RNG
                          state around those tensors (``encode_tree``); a sha256 of every other file
  config.yaml             the resolved config, so the checkpoint stands on its own

No pickle is ever read: a shared run folder or a downloaded checkpoint cannot run code on resume.
It is written into a hidden temporary folder and renamed into place only when complete; a kill
mid-write leaves a ``.tmp-*`` folder that is ignored (and cleaned up by the next save), and the
previous checkpoint untouched. A checkpoint whose files no longer match their checksums (a disk
error, a copy cut short) is skipped with a warning, and resume falls back to the one before.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dreambooth.errors import DreamboothError
from dreambooth.files import atomic_dir, checksums, remove, remove_leftovers, verify_checksums

PREFIX = "step-"
WEIGHTS, TENSORS, STATE = "trainable.safetensors", "state.safetensors", "state.json"
PICKLES = ("optimizer.pt", "lr_scheduler.pt", "rng.pt")  # what checkpoints held before 2026-12
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # a LoRA run's final/ weights


class CheckpointError(DreamboothError):
    """A checkpoint that cannot be used: its files are damaged, or in a format that is not read."""


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


# ------------------------------------------------------------------ state as JSON + tensors (pure)


def encode_tree(obj: Any, tensors: dict[str, torch.Tensor], path: str = "t") -> Any:
    """``obj`` (nested dicts, lists, tuples of tensors, numpy arrays and plain values) as JSON,
    with each tensor moved into ``tensors`` under its path. Anything else is a TypeError: what is
    saved must be readable without pickle."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, np.generic):
        return encode_tree(obj.item(), tensors, path)
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        items = [[encode_tree(k, tensors, f"{path}.k{i}"), encode_tree(v, tensors, f"{path}.{i}")]
                 for i, (k, v) in enumerate(obj.items())]
        return {"__dict__": items}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (at {path})")


def decode_tree(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``encode_tree``; a ValueError for anything it did not write."""
    if isinstance(data, list):
        return [decode_tree(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if set(data) == {"__tensor__"}:
        return tensors[data["__tensor__"]]
    if set(data) == {"__ndarray__", "dtype"}:
        return np.array(data["__ndarray__"], dtype=np.dtype(data["dtype"]))
    if set(data) == {"__float__"} and data["__float__"] in ("nan", "inf", "-inf"):
        return float(data["__float__"])
    if set(data) == {"__tuple__"}:
        return tuple(decode_tree(v, tensors) for v in data["__tuple__"])
    if set(data) == {"__dict__"}:
        return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in data["__dict__"]}
    raise ValueError(f"unexpected entry {sorted(data)[:3]}")


# ------------------------------------------------------------------ RNG


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ write


def save_checkpoint(run_dir: Path, step: int, *, weights: dict[str, torch.Tensor],
                    optimizer_state: dict, lr_scheduler_state: dict, state: dict[str, Any],
                    config_yaml: str, keep: int = 2, protect: frozenset[int] = frozenset()) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically, then keep only the newest ``keep`` (and the
    steps in ``protect``, e.g. the best evaluated one)."""
    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
        tensors: dict[str, torch.Tensor] = {}
        tree = encode_tree({"optimizer": optimizer_state, "lr_scheduler": lr_scheduler_state,
                            "rng": rng_state()}, tensors)
        save_file(tensors, str(tmp / TENSORS))
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / STATE).write_text(json.dumps({"step": step, **state, "tree": tree,
                                             "files": checksums(tmp)}, indent=1))

    root = run_dir / "checkpoints"
    path = atomic_dir(root / step_dir_name(step), write)
    remove_leftovers(root)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            if checkpoint_step(old) not in protect:
                remove(old)
    return path


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name[len(PREFIX):])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob(f"{PREFIX}*") if (p / STATE).is_file() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def verify_checkpoint(path: Path) -> list[str]:
    """What is wrong with the checkpoint at ``path``: one line per damaged or missing file, or a
    format that is not read; [] when it can be used."""
    path = Path(path)
    if any((path / name).exists() for name in PICKLES) and not (path / TENSORS).exists():
        return [f"{path}: written by an older dreambooth as pickle files ({', '.join(PICKLES)}), "
                "which are not read because unpickling can run code"]
    try:
        info = json.loads((path / STATE).read_text())
        files = info["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{path / STATE}: unreadable ({e})"]
    return verify_checksums(path, files) or [f"{path}: {name} is not listed in {STATE}"
                                             for name in (WEIGHTS, TENSORS) if name not in files]


def _verified(path: Path) -> Path:
    problems = verify_checkpoint(path)
    if problems:
        raise CheckpointError("this checkpoint cannot be used:\n" + "\n".join(problems))
    return Path(path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Only a checkpoint's trainable weights (no optimizer state): to inspect or export a step."""
    return load_file(str(_verified(path) / WEIGHTS))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Everything a checkpoint holds, as tensors and dicts (RNG states are not applied here)."""
    return _read_checkpoint(_verified(path))


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """``load_checkpoint`` of a checkpoint whose files were just verified (they are hashed once)."""
    weights = load_file(str(path / WEIGHTS))
    info = json.loads((path / STATE).read_text())
    try:
        tree = decode_tree(info.pop("tree"), load_file(str(path / TENSORS)))
    except (KeyError, ValueError, TypeError, SafetensorError) as e:
        raise CheckpointError(f"{path / STATE}: the saved training state cannot be read ({e})") from None
    info.pop("files", None)
    return {"weights": weights, **tree, "state": info}


def resume_checkpoint(run_dir: Path, warn: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The newest checkpoint of ``run_dir`` that verifies, loaded (with its ``path``); None when
    the run has none. A damaged newer one is skipped with a warning naming its broken file; when
    every checkpoint is damaged, a CheckpointError lists them."""
    found = list_checkpoints(run_dir)
    broken = []
    for path in reversed(found):
        problems = verify_checkpoint(path)
        if not problems:
            if broken:
                warn(f"warning: skipping damaged checkpoint(s), resuming from {path.name}:\n  "
                     + "\n  ".join(broken))
            return {"path": path, **_read_checkpoint(path)}
        broken += problems
    if broken:
        raise CheckpointError(f"no checkpoint of {run_dir} can be used:\n  " + "\n  ".join(broken)
                              + f"\nMove {Path(run_dir) / 'checkpoints'} aside to train the run "
                              "again from step 0 with its config.yaml")
    return None


FINAL_SUMS = "checksums.json"  # in final/: the sha256 of each of its files, written last


def verify_final(final: Path) -> list[str]:
    """What is wrong with a run's ``final/`` folder: one line per damaged or missing file."""
    sums = final / FINAL_SUMS
    if not sums.is_file():  # written before checksums were kept: the loaders' own checks apply
        return []
    try:
        return verify_checksums(final, json.loads(sums.read_text()))
    except (OSError, ValueError, AttributeError) as e:
        return [f"{sums}: unreadable ({e})"]


def load_run_model(run_dir: Path, trust_pickle: bool = False):
    """The fine-tuned model of a finished run: ``final/`` as a full diffusers folder, or the
    base model from the run's config with ``final/``'s LoRA weights loaded into it."""
    from dreambooth.config import load_config
    from dreambooth.errors import ModelError
    from dreambooth.models import configure, load_base_model, load_configured, read_part

    run_dir = Path(run_dir)
    final = run_dir / "final"
    if not (final / "config.yaml").is_file():
        raise DreamboothError(f"{run_dir} has no finished model (final/ is missing): "
                              f"finish it with `dreambooth train --resume {run_dir}`")
    problems = verify_final(final)
    if problems:
        raise CheckpointError(f"{final} is damaged:\n  " + "\n  ".join(problems)
                              + f"\nRebuild it with `dreambooth train --resume {run_dir}` (it "
                              "replays from the last checkpoint)")
    cfg = load_config(final / "config.yaml")
    if cfg.train.mode == "full":
        return configure(load_base_model(str(final), trust_pickle=trust_pickle), cfg), cfg
    model = load_configured(cfg, trust_pickle=trust_pickle)
    weights = final / LORA_WEIGHTS
    if not weights.is_file():
        found = ", ".join(sorted(p.name for p in final.iterdir())) or "nothing"
        raise ModelError(f"{final} holds no {LORA_WEIGHTS} (found: {found}): LoRA weights are "
                         f"only read from .safetensors. Rebuild them with `dreambooth train --resume {run_dir}`")
    read_part(final, LORA_WEIGHTS, lambda: model.pipeline().load_lora_weights(
        str(final), weight_name=LORA_WEIGHTS))
    return model, cfg


def parse_checkpoint_name(which: str) -> int | None:
    """"step-N" or "N" -> N; None for anything else."""
    digits = which[len(PREFIX):] if which.startswith(PREFIX) else which
    return int(digits) if digits.isascii() and digits.isdigit() else None


def load_checkpoint_model(run_dir: Path, which: str = "final", trust_pickle: bool = False):
    """(model, config, name) for ``which``: "final", "best" (the step best.json names), or
    "step-N" / "N" (a checkpoint's trainable weights put into the run's base model)."""
    from dreambooth.config import load_config
    from dreambooth.models import load_configured
    from dreambooth.trainable import make_trainable

    run_dir = Path(run_dir)
    if which == "best":
        best = run_dir / "best.json"
        if not best.is_file():
            raise DreamboothError(f"{run_dir} has no best.json: it was trained without evaluation "
                                  f"(eval.every=0); use --checkpoint final or step-N")
        try:
            info = json.loads(best.read_text())
            which = "final" if info.get("final_is_best") else step_dir_name(int(info["step"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{best} cannot be read ({e}); use --checkpoint final or step-N") from None
    if which == "final":
        model, cfg = load_run_model(run_dir, trust_pickle)
        return model, cfg, "final"
    step = parse_checkpoint_name(which)
    found = {checkpoint_step(p): p for p in list_checkpoints(run_dir)}
    if step not in found:
        names = ", ".join(p.name for p in found.values()) or "none"
        raise DreamboothError(f"no checkpoint '{which}' in {run_dir}; it has: final, best, {names}")
    weights = load_weights(found[step])
    cfg = load_config(found[step] / "config.yaml")
    model = load_configured(cfg, trust_pickle=trust_pickle)
    make_trainable(model, cfg).load(weights)
    return model, cfg, step_dir_name(step)
