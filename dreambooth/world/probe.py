"""Probes: a small CNN that reads a world scene's factors back from an image, and the metrics.

The probe has one head per factor (shape, color, pattern, mark, background) and regresses the
object's pose (center x, y and size, as fractions of the image). It trains on fresh renders,
augmented with blur, down/up-sampling, noise, quantization and slight brightness/contrast
changes so it also reads the slightly soft images a 64 px diffusion model makes. The trained
weights ship beside this file (``probe.safetensors``, fp16) with ``probe.json`` (architecture,
command, seed, steps, accuracy measured on fresh renders).

Metrics are pure functions of readings (dicts as returned by :meth:`Probe.read`):

- ``subject_fidelity``: fraction of images whose shape, color, pattern AND mark match the subject.
- ``prompt_fidelity``: fraction whose background is the one the prompt asked for.
- ``factor_distribution`` / ``joint_distribution``: empirical distributions of readings.
- ``tv_distance(p, q) = 0.5 * sum |p - q|`` over the union of outcomes (missing = 0);
  ``tv_report`` gives it per factor, their mean, and on the joint of the factors.
- ``diversity``: ``pose`` = mean pairwise Euclidean distance of (x, y, size) (image fractions;
  about 0.22 for independent uniform poses of :func:`random_scene`), ``background`` = entropy of
  the background distribution divided by log(number of backgrounds) (0 = one background,
  1 = all six equally often).

Retrain and rewrite the shipped files::

    python -m dreambooth.world.probe --train --steps 3000 --out dreambooth/world/
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dreambooth.data import arrays_to_tensor
from dreambooth.world.render import (BACKGROUNDS, COLORS, MARKS, PATTERNS, SHAPES, render_array,
                                     sample_scenes)

HERE = Path(__file__).parent
WEIGHTS, META = "probe.safetensors", "probe.json"
HEADS = {"shape": SHAPES, "color": tuple(COLORS), "pattern": PATTERNS, "mark": MARKS,
         "background": BACKGROUNDS}
POSE = ("x", "y", "size")
DISTRIBUTION = ("shape", "color", "pattern", "background")  # what the prior distance compares
RESOLUTION = 64
EVAL_SEED = -1  # the scenes accuracy is measured on; training seeds are >= 0
WIDTHS, HIDDEN = (16, 32, 48, 64, 96), 160  # the shipped probe's architecture
TRAINING = dict(steps=3000, seed=0, batch=64, lr=3e-3)  # and how it was trained


class ProbeNet(nn.Module):
    """Conv stack on (image, x-coordinate, y-coordinate). A 16x16 map of local detectors (marks,
    patterns) is max- and mean-pooled over the image; a coarser 4x4 map keeps the layout (shape,
    background, pose). Both feed an MLP with one head per factor and a pose regressor."""

    def __init__(self, widths=WIDTHS, hidden=HIDDEN):
        super().__init__()
        w0, w1, w2, w3, w4 = widths

        def conv(cin, cout, stride=1):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.local = nn.Sequential(
            *conv(5, w0), *conv(w0, w1, 2),  # 32x32
            *conv(w1, w2), *conv(w2, w2, 2), *conv(w2, w3),  # 16x16
        )
        self.layout = nn.Sequential(*conv(w3, w4, 2), *conv(w4, w4, 2), nn.Flatten())  # 4x4
        self.mlp = nn.Sequential(nn.Linear(w4 * 16 + 2 * w3, hidden), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in HEADS.items()})
        self.pose = nn.Linear(hidden, len(POSE))
        c = torch.linspace(-1, 1, RESOLUTION)
        self.register_buffer("coords", torch.stack(torch.meshgrid(c, c, indexing="xy"))[None], persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, 64, 64) in [-1, 1] -> {factor: logits (B, K)} and "pose": (B, 3)."""
        h = self.local(torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], 1))
        h = self.mlp(torch.cat([self.layout(h), h.amax((2, 3)), h.mean((2, 3))], 1))
        out = {k: head(h) for k, head in self.heads.items()}
        out["pose"] = self.pose(h)
        return out


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


# ---------------------------------------------------------------- reading

class Probe:
    """A trained probe: ``read`` turns images into factor readings."""

    def __init__(self, model: ProbeNet):
        self.model = model.eval()

    @staticmethod
    def _pixels(images) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            arrays = images if images.ndim == 4 else images[None]
        else:
            from PIL import Image

            arrays = np.stack([np.asarray(im.convert("RGB").resize((RESOLUTION, RESOLUTION), Image.BILINEAR)
                                          if im.size != (RESOLUTION, RESOLUTION) else im.convert("RGB"))
                               for im in images])
        if arrays.shape[1:] != (RESOLUTION, RESOLUTION, 3) or arrays.dtype != np.uint8:
            raise ValueError(f"Probe.read expects PIL images or uint8 arrays (N, 64, 64, 3); "
                             f"got {arrays.dtype} {arrays.shape}")
        return arrays_to_tensor(arrays)

    def probabilities(self, images) -> dict[str, np.ndarray]:
        """{factor: (N, K) probabilities in the order of HEADS[factor]}, and "pose": (N, 3)."""
        x = self._pixels(images)
        outs = []
        with torch.no_grad():
            for i in range(0, len(x), 256):
                outs.append(self.model(x[i:i + 256]))
        res = {k: torch.cat([o[k] for o in outs]).softmax(1).numpy() for k in HEADS}
        res["pose"] = torch.cat([o["pose"] for o in outs]).numpy()
        return res

    def read(self, images) -> list[dict]:
        """One dict per image: each factor's most likely value, x, y, size (image fractions), and
        "confidence": {factor: probability of the value read}."""
        p = self.probabilities(images)
        readings = []
        for i in range(len(p["pose"])):
            r = {k: HEADS[k][int(p[k][i].argmax())] for k in HEADS}
            r.update({name: float(v) for name, v in zip(POSE, p["pose"][i])})
            r["confidence"] = {k: float(p[k][i].max()) for k in HEADS}
            readings.append(r)
        return readings


def save_probe(model: ProbeNet, folder: str | Path, meta: dict) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    save_file(state, str(folder / WEIGHTS))
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")


def load_probe(folder: str | Path | None = None) -> Probe:
    """The probe shipped in the package (or the one saved in ``folder``)."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else HERE
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"no {WEIGHTS} in {folder}; train one with "
                                f"`python -m dreambooth.world.probe --train --out {folder}`")
    meta = json.loads((folder / META).read_text())
    model = ProbeNet(tuple(meta["widths"]), meta["hidden"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(folder / WEIGHTS)).items()}
    model.load_state_dict(state, strict=False)
    missing = [k for k in model.state_dict() if k not in state and "num_batches_tracked" not in k]
    if missing:
        raise ValueError(f"{folder / WEIGHTS} lacks {missing[:3]}...; retrain the probe")
    return Probe(model)


# ---------------------------------------------------------------- metrics

IDENTITY = ("shape", "color", "pattern", "mark")


def _get(obj, key):
    return obj[key] if isinstance(obj, dict) else getattr(obj, key)


def subject_fidelity(readings, subject) -> float:
    """Fraction of readings whose shape, color, pattern and mark all equal the subject's."""
    if not readings:
        return float("nan")
    return sum(all(_get(r, k) == _get(subject, k) for k in IDENTITY) for r in readings) / len(readings)


def factor_match(readings, subject) -> dict[str, float]:
    """For each identity factor, the fraction of readings that show the subject's value: which
    factor keeps ``subject_fidelity`` down."""
    if not readings:
        return {k: float("nan") for k in IDENTITY}
    return {k: sum(_get(r, k) == _get(subject, k) for r in readings) / len(readings) for k in IDENTITY}


def prompt_fidelity(readings, backgrounds) -> float:
    """Fraction of readings whose background is the prompt's: ``backgrounds`` is one name for all
    readings or a list with one name per reading."""
    if not readings:
        return float("nan")
    if isinstance(backgrounds, str):
        backgrounds = [backgrounds] * len(readings)
    if len(backgrounds) != len(readings):
        raise ValueError(f"prompt_fidelity: {len(readings)} readings but {len(backgrounds)} backgrounds")
    return sum(_get(r, "background") == b for r, b in zip(readings, backgrounds)) / len(readings)


def factor_distribution(readings, factors=DISTRIBUTION) -> dict[str, dict[str, float]]:
    """{factor: {value: frequency}} over every value the factor can take (unseen values get 0)."""
    n = len(readings)
    out = {}
    for f in factors:
        counts = Counter(_get(r, f) for r in readings)
        out[f] = {v: counts[v] / n if n else 0.0 for v in HEADS[f]}
    return out


def joint_distribution(readings, factors=DISTRIBUTION) -> dict[tuple, float]:
    """{(value, value, ...): frequency} of the factors read together (only outcomes seen)."""
    n = len(readings)
    counts = Counter(tuple(_get(r, f) for f in factors) for r in readings)
    return {k: c / n for k, c in counts.items()}


def tv_distance(p: dict, q: dict) -> float:
    """Total variation 0.5 * sum |p(v) - q(v)| over the union of outcomes (absent = 0)."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def tv_report(readings, reference, factors=DISTRIBUTION) -> dict[str, float]:
    """TV distance between two sets of readings: per factor, "mean" of those, and "joint"."""
    p, q = factor_distribution(readings, factors), factor_distribution(reference, factors)
    out = {f: tv_distance(p[f], q[f]) for f in factors}
    out["mean"] = sum(out[f] for f in factors) / len(factors)
    out["joint"] = tv_distance(joint_distribution(readings, factors), joint_distribution(reference, factors))
    return out


def expected_floor(reference, n: int, factors=DISTRIBUTION,
                   draws: int = 400, seed: int = 0) -> float:
    """The mean over ``factors`` of the TV distance that two independent samples of ``n`` images
    from the same model read on average (Monte Carlo over ``draws`` pairs of multinomial draws
    from ``reference``'s factor frequencies). ``tv_report`` of two such samples is positive although
    their model is one: this is that bias, what an unchanged distribution reads at ``n`` unpaired."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for f, dist in factor_distribution(reference, factors).items():
        p = np.array(list(dist.values()))
        a, b = rng.multinomial(n, p, size=draws), rng.multinomial(n, p, size=draws)
        total += float(np.abs(a - b).sum(1).mean()) / (2 * n)
    return total / len(factors)


def diversity(readings) -> dict[str, float]:
    """{"pose": mean pairwise distance of (x, y, size), "background": normalized entropy}.

    Works on readings (dicts) or Scenes. Independent uniform poses give pose about 0.22."""
    pts = np.array([[_get(r, k) for k in POSE] for r in readings], dtype=np.float64)
    pairs = list(itertools.combinations(range(len(pts)), 2))
    pose = float(np.mean([np.linalg.norm(pts[i] - pts[j]) for i, j in pairs])) if pairs else 0.0
    counts = np.array(list(Counter(_get(r, "background") for r in readings).values()), dtype=np.float64)
    ent = 0.0
    if len(counts):
        pr = counts / counts.sum()
        ent = max(0.0, float(-(pr * np.log(pr)).sum() / math.log(len(BACKGROUNDS))))  # no -0.0
    return {"pose": pose, "background": ent}


# ---------------------------------------------------------------- command line

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dreambooth.world.probe", description=__doc__.split("\n")[0])
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
                "command": f"python -m dreambooth.world.probe --train --steps {args.steps} --seed {args.seed} "
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
