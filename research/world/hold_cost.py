"""What holding the class prompt costs on the world model: reading time, memory, seconds per step.

    python -m research.world.hold_cost [--null-space 0.95] [--probes 256] [--threads 1,2] [--steps 20]

Each setting runs the project's real `train()` (the world preset, held-out subject 7's photos,
8 class images) in a fresh process: no hold, `prior.null_space` (the preset's hold) and
`prior.orthogonal_probes` (0 skips a row). It reports the median seconds per training step (from
metrics.jsonl, after 5 warm-up steps), the seconds spent reading the bases before training, and
the process's peak resident memory. All rows come from this one run, so the ratios compare
like with like; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

WARMUP = 5


def one(job: tuple) -> dict:
    threads, hold, steps, root = job
    os.environ["DREAMBOOTH_CACHE"] = str(Path(root) / "cache")
    import contextlib

    import torch

    torch.set_num_threads(threads)
    from dreambooth import nullspace, orthogonal
    from dreambooth.config import build_config
    from dreambooth.runlog import read_metrics
    from dreambooth.train import train
    from dreambooth.world.render import held_out_subjects

    subject = held_out_subjects()[7]
    photos = Path(root) / "photos"
    if not photos.exists():
        subject.save_photos(photos, 5, seed=0, captions=True, masks=True)
    probe_seconds = []

    def timed(real):
        def run(*a, **k):
            started = time.perf_counter()
            out = real(*a, **k)
            probe_seconds.append(time.perf_counter() - started)
            return out
        return run

    orthogonal.probe_bases = timed(orthogonal.probe_bases)
    nullspace.input_bases = timed(nullspace.input_bases)
    cfg = build_config("world", overrides=[
        f"data.images={photos}", f"data.class_noun={subject.shape}", "data.token=waj",
        "prior.num_images=8", "prior.steps=8", "prior.orthogonal_probes=0", "prior.null_space=0", hold,
        f"train.steps={WARMUP + steps}", f"train.checkpoint_every={WARMUP + steps + 1}", "train.log_every=1"])
    run = Path(root) / f"run-{threads}-{hold.replace('=', '-')}"
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        train(cfg, run, progress=False)
    cumulative = [r["seconds"] for r in read_metrics(run / "metrics.jsonl")]
    per_step = [b - a for a, b in zip([0.0] + cumulative, cumulative)][WARMUP:]
    return {"threads": threads, "hold": hold, "step_s": statistics.median(per_step),
            "probe_s": probe_seconds[0] if probe_seconds else 0.0,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--null-space", type=float, default=0.95)
    ap.add_argument("--probes", type=int, default=256)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for threads in [int(t) for t in args.threads.split(",")]:
            holds = ["prior.null_space=0", *([f"prior.null_space={args.null_space}"] if args.null_space else []),
                     *([f"prior.orthogonal_probes={args.probes}"] if args.probes else [])]
            for hold in holds:
                with ctx.Pool(1) as pool:  # a fresh process each: its own peak memory
                    rows.append(pool.apply(one, ((threads, hold, args.steps, root),)))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nworld model, 5 photos + 8 class images, median of {args.steps} steps after {WARMUP}")
    print("| threads | hold | s/step | step vs no hold | reading s | peak memory GB |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    off = {r["threads"]: r["step_s"] for r in rows if r["hold"] == "prior.null_space=0"}
    for r in rows:
        print(f"| {r['threads']} | {r['hold']} | {r['step_s']:.3f} | {r['step_s'] / off[r['threads']]:.2f}x "
              f"| {r['probe_s']:.0f} | {r['peak_gb']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
