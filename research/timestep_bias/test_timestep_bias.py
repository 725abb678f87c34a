"""The biased timestep draw, and a run that trains with it."""

import pytest
import torch

from dreambooth.batch import Source, draw_samples
from dreambooth.config import build_config
from research.timestep_bias.timestep_bias import draw_timestep, train_biased

pytestmark = pytest.mark.usefixtures("isolated_cache")


def test_draw_timestep_unbiased_is_the_plain_uniform_draw():
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    drawn = [int(draw_timestep(a, 1000)) for _ in range(50)]
    assert drawn == [int(torch.randint(0, 1000, (1,), generator=b)) for _ in range(50)]


def test_draw_timestep_bias_moves_that_fraction_above_the_minimum():
    g = torch.Generator().manual_seed(0)
    assert all(int(draw_timestep(g, 1000, 1.0, 500)) >= 500 for _ in range(200))
    # bias 0.5 from 500: P(t >= 500) = 0.5 + 0.5 * 0.5 = 0.75, P(t >= 900) = 0.5 * 0.2 + 0.5 * 0.1 = 0.15
    ts = torch.cat([draw_timestep(g, 1000, 0.5, 500) for _ in range(4000)])
    assert ts.min() >= 0 and ts.max() < 1000
    assert abs((ts >= 500).float().mean().item() - 0.75) < 0.03
    assert abs((ts >= 900).float().mean().item() - 0.15) < 0.02


def test_bias_draws_late_timesteps_for_both_halves():
    sources = [Source(torch.zeros(3, 4, 8, 8), ["a photo of waj toy"] * 3),
               Source(torch.zeros(5, 4, 8, 8), ["a photo of a toy"] * 5)]
    ks = list(range(64))
    plain = draw_samples(sources, ks, 0, lambda g: draw_timestep(g, 1000))[2]
    late = draw_samples(sources, ks, 0, lambda g: draw_timestep(g, 1000, 1.0, 600))[2]
    assert len(late) == 128 and late.min() >= 600 and plain.min() < 600


def test_a_biased_run_trains(painted_photos, tmp_path):
    cfg = build_config("tiny", overrides=[f"data.images={painted_photos}", "data.class_noun=toy",
                                          "prior.num_images=2", "prior.steps=2", "train.steps=2"])
    assert train_biased(cfg, tmp_path / "run", bias=0.5).final.is_dir()
