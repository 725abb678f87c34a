"""`dreambooth train`: fine-tune a base model on a folder of photos."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path


def train(
    images: str | None = None,
    class_noun: str | None = None,
    token: str | None = None,
    model: str | None = None,
    preset: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    out: str | None = None,
    resume: str | None = None,
    trust_pickle: bool = False,
    progress: bool = True,
) -> int:
    """Teach the model your subject (DreamBooth with prior preservation) and write a run directory.

    Example: dreambooth train --images ./my-dog --class dog --preset sd15-lora --out runs/dog

    Args:
        images: folder of 3-20 photos of the subject (only read, never written)
        class_noun: the subject's class noun, e.g. dog, backpack, mug
        token: identifier for the subject (default: the top pick of `dreambooth tokens`)
        model: base model: a local diffusers folder, a single-file .safetensors checkpoint (SD 1.x/2.x/XL), or tiny
        preset: a preset name from dreambooth/configs (an unknown name prints the list)
        config: a YAML config file (applied after the preset)
        overrides: key=value (repeatable), e.g. --set lr=1e-4 --set train.steps=400
        out: run directory to create (config.yaml, metrics.jsonl, checkpoints/, final/)
        resume: continue the run in this directory from its newest complete checkpoint
        trust_pickle: allow pickle weights (.ckpt/.pt/.bin) in --model for this command only (unpickling runs code: only for files you trust; never read from a config file)
        progress: show a progress bar

    SIGTERM (`kill PID`, the web UI's Stop) ends the run after the current step with a checkpoint.
    """
    from dreambooth.config import build_config, load_config
    from dreambooth.errors import DreamboothError
    from dreambooth.plan import preflight
    from dreambooth.rundir import check_new_run, require_run

    if resume:
        run_dir = require_run(resume)
        if any(v is not None for v in (images, class_noun, token, model, preset, config, overrides, out)):
            raise DreamboothError("--resume takes the run's own config.yaml; give no other settings "
                                  "(edit RUN_DIR/config.yaml to change one)")
        cfg = None
        preflight(load_config(run_dir / "config.yaml"))  # on a GPU: refuse a run that cannot fit, before loading
    else:
        run_dir = check_new_run(out)
        cfg = build_config(preset, config, overrides, extra={
            "data.images": images, "data.class_noun": class_noun, "data.token": token,
            "model.path": model})
        preflight(cfg)
    return _run(cfg, run_dir, progress, trust_pickle)


def _run(cfg, run_dir: Path, progress: bool, trust_pickle: bool) -> int:
    from dreambooth.train import train as run_training

    with stop_on_sigterm() as stop:
        result = run_training(cfg, run_dir, resume=cfg is None, progress=progress, trust_pickle=trust_pickle,
                              stop=stop)
    if result.final is None and stop():
        print(f"stopped at step {result.step} (SIGTERM), checkpoint written; continue with "
              f"`dreambooth train --resume {run_dir}`")
        return 0
    where = result.final or run_dir
    print(f"done: step {result.step}, loss {result.loss:.4f}. Run directory: {run_dir}  Weights: {where}")
    return 0


@contextlib.contextmanager
def stop_on_sigterm():
    """Within the block, SIGTERM is only noted: yields a function that says whether it came."""
    seen = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield seen.is_set
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.set())
    try:
        yield seen.is_set
    finally:
        signal.signal(signal.SIGTERM, previous)
