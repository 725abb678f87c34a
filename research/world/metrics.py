"""World metrics that only the research scripts use (moved out of dreambooth/world/probe.py):
per-factor matches, the joint distribution, the TV report per factor, the unpaired noise floor,
and diversity. The package's own metric set is ``dreambooth.world.probe.world_scores``."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np

from dreambooth.world.probe import (DISTRIBUTION, IDENTITY, POSE, factor_distribution,
                                    tv_distance)
from dreambooth.world.render import BACKGROUNDS


def _get(obj, key):
    return obj[key] if isinstance(obj, dict) else getattr(obj, key)


def subject_fidelity(readings, subject) -> float:
    """Fraction of readings whose shape, color, pattern and mark all equal the subject's."""
    if not readings:
        return float("nan")
    return sum(all(_get(r, k) == _get(subject, k) for k in IDENTITY) for r in readings) / len(readings)


def factor_match(readings, subject) -> dict[str, float]:
    """For each identity factor, the fraction of readings that show the subject's value."""
    if not readings:
        return {k: float("nan") for k in IDENTITY}
    return {k: sum(_get(r, k) == _get(subject, k) for r in readings) / len(readings) for k in IDENTITY}


def prompt_fidelity(readings, backgrounds) -> float:
    """Fraction of readings whose background is the prompt's: one name for all, or one per reading."""
    if not readings:
        return float("nan")
    if isinstance(backgrounds, str):
        backgrounds = [backgrounds] * len(readings)
    if len(backgrounds) != len(readings):
        raise ValueError(f"prompt_fidelity: {len(readings)} readings but {len(backgrounds)} backgrounds")
    return sum(_get(r, "background") == b for r, b in zip(readings, backgrounds)) / len(readings)


def joint_distribution(readings, factors=DISTRIBUTION) -> dict[tuple, float]:
    """{(value, value, ...): frequency} of the factors read together (only outcomes seen)."""
    n = len(readings)
    counts = Counter(tuple(_get(r, f) for f in factors) for r in readings)
    return {k: c / n for k, c in counts.items()}


def tv_report(readings, reference, factors=DISTRIBUTION) -> dict[str, float]:
    """TV distance between two sets of readings: per factor, "mean" of those, and "joint"."""
    p, q = factor_distribution(readings, factors), factor_distribution(reference, factors)
    out = {f: tv_distance(p[f], q[f]) for f in factors}
    out["mean"] = sum(out[f] for f in factors) / len(factors)
    out["joint"] = tv_distance(joint_distribution(readings, factors), joint_distribution(reference, factors))
    return out


def expected_floor(reference, n: int, factors=DISTRIBUTION, draws: int = 400, seed: int = 0) -> float:
    """The mean over ``factors`` of the TV distance that two independent samples of ``n`` images
    from the same model read on average (Monte Carlo over ``draws`` pairs of multinomial draws
    from ``reference``'s factor frequencies): what an unchanged distribution reads at ``n`` unpaired."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for dist in factor_distribution(reference, factors).values():
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
