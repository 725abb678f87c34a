"""The probe: a small CNN that reads a world scene's factors back from an image, and the metrics.

The probe has one head per factor (shape, color, pattern, mark, background) and regresses the
object's pose (center x, y and size, as fractions of the image). It was trained on fresh renders,
augmented so that it also reads the slightly soft images a 64 px diffusion model makes
(research/world/train_probe.py). The weights ship beside this file (``probe.safetensors``, fp16)
with ``probe.json`` (architecture, command, seed, steps, accuracy measured on fresh renders).

The world metric set (``world_scores``: subject fidelity, factor match, prompt fidelity, prior
distance) is a pure function of readings (dicts as returned by :meth:`Probe.read`); the evaluator
(``dreambooth.validation``) computes it during training, in `dreambooth eval`, `sweep` and `demo`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dreambooth.data import arrays_to_tensor
from dreambooth.world.render import BACKGROUNDS, COLORS, MARKS, PATTERNS, SHAPES

HERE = Path(__file__).parent
WEIGHTS, META = "probe.safetensors", "probe.json"
HEADS = {"shape": SHAPES, "color": tuple(COLORS), "pattern": PATTERNS, "mark": MARKS,
         "background": BACKGROUNDS}
POSE = ("x", "y", "size")
DISTRIBUTION = ("shape", "color", "pattern", "background")  # what the prior distance compares
RESOLUTION = 64
WIDTHS, HIDDEN = (16, 32, 48, 64, 96), 160  # the shipped probe's architecture


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


def load_probe(folder: str | Path | None = None) -> Probe:
    """The probe shipped in the package (or the one saved in ``folder``)."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else HERE
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"no {WEIGHTS} in {folder}; train one with "
                                f"`python -m research.world.train_probe --train --out {folder}`")
    meta = json.loads((folder / META).read_text())
    model = ProbeNet(tuple(meta["widths"]), meta["hidden"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(folder / WEIGHTS)).items()}
    model.load_state_dict(state, strict=False)
    missing = [k for k in model.state_dict() if k not in state and "num_batches_tracked" not in k]
    if missing:
        raise ValueError(f"{folder / WEIGHTS} lacks {missing[:3]}...; retrain the probe")
    return Probe(model)


# ---------------------------------------------------------------- metrics

IDENTITY = ("shape", "color", "pattern", "mark")  # what makes a subject this one


def subject_of(readings: list[dict]) -> dict[str, str]:
    """The subject's identity factors as the probe reads its photos: each factor's majority."""
    return {k: Counter(r[k] for r in readings).most_common(1)[0][0] for k in IDENTITY}


def factor_distribution(readings, factors=DISTRIBUTION) -> dict[str, dict[str, float]]:
    """{factor: {value: frequency}} over every value the factor can take (unseen values get 0)."""
    n = len(readings)
    counts = {f: Counter(r[f] for r in readings) for f in factors}
    return {f: {v: counts[f][v] / n if n else 0.0 for v in HEADS[f]} for f in factors}


def tv_distance(p: dict, q: dict) -> float:
    """Total variation 0.5 * sum |p(v) - q(v)| over the union of outcomes (absent = 0)."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def prior_distance(readings, reference, factors=DISTRIBUTION) -> float:
    """Mean over ``factors`` of the TV distance between two sets of readings' distributions."""
    p, q = factor_distribution(readings, factors), factor_distribution(reference, factors)
    return sum(tv_distance(p[f], q[f]) for f in factors) / len(factors)


def world_scores(readings: list[dict], backgrounds: list[str | None], subject: dict[str, str],
                 class_now: list[dict] | None = None, class_base: list[dict] | None = None) -> dict:
    """The world metric set, from the readings of the subject prompts' images (``backgrounds``:
    the one each image's prompt names, or None) and of the class prompt's before and after:

    - subject_fidelity: fraction of images whose shape, color, pattern and mark are the subject's
    - factor_match: mean fraction of those four factors right (what selection reads as fidelity)
    - prompt_fidelity: fraction of images whose prompt names a background that show it (None
      when no prompt names one)
    - prior_distance: ``prior_distance`` of the class prompt's readings now and before (the
      same seeds, so an unchanged model scores exactly 0); with ``class_now`` only
    - subject_factors: "shape-color-pattern-mark" of ``subject``
    """
    right = [[r[k] == subject[k] for k in IDENTITY] for r in readings]
    asked = [r["background"] == bg for r, bg in zip(readings, backgrounds) if bg is not None]
    out = {"subject_fidelity": sum(map(all, right)) / len(right),
           "factor_match": sum(sum(r) / len(IDENTITY) for r in right) / len(right),
           "prompt_fidelity": sum(asked) / len(asked) if asked else None}
    if class_now:
        out["prior_distance"] = prior_distance(class_now, class_base)
    out["subject_factors"] = "-".join(subject[k] for k in IDENTITY)
    return out
