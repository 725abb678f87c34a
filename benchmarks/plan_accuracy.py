"""Predicted vs measured peak tensor memory of one training step, on the tiny models of every
family (the cases of tests/test_plan.py), on this CPU: the plan's fake step against the same
accounting on a real session's step (dreambooth/plan.py).

    OMP_NUM_THREADS=1 python benchmarks/plan_accuracy.py
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from dreambooth import plan
    from dreambooth.train import setup
    from tests.painting import paint_subject
    from tests.test_plan import CASES, config

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp())
    photos = work / "photos"
    paint_subject(photos, 3)
    print("| preset | settings | predicted (MiB) | measured (MiB) | predicted / measured |")
    print("| --- | --- | --- | --- | --- |")
    for i, (preset, items) in enumerate(CASES):
        cfg = config(preset, items, photos)
        predicted = plan.predict(cfg)
        with contextlib.ExitStack() as held:
            measured = plan.measure(setup(cfg, work / f"run-{i}", held, progress=False))
        print(f"| {preset} | {' '.join(items) or '(preset)'} | {predicted.peak / 2**20:.2f} | "
              f"{measured.peak / 2**20:.2f} | {predicted.peak / measured.peak:.3f} |", flush=True)


if __name__ == "__main__":
    main()
