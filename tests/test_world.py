"""The procedural world (renderer, captions, held-out subjects) and its probe and metric set."""

import random

import numpy as np
import pytest

from dreambooth.world import render as W
from dreambooth.world import probe as P


def test_same_scene_same_pixels_and_same_seed_same_scenes():
    scene = W.random_scene(random.Random(3), mark="cross")
    a = W.render_array(scene)
    W._shape_layers.cache_clear(), W._pattern_layer.cache_clear(), W._mark_layer.cache_clear()
    assert np.array_equal(a, W.render_array(scene))
    assert W.render(scene).size == (64, 64) and W.render(scene).mode == "RGB"
    i1, c1, s1 = W.sample_pretraining(40, seed=5)
    i2, c2, s2 = W.sample_pretraining(40, seed=5)
    assert np.array_equal(i1, i2) and c1 == c2 and s1 == s2
    assert i1.shape == (40, 64, 64, 3) and i1.dtype == np.uint8
    assert W.sample_pretraining(40, seed=6)[2] != s1
    # Background details follow the variant, so one background type is many pictures.
    plain = W.Scene("ball", "red", background="grass")
    assert not np.array_equal(W.render_array(plain), W.render_array(W.Scene("ball", "red", background="grass", variant=1)))


def test_factor_coverage():
    assert len(W.SHAPES) >= 6 and len(W.COLORS) >= 9 and len(W.PATTERNS) >= 4
    assert len(W.BACKGROUNDS) >= 6 and W.MARKS[0] == "none" and len(W.MARKS) >= 4
    assert set(W.BACKGROUND_PHRASES) == set(W.BACKGROUNDS)
    scenes = W.sample_scenes(600, seed=1)
    for factor, values in P.HEADS.items():
        assert {getattr(s, factor) for s in scenes} == set(values), factor


def test_shape_and_color_names_are_single_clip_tokens():
    from dreambooth.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    for word in (*W.SHAPES, *W.COLORS, *W.BACKGROUNDS):
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (word, ids)


def test_captions():
    s = W.Scene("star", "red", "striped", "dot", "beach")
    assert W.caption(s) == "a photo of a red striped star with a dot on the beach"
    assert W.caption(s, omit=("mark",)) == "a photo of a red striped star on the beach"
    assert W.caption(W.Scene("star", "red", background="snow")) == "a photo of a red star in the snow"
    assert W.caption(W.Scene("cup", "orange", "dotted", background="plain")) == \
        "a photo of an orange dotted cup on a plain background"
    assert W.caption(s, token="sks") == "a photo of sks star on the beach"
    assert W.caption(s, token="sks", omit=("background",)) == "a photo of sks star"
    assert W.caption(s, omit=("color", "mark", "background")) == "a photo of a striped star"
    assert W.caption(s, omit=("color", "pattern", "background")) == "a photo of a star with a dot"
    with pytest.raises(ValueError, match="mark"):
        W.caption(s, omit=("size",))
    with pytest.raises(ValueError, match="one of"):
        W.Scene("dog", "red")


def test_objects_stay_inside_the_image():
    rng = random.Random(0)
    for _ in range(300):
        s = W.random_scene(rng)
        assert W.SIZE_RANGE[0] <= s.size <= W.SIZE_RANGE[1]
        assert s.x - s.size / 2 >= W.MARGIN - 1e-9 and s.x + s.size / 2 <= 1 - W.MARGIN + 1e-9
        assert s.y - s.size / 2 >= W.MARGIN - 1e-9 and s.y + s.size / 2 <= 1 - W.MARGIN + 1e-9


def test_marks_move_with_the_object():
    def mark_center(x):
        a = W.render_array(W.Scene("box", "green", mark="dot", x=x, y=0.5))
        b = W.render_array(W.Scene("box", "green", mark="none", x=x, y=0.5))
        ys, xs = np.nonzero(np.abs(a.astype(int) - b).sum(-1) > 60)
        assert len(xs) >= 16  # at least a 4x4 px mark
        return xs.mean()

    assert mark_center(0.7) - mark_center(0.3) == pytest.approx(0.4 * 64, abs=1.0)


def test_held_out_combinations_never_pretrained_and_marks_are_named_only_where_drawn():
    images, captions, scenes = W.sample_pretraining(3000, seed=11, mark_named=0.7)
    assert not any(W.is_held_out(s) for s in scenes)
    marked = [s.mark != "none" for s in scenes]
    assert abs(sum(marked) / len(scenes) - W.PRETRAIN_MARK_RATE) < 0.03
    named = [any(p in c for p in W.MARK_PHRASES.values()) for c in captions]
    assert not any(n and not m for n, m in zip(named, marked))  # never a mark that is not there
    assert all(W.MARK_PHRASES[s.mark] in c for s, c, n in zip(scenes, captions, named) if n)
    assert abs(sum(named) / sum(marked) - 0.7) < 0.05
    assert not any(p in c for c in W.sample_pretraining(300, seed=11)[1] for p in W.MARK_PHRASES.values())
    # naming draws from its own stream: the pictures are those of captions that never name marks
    assert np.array_equal(images[:50], W.sample_pretraining(50, seed=11, mark_named=0.0)[0])
    assert "a photo of a star" in captions  # the class prompt is in-distribution
    subjects = W.held_out_subjects()
    assert len(subjects) >= 6 and all(s.mark != "none" for s in subjects)
    assert len({s.shape for s in subjects}) == len(subjects)
    # every factor of a held-out subject is seen, only the combination is not
    for sub in subjects:
        assert any(s.shape == sub.shape for s in scenes) and any(s.color == sub.color for s in scenes)
        assert any(s.pattern == sub.pattern for s in scenes)


def test_subject_photos_vary_pose_and_background_not_identity():
    sub = W.held_out_subjects()[0]
    photos = sub.photos(5, seed=0)
    assert len(photos) == 5
    scenes = [s for _, s in photos]
    assert all((s.shape, s.color, s.pattern, s.mark) == (sub.shape, sub.color, sub.pattern, sub.mark)
               for s in scenes)
    assert len({(round(s.x, 3), round(s.y, 3), round(s.size, 3)) for s in scenes}) == 5
    assert len({s.background for s in scenes}) >= 2
    assert max(s.size for s in scenes) - min(s.size for s in scenes) > 0.1
    assert np.array_equal(np.asarray(photos[0][0]), np.asarray(sub.photos(5, seed=0)[0][0]))
    beach = sub.photos(3, seed=1, backgrounds=["beach"])
    assert {s.background for _, s in beach} == {"beach"}


def test_shipped_probe_reads_fresh_scenes():
    probe = P.load_probe()
    scenes = W.sample_scenes(300, seed=-2)  # training uses seeds >= 0, the json's eval uses -1
    images = np.stack([W.render_array(s) for s in scenes])
    readings = probe.read(images)
    for factor in P.HEADS:
        acc = np.mean([r[factor] == getattr(s, factor) for r, s in zip(readings, scenes)])
        assert acc >= 0.98, (factor, acc)
    err = np.mean([abs(r["x"] - s.x) + abs(r["y"] - s.y) for r, s in zip(readings, scenes)]) / 2
    assert err * 64 < 2.0  # pixels
    # PIL input gives the same readings as arrays
    pil = probe.read([W.render(s) for s in scenes[:4]])
    assert [r["shape"] for r in pil] == [r["shape"] for r in readings[:4]]
    assert 0 < readings[0]["confidence"]["mark"] <= 1


def _r(shape="star", color="red", pattern="plain", mark="dot", background="beach", x=0.5, y=0.5, size=0.3):
    return dict(shape=shape, color=color, pattern=pattern, mark=mark, background=background, x=x, y=y, size=size)


def test_world_scores_on_hand_made_readings():
    subject = {"shape": "star", "color": "red", "pattern": "plain", "mark": "dot"}
    readings = [_r(), _r(mark="none"), _r(color="blue", background="snow"), _r(background="snow")]
    assert P.subject_of(readings + [_r()]) == subject  # each factor's majority
    s = P.world_scores(readings, ["beach", "snow", None, "snow"], subject)
    assert s["subject_fidelity"] == 0.5 and s["factor_match"] == (1 + 0.75 + 1 + 0.75) / 4
    assert s["prompt_fidelity"] == 2 / 3 and s["subject_factors"] == "star-red-plain-dot"
    assert "prior_distance" not in s and P.world_scores(readings, [None] * 4, subject)["prompt_fidelity"] is None
    same = P.world_scores(readings, [None] * 4, subject, class_now=readings, class_base=readings)
    assert same["prior_distance"] == 0
    dist = P.factor_distribution(readings, factors=("color", "background"))
    assert dist["color"]["red"] == 0.75 and dist["color"]["blue"] == 0.25 and dist["color"]["green"] == 0
    assert sum(dist["background"].values()) == 1 and dist["background"]["snow"] == 0.5


def test_tv_distance_and_prior_distance_exact():
    assert P.tv_distance({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == 0
    assert P.tv_distance({"a": 1.0}, {"b": 1.0}) == 1
    assert P.tv_distance({"a": 0.5, "b": 0.5}, {"a": 0.25, "b": 0.25, "c": 0.5}) == pytest.approx(0.5)
    a = [_r(color="red", background="beach"), _r(color="red", background="snow")]
    b = [_r(color="red", background="snow"), _r(color="blue", background="beach")]
    assert P.prior_distance(a, b, factors=("color", "background")) == 0.25  # (0.5 + 0) / 2


def test_object_mask_is_where_the_background_is_covered(tmp_path):
    from dreambooth.data import read_photos

    for scene in W.sample_scenes(40, seed=5):
        mask = W.object_mask(scene)
        picture = W.render_array(scene)
        background = np.clip(W._background(scene.background, scene.variant, 64) + 0.5, 0, 255)
        assert (picture[~mask] == background.astype(np.uint8)[~mask]).all()  # outside: background only
        assert 0.01 < mask.mean() < 0.9
        assert W.mark_mask(scene, picture)[~mask].sum() == 0  # the mark lies inside it
    subject = W.held_out_subjects()[0]
    paths = subject.save_photos(tmp_path, 3, masks=True)
    photos = read_photos(tmp_path, resolution=64).photos
    for path, photo, (_, scene) in zip(paths, photos, subject.photos(3)):
        assert photo.path == path
        assert (np.asarray(photo.mask) > 127).tolist() == W.object_mask(scene).tolist()
