"""`dreambooth sample` and `dreambooth sweep` on tiny runs: prompts, PNG metadata, LoRA scale,
the scored sweep, its resume, and the settings it hands to `sample`."""

import json

import numpy as np
import pytest
from PIL import Image

from dreambooth.cli import main
from dreambooth.config import build_config
from dreambooth.sample import expand_prompt, generate
from dreambooth.sweep import Setting, grid, rank
from dreambooth.train import train
from painting import paint_subject


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DREAMBOOTH_CACHE", str(root / "cache"))
        yield make_runs(root)


def make_runs(root):
    photos = paint_subject(root / "photos", count=3)[0].parent
    common = [f"data.images={photos}", "data.class_noun=toy", "data.token=waj",
              "prior.num_images=4", "prior.steps=2", "train.steps=4", "sample.steps=3"]
    train(build_config("tiny", overrides=common), root / "full", progress=False)
    train(build_config("tiny", overrides=common + ["train.mode=lora", "train.lr=1e-2",
                                                   "lora.rank=4"]), root / "lora", progress=False)
    return root


@pytest.mark.parametrize("prompt, expected", [
    ("a photo of my toy on the beach", "a photo of waj toy on the beach"),
    ("My Toy in the snow", "waj toy in the snow"),
    ("a {token} {class} in the city", "a waj toy in the city"),
    ("a photo of a toy", "a photo of a toy"),  # a class prompt stays one
    ("my toys", "my toys"),  # whole words only
])
def test_prompt_expansion(prompt, expected):
    assert expand_prompt(prompt, "waj", "toy") == expected


def test_sample_writes_pngs_with_their_settings_and_a_sheet(runs, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", str(runs / "full"), "--prompt", "a photo of my toy", "--prompt",
                 "a {token} {class} in the snow", "--n", "2", "--seed", "5", "--steps", "2",
                 "--guidance", "4", "--out", str(out), "--no-progress"]) == 0
    pngs = sorted(out.glob("p*.png"))  # p00-seed5, p00-seed6, p01-seed5, p01-seed6
    assert len(pngs) == 4 and (out / "contact-sheet.png").is_file()
    meta = Image.open(pngs[1]).text
    assert meta["prompt"] == "a photo of waj toy" and meta["seed"] == "6"
    assert meta["steps"] == "2" and meta["guidance"] == "4.0" and meta["checkpoint"] == "final"
    assert "Steps: 2" in meta["parameters"] and "Seed: 6" in meta["parameters"]
    # the same seeds and settings give the same images as generate() on the run's model, batched
    # as the command batches them (one image alone can differ in the last bit of a pixel: the
    # batch's size changes the float rounding; measured once, 1 pixel of 4096 by 1 level)
    from dreambooth.checkpoint import load_run_model

    model, cfg = load_run_model(runs / "full")
    again = generate(model, ["a photo of waj toy"] * 2 + ["a waj toy in the snow"] * 2, [5, 6, 5, 6],
                     steps=2, guidance=4.0, resolution=cfg.data.resolution)
    for image, png in zip(again, pngs):
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(png).convert("RGB"))), png.name


def test_sample_reads_prompts_from_a_file_and_refuses_none(runs, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# my prompts\na photo of my toy\n\nmy toy on the beach\n")
    assert main(["sample", str(runs / "full"), "--prompts-file", str(f), "--n", "1",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert len(list((tmp_path / "o").glob("p*.png"))) == 2
    assert main(["sample", str(runs / "full")]) == 2


def test_lora_scale_zero_is_the_base_model(runs):
    from dreambooth.checkpoint import load_run_model
    from dreambooth.models import load_base_model

    tuned, cfg = load_run_model(runs / "lora")
    base = load_base_model("tiny")
    kw = dict(steps=2, guidance=3.0, resolution=64)
    off = generate(tuned, ["a photo of waj toy"], [0], lora_scale=0.0, **kw)[0]
    on = generate(tuned, ["a photo of waj toy"], [0], **kw)[0]
    ref = generate(base, ["a photo of waj toy"], [0], **kw)[0]
    diff = lambda a, b: np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()
    assert diff(off, ref) <= 1 and diff(on, ref) > 1


def test_grid_and_ranking():
    settings = grid([3, 7.5], [10, 20], ["dpmpp"], [0.5, 1.0])
    assert len(settings) == 8 and Setting(3.0, 10, "dpmpp", 0.5) in settings
    results = {Setting(3.0, 20, "dpmpp"): {"fidelity": 0.5, "prompt_fidelity": 0.5},
               Setting(7.5, 10, "dpmpp"): {"fidelity": 0.6, "prompt_fidelity": 0.4},
               Setting(5.0, 10, "dpmpp"): {"fidelity": 0.7, "prompt_fidelity": 0.5}}
    order = [s for s, _ in rank(results)]
    # scores 0.5, 0.5, 0.6: the tie goes to fewer steps
    assert order == [Setting(5.0, 10, "dpmpp"), Setting(7.5, 10, "dpmpp"), Setting(3.0, 20, "dpmpp")]


def test_sweep_ranks_saves_the_best_for_sample_and_resumes(runs, capsys):
    run = runs / "lora"
    args = ["sweep", str(run), "--dino", "tiny", "--clip", "tiny", "--set", "sweep.guidance=[2,6]",
            "--set", "sweep.steps=[2]", "--set", "sweep.scheduler=[dpmpp,ddim]",
            "--set", "sweep.lora_scale=[0.5,1.0]", "--set", "sweep.num_images=1", "--no-progress"]
    assert main(args) == 0
    results = json.loads((run / "sweep/results.json").read_text())
    assert results["settings"] == 8 and results["reused"] == 0  # 2 x 1 x 2 x 2 (LoRA scales)
    scores = [r["score"] for r in results["ranked"]]
    assert scores == sorted(scores, reverse=True)
    chosen = json.loads((run / "sample-settings.json").read_text())
    keys = ("guidance", "steps", "scheduler", "lora_scale")
    pick = {k: results["ranked"][0][k] for k in keys}
    held = results["held_out"]
    # the pick is adopted only when it also wins on the held-out prompts
    expected = pick if held["best"]["score"] >= held["default"]["score"] else results["default"]
    assert {k: chosen[k] for k in keys} == {k: expected[k] for k in keys}
    assert chosen["pick"] == pick
    assert {k: results["adopted"][k] for k in keys} == {k: chosen[k] for k in keys}  # recorded in both
    assert (run / "sweep/grid.png").is_file() and "| 1 |" in (run / "sweep/results.md").read_text()
    first = run / "sweep/samples" / Setting(2.0, 2, "dpmpp", 0.5).name / "p00-seed2000.png"
    stamp = first.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0  # resumed: nothing drawn again
    assert json.loads((run / "sweep/results.json").read_text())["reused"] == 8
    assert first.stat().st_mtime_ns == stamp
    assert main(["sample", str(run), "--prompt", "my toy", "--n", "1", "--no-progress"]) == 0
    assert "chosen by `dreambooth sweep`" in capsys.readouterr().out
    # other seeds would make the saved images answer another question: refused, nothing deleted
    assert main(args + ["--set", "sweep.num_images=2"]) == 2
    assert "num_images: 1 -> 2" in capsys.readouterr().err
    assert first.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("flag, value, message", [
    ("--guidance", "-2", "config key 'sample.guidance' must be at least 0"),
    ("--steps", "0", "config key 'sample.steps' must be at least 1"),  # no sentinel: unset is None
    ("--n", "0", "config key 'sample.num_images' must be at least 1"),
    ("--scheduler", "heun", "config key 'sample.scheduler' must be one of"),
    ("--lora-scale", "-3", "must be at least 0")])
def test_sample_refuses_settings_out_of_range_with_the_config_message(runs, tmp_path, capsys, flag, value, message):
    assert main(["sample", str(runs / "full"), "--prompt", "my toy", flag, value,
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}") and message in err and not (tmp_path / "o").exists()


def test_an_old_sweeps_subject_guidance_is_named_and_left_out(runs, tmp_path, capsys):
    """sample-settings.json from a sweep before subject guidance moved to research/: h = 0 is
    read silently, h > 0 with a one-line note; the rest of the pick is used."""
    import shutil

    run = tmp_path / "full"
    shutil.copytree(runs / "full", run)
    for h, noted in ((0.0, False), (2.5, True)):
        (run / "sample-settings.json").write_text(json.dumps(
            {"guidance": 6.0, "steps": 2, "scheduler": "ddim", "lora_scale": 1.0,
             "subject_guidance": h, "subject_below": 400}))
        assert main(["sample", str(run), "--prompt", "my toy", "--n", "1", "--out", str(tmp_path / f"o{h}"),
                     "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert ("moved to research/subject_guidance" in out) == noted
        meta = Image.open(tmp_path / f"o{h}" / "p00-seed0.png").text
        assert (meta["guidance"], meta["steps"], meta["scheduler"]) == ("6.0", "2", "ddim")
        assert "subject_guidance" not in meta


def test_demo_on_tiny_renders_the_world_subject_and_draws_samples(tmp_path, monkeypatch, capsys):
    """The demo has one photo path: the world's rendered subject, also on `tiny` (whose samples
    are noise and get no probe scores)."""
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--out", str(tmp_path / "d"), "--model", "tiny", "--steps", "2", "--quick",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "rendered 5 photos of a white striped kite" in out and "sampled 4 images" in out
    photos = tmp_path / "d/photos"
    assert len(list(photos.glob("photo-?.png"))) == 5 and len(list(photos.glob("photo-?.mask.png"))) == 5
    assert (tmp_path / "d/run/samples/final/grid.png").is_file()
    assert not (tmp_path / "d/run/world-scores.json").exists()
