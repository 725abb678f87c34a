"""World-model pretraining speed with one worker process and with two (docs/world.md).

    OMP_NUM_THREADS=1 python benchmarks/pretrain_workers.py --workers 1,2

Runs every stage of `dreambooth world pretrain` at full model size for a few steps (small pools)
once per worker count, and prints each stage's seconds per step (timed from its 50th step on,
after the pool is built) and the speed-up against one worker, all measured in this run. Run it
on an otherwise idle machine: the workers share its cores with everything else.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

STEPS = {"vae": 100, "decoder": 100, "unet": 100, "marks": 100}


def seconds_per_step(metrics: Path) -> dict[str, float]:
    from dreambooth.runlog import read_metrics

    rows = read_metrics(metrics)
    out = {}
    for stage, steps in STEPS.items():
        mine = {r["step"]: r["seconds"] for r in rows if r["stage"] == stage}
        out[stage] = (mine[steps] - mine[50]) / (steps - 50)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2", help="worker counts to time, comma-separated")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from dreambooth.world.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(vae_steps=STEPS["vae"], decoder_steps=STEPS["decoder"],
                         unet_steps=STEPS["unet"], marks_steps=STEPS["marks"], pool=1000,
                         marks_pool=1000, calibration=64, warmup=10, checkpoint_every=10**6)
    timings = {}
    for workers in [int(w) for w in args.workers.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            pretrain(Path(tmp) / "w", cfg, workers=workers)
            timings[workers] = seconds_per_step(Path(tmp) / "w/metrics.jsonl")
    first = next(iter(timings.values()))
    print(f"\n{'stage':8} " + " ".join(f"{w:>2} worker(s) s/step  speed-up" for w in timings))
    for stage in STEPS:
        print(f"{stage:8} " + " ".join(f"{t[stage]:19.3f} {first[stage] / t[stage]:8.2f}x"
                                       for t in timings.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
