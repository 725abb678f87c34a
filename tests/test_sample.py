"""Generation: per-image seeds, batching, schedulers, and the three tiny architectures."""

import numpy as np
import pytest
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       UniPCMultistepScheduler)

from dreambooth.errors import ConfigError
from dreambooth.models import build_tiny
from dreambooth.sample import generate, make_scheduler

PROMPTS = ["a photo of a dog", "a photo of a cat", "a photo of a dog"]


@pytest.fixture(scope="module")
def model():
    return build_tiny("tiny")


def pixels(images):
    return [np.asarray(im, dtype=int) for im in images]


def test_make_scheduler_names_and_prediction_type():
    sd2 = build_tiny("tiny-sd2").scheduler.config
    for name, cls in {"dpmpp": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler,
                      "ddim": DDIMScheduler, "ddpm": DDPMScheduler}.items():
        s = make_scheduler(name, sd2)
        assert type(s) is cls and s.config.prediction_type == "v_prediction"
        assert s.config.beta_schedule == "scaled_linear" and s.config.num_train_timesteps == 1000
    assert make_scheduler("dpmpp", sd2).config.algorithm_type == "dpmsolver++"
    assert make_scheduler("ddim", build_tiny("tiny").scheduler.config).config.prediction_type == "epsilon"
    with pytest.raises(ConfigError, match="dpmpp, unipc, ddim, ddpm"):
        make_scheduler("heun", sd2)


@pytest.mark.parametrize("scheduler", ["dpmpp", "ddpm"])  # ddpm adds noise at every step too
def test_an_image_does_not_depend_on_batch_boundaries(model, scheduler):
    kw = dict(steps=3, scheduler=scheduler)
    in_twos = pixels(generate(model, PROMPTS, [1, 2, 3], batch_size=2, **kw))
    in_three = pixels(generate(model, PROMPTS, [1, 2, 3], batch_size=3, **kw))
    alone = pixels(generate(model, PROMPTS[1:2], [2], batch_size=1, **kw))
    # Same noise, same prompt: equal up to the rounding of batched kernels (<= one 8-bit level)
    for a, b in zip(in_twos + in_three[1:2], in_three + alone):
        diff = np.abs(a - b)
        assert diff.max() <= 2 and diff.mean() < 0.05
    # and bit-identical when the batches are the same
    again = pixels(generate(model, PROMPTS, [1, 2, 3], batch_size=2, **kw))
    assert all(np.array_equal(a, b) for a, b in zip(in_twos, again))


def test_seeds_and_prompts_change_the_image(model):
    a, b, c = pixels(generate(model, ["a photo of a dog"] * 2 + ["a red car"], [1, 2, 1], steps=3))
    assert np.abs(a - b).mean() > 5  # other seed: other noise
    assert not np.array_equal(a, c)  # other prompt, same seed


def test_modes_restored_and_progress_reported(model):
    model.unet.train()
    model.vae.eval()
    done = []
    images = generate(model, PROMPTS, [0, 1, 2], steps=2, batch_size=2, progress=done.append)
    assert len(images) == 3 and done == [2, 1]
    assert model.unet.training and not model.vae.training
    model.unet.eval()
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(model, PROMPTS, [0], steps=2)


def test_one_negative_prompt_per_prompt(model):
    """A list gives each prompt its own negative: the same as passing that negative alone."""
    kw = dict(steps=3, batch_size=3)
    mixed = pixels(generate(model, PROMPTS, [1, 2, 3], negative_prompt=["", "a red car", ""], **kw))
    plain = pixels(generate(model, PROMPTS, [1, 2, 3], **kw))
    car = pixels(generate(model, PROMPTS, [1, 2, 3], negative_prompt="a red car", **kw))
    assert np.array_equal(mixed[0], plain[0]) and np.array_equal(mixed[2], plain[2])
    assert np.array_equal(mixed[1], car[1]) and not np.array_equal(mixed[1], plain[1])
    with pytest.raises(ValueError, match="one negative prompt, or one per prompt"):
        generate(model, PROMPTS, [1, 2, 3], negative_prompt=["", ""], steps=2)


@pytest.mark.parametrize("name", ["tiny-sd2", "tiny-sdxl"])
def test_sd2_and_sdxl_generate(name):
    m = build_tiny(name)
    images = generate(m, PROMPTS[:2], [0, 1], steps=2, negative_prompt="blurry", batch_size=2)
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    a, b = pixels(images)
    assert a.std() > 1 and not np.array_equal(a, b)
    wide = generate(m, PROMPTS[:1], [0], steps=2, resolution=128, scheduler="unipc")
    assert wide[0].size == (128, 128)


def test_draw_saves_each_group_as_generated_alone_with_its_settings(model, tmp_path):
    """draw: one PNG per job named by prompt and seed, a group's batches never mix with another's
    (the same pixels as generate() on that group alone), the settings in each PNG, one sheet."""
    from PIL import Image

    from dreambooth.sample import draw

    kw = dict(steps=2, guidance=3.0, batch_size=4)
    first, second = [("a photo of a dog", 1), ("a photo of a cat", 1)], [("a photo of a dog", 2)]
    images = draw(model, tmp_path / "d", first, second, sheet="sheet.png", meta={"run": "r"}, **kw)
    alone = generate(model, [p for p, _ in second], [s for _, s in second], **kw)
    assert np.array_equal(np.asarray(images[2]), np.asarray(alone[0]))
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "p00-seed1.png", "p00-seed2.png", "p01-seed1.png", "sheet.png"]
    text = Image.open(tmp_path / "d/p01-seed1.png").text
    assert text["prompt"] == "a photo of a cat" and text["seed"] == "1" and text["run"] == "r"
    assert "batch_size" not in text and "Steps: 2" in text["parameters"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "d/p01-seed1.png").convert("RGB")),
                          np.asarray(images[1]))
