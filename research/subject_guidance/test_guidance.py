"""Subject guidance (research/subject_guidance/guidance.py) on the tiny model."""

import numpy as np
import pytest

from dreambooth.errors import ConfigError
from dreambooth.models import build_tiny
from dreambooth.sample import generate
from research.subject_guidance.guidance import contrast_prompt, generate_guided


@pytest.fixture(scope="module")
def model():
    return build_tiny("tiny")


def pixels(images):
    return [np.asarray(im, dtype=int) for im in images]


def test_contrast_prompt_drops_the_identifier():
    assert contrast_prompt("a photo of zwx dog on the beach", "zwx", "dog") == "a photo of a dog on the beach"
    assert contrast_prompt("a photo of my zwx dog", "zwx", "dog") == "a photo of my dog"
    assert contrast_prompt("a zwx dog", "zwx", "dog") == "a dog"
    assert contrast_prompt("ZWX dog in the snow", "zwx", "dog") == "a dog in the snow"
    assert contrast_prompt("a photo of a dog", "zwx", "dog") == "a photo of a dog"  # unchanged
    assert contrast_prompt("zwxy dog", "zwx", "dog") == "zwxy dog"  # whole words only


def test_subject_guidance_moves_only_prompts_with_the_identifier(model):
    prompts, seeds, kw = ["a photo of zwx dog", "a photo of a dog"], [1, 2], dict(steps=4, batch_size=2)
    guide = dict(token="zwx", class_noun="dog")
    plain = pixels(generate(model, prompts, seeds, **kw))
    guided = pixels(generate_guided(model, prompts, seeds, subject_guidance=30.0, subject_below=1000, **guide, **kw))
    assert np.abs(guided[0] - plain[0]).mean() > 1  # the identifier's prompt moves
    assert np.abs(guided[1] - plain[1]).max() <= 2  # the class prompt only by batched rounding
    alone = pixels(generate_guided(model, prompts[1:], seeds[1:], subject_guidance=2.5, **guide, **kw))
    assert np.array_equal(alone[0], pixels(generate(model, prompts[1:], seeds[1:], **kw))[0])  # the pipeline
    # below=0: the third pass never runs, and the sampler's own loop is the pipeline's
    never = pixels(generate_guided(model, prompts, seeds, subject_guidance=2.5, subject_below=0, **guide, **kw))
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(never, plain))
    # only below the threshold: less change than at every step
    late = pixels(generate_guided(model, prompts, seeds, subject_guidance=30.0, subject_below=500, **guide, **kw))
    assert 0 < np.abs(late[0] - plain[0]).mean() < np.abs(guided[0] - plain[0]).mean()
    with pytest.raises(ValueError, match="token"):
        generate_guided(model, prompts, seeds, subject_guidance=1.0, token="", steps=2)
    with pytest.raises(ConfigError, match="SDXL"):
        generate_guided(build_tiny("tiny-sdxl"), prompts, seeds, subject_guidance=1.0, token="zwx", steps=2)
