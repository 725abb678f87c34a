"""The paper's metrics: preprocessing against hand-computed pixels, metric math against
hand-made vectors, and the whole path through tiny random DINO/CLIP models saved to and loaded
from folders exactly as real ones are."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth.errors import InputError, ModelError
from dreambooth.evaluate import (
    CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, clip_t, cosine_matrix, div, load_clip,
    load_dino, mean_pairwise_cosine, preprocess, pres, resize_and_crop, score_images,
    strip_identifier,
)

# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("mean, std", [(IMAGENET_MEAN, IMAGENET_STD), (CLIP_MEAN, CLIP_STD)])
def test_constant_image_gives_exactly_the_normalized_color(mean, std):
    color = (10, 128, 250)
    x = preprocess([Image.new("RGB", (300, 200), color)] * 2, mean, std)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    for c in range(3):
        expected = (color[c] / 255 - mean[c]) / std[c]
        assert torch.allclose(x[:, c], torch.full((2, 224, 224), expected), atol=1e-6, rtol=0)


def test_shorter_side_becomes_256_then_a_centered_224_crop():
    # 300x200 (w x h): the shorter side 200 -> 256, the longer 300 -> int(256 * 300 / 200) = 384.
    # A black/white split at the middle must stay a mirror image after the centered crop.
    a = np.zeros((200, 300, 3), np.uint8)
    a[:, 150:] = 255
    crop = np.asarray(resize_and_crop(Image.fromarray(a))).astype(int)
    assert crop.shape == (224, 224, 3)
    assert (crop == crop[:1]).all()  # every row the same
    assert (crop[:, :, 0] + crop[:, ::-1, 0] == 255).all()  # symmetric about the center
    assert crop[0, 0, 0] == 0 and crop[0, -1, 0] == 255
    # portrait: the same about the horizontal middle
    crop = np.asarray(resize_and_crop(Image.fromarray(a.transpose(1, 0, 2).copy()))).astype(int)
    assert (crop[:, :, 0] + crop[::-1, :, 0] == 255).all()


def test_crop_offsets_are_hand_computed_when_no_resize_is_needed():
    # 256 wide, 300 tall: already 256 on the shorter side, so no resampling; the crop starts at
    # left (256 - 224) / 2 = 16, top (300 - 224) / 2 = 38. Encode row in R and column in G.
    rows, cols = np.meshgrid(np.arange(300), np.arange(256), indexing="ij")
    a = np.stack([rows % 256, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    x = preprocess([Image.fromarray(a)], (0, 0, 0), (1, 1, 1))
    assert x.shape == (1, 3, 224, 224)
    assert x[0, 0, 0, 0] * 255 == pytest.approx(38) and x[0, 1, 0, 0] * 255 == pytest.approx(16)
    assert x[0, 0, 223, 5] * 255 == pytest.approx((38 + 223) % 256)
    assert x[0, 1, 7, 223] * 255 == pytest.approx(16 + 223)


def test_any_image_mode_becomes_rgb():
    gray = Image.new("L", (224, 224), 51)
    rgba = Image.new("RGBA", (224, 224), (51, 51, 51, 7))
    x = preprocess([gray, rgba], (0, 0, 0), (1, 1, 1))
    assert torch.allclose(x, torch.full_like(x, 0.2))


# ---------------------------------------------------------------- metric math


def test_cosine_matrix_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    r = 1 / math.sqrt(2)
    assert torch.allclose(cosine_matrix(a, b), torch.tensor([[0.0, 1.0], [r, r]]))
    assert cosine_matrix(a, b[:1]).shape == (2, 1)
    with pytest.raises(ValueError, match=r"\(N, D\) and \(M, D\)"):
        cosine_matrix(a, torch.ones(2, 3))


def test_mean_pairwise_cosine_over_all_pairs():
    e = torch.eye(3)
    assert mean_pairwise_cosine(e[:1], e[1:]) == 0.0  # orthogonal
    assert mean_pairwise_cosine(e[:1] * 5, e[:1]) == pytest.approx(1.0)  # identical directions
    # 2x2 by hand: gen {e0, e1}, real {e0, (e0+e1)/√2}: (1 + r + 0 + r) / 4
    real = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    assert mean_pairwise_cosine(e[:2], real) == pytest.approx((1 + 2 / math.sqrt(2)) / 4)
    assert pres(e[:2], real) == mean_pairwise_cosine(e[:2], real)


def test_clip_t_pairs_each_image_with_its_own_prompt():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert clip_t(images, images) == pytest.approx(1.0)
    assert clip_t(images, images.flip(0)) == 0.0  # all-pairs would have given 0.5
    assert clip_t(images, torch.tensor([[1.0, 1.0], [0.0, -3.0]])) == pytest.approx(
        (1 / math.sqrt(2) - 1) / 2)
    with pytest.raises(ValueError, match="same shape"):
        clip_t(images, images[:1])


def test_div_excludes_self_pairs():
    e = torch.eye(3)
    assert div(torch.ones(4, 3)) == pytest.approx(0.0)  # identical images
    assert div(e) == pytest.approx(1.0)  # mutually orthogonal
    # {e0, e0, e1}: ordered pairs i != j: (0,1)=1, (0,2)=0, (1,2)=0, twice -> mean 1/3
    assert div(torch.stack([e[0], e[0], e[1]])) == pytest.approx(1 - 1 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        div(e[:1])


@pytest.mark.parametrize("prompt, expected", [
    ("a photo of waj dog on the beach", "a photo of dog on the beach"),
    ("waj dog", "dog"),
    ("a WAJ dog", "a dog"),
    ("a wajx dog near xwaj", "a wajx dog near xwaj"),  # whole words only
    ("a  waj   dog", "a dog"),
])
def test_strip_identifier(prompt, expected):
    assert strip_identifier(prompt, "waj") == expected


def test_strip_identifier_escapes_regex_characters():
    assert strip_identifier("a <s*> dog", "<s*>") == "a dog"


# ---------------------------------------------------------------- tiny models through folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from dreambooth.evaluate import tiny_encoders

    root = tmp_path_factory.mktemp("eval_models")
    vit, clip, tokenizer = tiny_encoders()
    vit.save_pretrained(root / "dino")
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    return root


@pytest.fixture(scope="module")
def encoders(folders):
    return load_dino(folders / "dino", batch_size=3), load_clip(folders / "clip", batch_size=3)


def _photos(n, seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)) for _ in range(n)]


def test_encoders_give_normalized_embeddings_in_batches(encoders):
    dino, clip = encoders
    images = _photos(4, 0)  # batch size 3: two batches
    d, c = dino.embed_images(images), clip.embed_images(images)
    assert d.shape == (4, 32) and c.shape == (4, 16)
    assert torch.allclose(d.norm(dim=1), torch.ones(4))
    assert torch.allclose(c.norm(dim=1), torch.ones(4))
    assert torch.allclose(d[3:], dino.embed_images(images[3:]), atol=1e-6)  # batching is invisible
    t = clip.embed_texts(["a photo of dog", "a photo of cat", "a dog", "x" * 500])
    assert t.shape == (4, 16) and torch.allclose(t.norm(dim=1), torch.ones(4))
    assert not dino.model.training and not clip.model.training


def test_score_images_ranges_determinism_and_identities(encoders):
    dino, clip = encoders
    real = _photos(3, 1)
    generated = {"a photo of waj dog": _photos(2, 2), "waj dog on the beach": _photos(3, 3)}
    scores = score_images(generated, real, "waj", dino, clip, class_generated=_photos(2, 4))
    assert set(scores) == {"dino", "clip_i", "clip_t", "pres", "div"}
    ranges = {"dino": (-1, 1), "clip_i": (-1, 1), "clip_t": (-1, 1), "pres": (-1, 1), "div": (0, 2)}
    for name, value in scores.items():
        low, high = ranges[name]
        assert isinstance(value, float) and low - 1e-6 <= value <= high + 1e-6, (name, value)
    assert score_images(generated, real, "waj", dino, clip, _photos(2, 4)) == scores
    json.dumps(scores)

    same = score_images({"a waj dog": [real[0]] * 3}, [real[0]], "waj", dino, clip)
    assert "pres" not in same
    assert same["dino"] == pytest.approx(1.0, abs=1e-6)
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-6)
    assert same["div"] == pytest.approx(0.0, abs=1e-6)

    # CLIP-T uses the prompt without the identifier, each image with its own prompt
    img = clip.embed_images([real[0]])
    text = clip.embed_texts(["a dog"])
    assert same["clip_t"] == pytest.approx(float((img * text).sum()), abs=1e-6)
    # one image per prompt: no diversity to measure
    assert score_images({"a waj dog": [real[0]]}, real, "waj", dino, clip)["div"] is None


def test_score_images_refuses_empty_inputs(encoders):
    dino, clip = encoders
    with pytest.raises(InputError, match="no generated images"):
        score_images({"a waj dog": []}, _photos(1, 0), "waj", dino, clip)
    with pytest.raises(InputError, match="no real subject photos"):
        score_images({"a waj dog": _photos(1, 0)}, [], "waj", dino, clip)


def test_missing_or_wrong_folders_say_what_to_put_there(tmp_path, folders):
    with pytest.raises(ModelError) as e:
        load_dino(tmp_path / "nowhere")
    msg = str(e.value)
    assert "does not exist" in msg and "huggingface-cli download facebook/dino-vits16" in msg
    assert "--dino" in msg
    with pytest.raises(ModelError, match="openai/clip-vit-base-patch32.*--clip"):
        load_clip(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        load_dino(tmp_path / "empty")
    with pytest.raises(ModelError, match="holds a 'clip' model.*--dino"):
        load_dino(folders / "clip")
    with pytest.raises(ModelError, match="holds a 'vit' model.*--clip"):
        load_clip(folders / "dino")
