"""The research scorers of the world (research/world/metrics.py, score.py): per-factor matches,
the TV report, the unpaired noise floor, diversity, and the base model's accuracy on named marks."""

import math

import pytest

from dreambooth.world import probe as P
from dreambooth.world import render as W
from research.world import metrics as M


def _r(shape="star", color="red", pattern="plain", mark="dot", background="beach", x=0.5, y=0.5, size=0.3):
    return dict(shape=shape, color=color, pattern=pattern, mark=mark, background=background, x=x, y=y, size=size)


def test_metrics_on_hand_made_readings():
    sub = W.Subject("star", "red", "plain", "dot")
    readings = [_r(), _r(mark="none"), _r(color="blue", background="snow"), _r(background="snow")]
    assert M.subject_fidelity(readings, sub) == 0.5
    assert M.factor_match(readings, sub) == {"shape": 1.0, "color": 0.75, "pattern": 1.0, "mark": 0.75}
    assert M.prompt_fidelity(readings, "beach") == 0.5
    assert M.prompt_fidelity(readings, ["beach", "snow", "snow", "snow"]) == 0.75
    dist = P.factor_distribution(readings, factors=("color", "background"))
    assert dist["color"]["red"] == 0.75 and dist["color"]["blue"] == 0.25 and dist["color"]["green"] == 0
    assert sum(dist["background"].values()) == 1 and dist["background"]["snow"] == 0.5
    joint = M.joint_distribution(readings, ("color", "background"))
    assert joint == {("red", "beach"): 0.5, ("blue", "snow"): 0.25, ("red", "snow"): 0.25}


def test_tv_distance_exact():
    assert P.tv_distance({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == 0
    assert P.tv_distance({"a": 1.0}, {"b": 1.0}) == 1
    assert P.tv_distance({"a": 0.5, "b": 0.5}, {"a": 0.25, "b": 0.25, "c": 0.5}) == pytest.approx(0.5)
    a = [_r(color="red", background="beach"), _r(color="red", background="snow")]
    b = [_r(color="red", background="snow"), _r(color="blue", background="beach")]
    rep = M.tv_report(a, b, factors=("color", "background"))
    assert rep["color"] == 0.5 and rep["background"] == 0 and rep["mean"] == 0.25
    assert rep["joint"] == pytest.approx(0.5)  # {rb .5, rs .5} vs {rs .5, bb .5}


def test_expected_floor_is_the_bias_of_two_independent_samples():
    one = [{"color": "red"}] * 10
    assert M.expected_floor(one, 50, factors=("color",)) == 0.0  # one value: no two samples differ
    half = [{"color": "red"}, {"color": "blue"}] * 50
    # n = 1: two draws differ half the time, and then their TV is 1
    assert abs(M.expected_floor(half, 1, factors=("color",), draws=20_000) - 0.5) < 0.02
    # large n, two values at 1/2: E|a - b| = sqrt(2 n p (1 - p)) sqrt(2 / pi), TV = that / n
    n = 400
    want = math.sqrt(2 * n * 0.25) * math.sqrt(2 / math.pi) / n
    got = M.expected_floor(half, n, factors=("color",), draws=20_000)
    assert abs(got - want) < 0.002, (got, want)
    # four times the samples: half the floor
    quarter = M.expected_floor(half, 4 * n, factors=("color",), draws=20_000)
    assert abs(quarter / got - 0.5) < 0.05


def test_diversity():
    same = [_r(), _r()]
    assert M.diversity(same) == {"pose": 0.0, "background": 0.0}
    spread = [_r(x=0.2, y=0.5, size=0.3, background="beach"), _r(x=0.8, y=0.5, size=0.3, background="snow"),
              _r(x=0.5, y=0.9, size=0.3, background="grass")]
    d = M.diversity(spread)
    assert d["pose"] == pytest.approx((0.6 + 0.5 + 0.5) / 3)
    assert d["background"] == pytest.approx(math.log(3) / math.log(6))
    scenes = W.sample_scenes(200, seed=3)
    assert 0.2 < M.diversity(scenes)["pose"] < 0.4  # Scenes work too; uniform poses ~0.29


def _scene_of(caption: str, draw_marks: bool = True) -> "W.Scene":
    """The scene a perfect model draws for a full caption (a stand-in for generation)."""
    words = caption.split()

    def pick(names, default=None):
        return next((w for w in words if w in names), default)

    mark = next((m for m, p in W.MARK_PHRASES.items() if p in caption), "none")
    background = next(b for b, p in W.BACKGROUND_PHRASES.items() if caption.endswith(p))
    return W.Scene(pick(W.SHAPES), pick(W.COLORS), pick(W.PATTERNS, "plain"),
                   mark if draw_marks else "none", background)


@pytest.mark.parametrize("draw_marks", [True, False])
def test_base_accuracy_counts_named_marks(draw_marks, monkeypatch):
    """base_accuracy(marks=True) names a mark (or none) in each caption and counts how often
    the named one is drawn: a model that draws every caption exactly scores ~1, one that never
    draws a mark scores ~0, and the captions without a mark never count as asked."""
    import dreambooth.sample
    from research.world.score import base_accuracy

    seen = []

    def fake_generate(model, prompts, seeds, **kw):
        seen.extend(prompts)
        return [W.render(_scene_of(p, draw_marks)) for p in prompts]

    monkeypatch.setattr(dreambooth.sample, "generate", fake_generate)
    acc = base_accuracy(None, n=40, marks=True)
    assert acc["named"] + acc["unnamed"] == 40 and acc["named"] == sum(" with " in p for p in seen)
    assert 20 < acc["named"] < 40  # four marks of five choices
    assert acc["shape"] >= 0.95 and acc["background"] >= 0.95 and acc["unasked_mark"] <= 0.05
    assert acc["mark"] >= 0.95 if draw_marks else acc["mark"] <= 0.05
    plain = base_accuracy(None, n=10)  # without marks: the base bar's captions, none named
    assert "mark" not in plain and not any(" with " in p for p in seen[-10:])
