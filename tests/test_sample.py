"""Generation: per-image seeds, batching, schedulers, and the three tiny architectures."""

import numpy as np
import pytest
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       UniPCMultistepScheduler)

from dreambooth.errors import ConfigError
from dreambooth.models import build_tiny
from dreambooth.sample import contrast_prompt, generate, make_scheduler

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
        make_scheduler("euler", sd2)


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


def test_contrast_prompt_drops_the_identifier():
    assert contrast_prompt("a photo of zwx dog on the beach", "zwx", "dog") == "a photo of a dog on the beach"
    assert contrast_prompt("a photo of my zwx dog", "zwx", "dog") == "a photo of my dog"
    assert contrast_prompt("a zwx dog", "zwx", "dog") == "a dog"
    assert contrast_prompt("ZWX dog in the snow", "zwx", "dog") == "a dog in the snow"
    assert contrast_prompt("a photo of a dog", "zwx", "dog") == "a photo of a dog"  # unchanged
    assert contrast_prompt("zwxy dog", "zwx", "dog") == "zwxy dog"  # whole words only


def test_subject_guidance_moves_only_prompts_with_the_identifier(model):
    prompts, seeds, kw = ["a photo of zwx dog", "a photo of a dog"], [1, 2], dict(steps=4, batch_size=2)
    plain = pixels(generate(model, prompts, seeds, **kw))
    guided = pixels(generate(model, prompts, seeds, subject_guidance=30.0, subject_below=1000,
                             token="zwx", class_noun="dog", **kw))
    assert np.abs(guided[0] - plain[0]).mean() > 1  # the identifier's prompt moves
    assert np.abs(guided[1] - plain[1]).max() <= 2  # the class prompt only by batched rounding
    alone = pixels(generate(model, prompts[1:], seeds[1:], subject_guidance=2.5, token="zwx",
                            class_noun="dog", **kw))
    assert np.array_equal(alone[0], pixels(generate(model, prompts[1:], seeds[1:], **kw))[0])  # the pipeline
    # below=0: the third pass never runs, and the sampler's own loop is the pipeline's
    never = pixels(generate(model, prompts, seeds, subject_guidance=2.5, subject_below=0, token="zwx",
                            class_noun="dog", **kw))
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(never, plain))
    # only below the threshold: less change than at every step
    late = pixels(generate(model, prompts, seeds, subject_guidance=30.0, subject_below=500, token="zwx",
                           class_noun="dog", **kw))
    assert 0 < np.abs(late[0] - plain[0]).mean() < np.abs(guided[0] - plain[0]).mean()
    with pytest.raises(ValueError, match="token"):
        generate(model, prompts, seeds, subject_guidance=1.0, steps=2)
    with pytest.raises(ConfigError, match="SDXL"):
        generate(build_tiny("tiny-sdxl"), prompts, seeds, subject_guidance=1.0, token="zwx", steps=2)
