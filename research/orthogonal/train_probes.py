"""Train with the orthogonal-probe hold: the library's recipe (setup, loop) with the hold as the
session's after-step projection. Not resumable: the bases are read from the model setup() returns,
which is the base model only on a fresh run.

    python -m research.orthogonal.train_probes --images DIR --class NOUN --out RUN --probes 256
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from pathlib import Path

from dreambooth.config import build_config
from dreambooth.train import loop, setup

from research.orthogonal import orthogonal


def train_with_probes(cfg, run_dir, probes: int, min_t: int = 400, progress: bool = False):
    """``dreambooth.train.train`` with every optimizer step's UNet change projected off
    ``probes`` random probes of the class prompt's output gradients (orthogonal.py)."""
    with contextlib.ExitStack() as held:
        s = setup(cfg, Path(run_dir), held, progress=progress)
        if len(s.sources) < 2:
            raise SystemExit("the probes read the class images: keep prior.enabled=true")
        unet = s.family.denoiser(s.model)
        params = list(unet.parameters())
        need = orthogonal.estimated_bytes(sum(p.numel() for p in params), probes)
        if need > orthogonal.free_bytes():
            raise SystemExit(f"{probes} probes need {need / 2**30:.1f} GiB: lower --probes")
        class_prompt = s.sources[1].prompts[0]
        conds = [s.family.encode_prompts(s.model, [p], s.acc.device) for p in (class_prompt, "")]
        bases = orthogonal.probe_bases(unet, s.model.scheduler, s.sources[1].latents, conds, probes, min_t,
                                       s.family.concat_cond, progress=progress)
        s.project = functools.partial(orthogonal.hold, params, [p.detach().clone() for p in params], bases)
        return loop(s, progress=progress)


if __name__ == "__main__":  # pragma: no cover
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", required=True)
    ap.add_argument("--class", dest="noun", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--probes", type=int, default=256)
    ap.add_argument("--preset", default="world")
    args = ap.parse_args()
    cfg = build_config(args.preset, extra={"data.images": args.images, "data.class_noun": args.noun})
    cfg.prior.null_space = 0.0
    print(train_with_probes(cfg, args.out, args.probes, progress=True))
