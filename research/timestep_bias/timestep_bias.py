"""Timestep bias: a fraction of the training samples draw their timestep from the late, noisy end
[bias_min, T) instead of [0, T), where layouts, patterns' lattices and marks are decided.

On the world model 0.5 from 500 learned no more of the subject and moved the class prompt more
(research/world/results.md), so it is not a config key. It runs as a family whose
``draw_timestep`` is biased, through the library's recipe (setup, loop).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from dreambooth.family import UNetFamily
from dreambooth.train import loop, setup


def draw_timestep(generator: torch.Generator, num_train_timesteps: int, bias: float = 0.0,
                  bias_min: int = 0) -> torch.Tensor:
    """One training timestep, shape (1,): uniform on [0, T); with ``bias`` > 0, drawn instead from
    [bias_min, T) with probability ``bias``. Density: (1 - bias) / T below bias_min, that plus
    bias / (T - bias_min) from it. With bias 0 the generator is used exactly as a plain uniform draw."""
    if bias and float(torch.rand(1, generator=generator)) < bias:
        return torch.randint(bias_min, num_train_timesteps, (1,), generator=generator)
    return torch.randint(0, num_train_timesteps, (1,), generator=generator)


class BiasedUNetFamily(UNetFamily):
    def __init__(self, bias: float, bias_min: int):
        self.bias, self.bias_min = bias, bias_min

    def draw_timestep(self, generator, model):
        return draw_timestep(generator, model.scheduler.config.num_train_timesteps, self.bias, self.bias_min)


def train_biased(cfg, run_dir, bias: float, bias_min: int = 500, progress: bool = False):
    """``dreambooth.train.train`` with biased timesteps (photos and class images alike)."""
    with contextlib.ExitStack() as held:
        s = setup(cfg, Path(run_dir), held, progress=progress)
        s.family = BiasedUNetFamily(bias, bias_min)
        return loop(s, progress=progress)
