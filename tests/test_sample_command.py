"""`dreambooth sample` and `dreambooth sweep` on tiny runs: prompts, PNG metadata, LoRA scale,
the scored sweep, its resume, and the settings it hands to `sample`."""

import json

import numpy as np
import pytest
from PIL import Image

from dreambooth.cli import main
from dreambooth.commands.demo import paint_subject
from dreambooth.config import build_config
from dreambooth.sample import expand_prompt, generate
from dreambooth.sweep import Setting, grid, rank
from dreambooth.train import train


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
    pngs = sorted(out.glob("0*.png"))
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


def test_sample_subject_guidance_flag(runs, tmp_path):
    """--subject-guidance reaches generate (same images as generate with it) and the PNG text."""
    out = tmp_path / "g"
    assert main(["sample", str(runs / "full"), "--prompt", "a photo of my toy", "--n", "2", "--steps", "4",
                 "--subject-guidance", "30", "--out", str(out), "--no-progress"]) == 0
    pngs = sorted(out.glob("0*.png"))
    assert Image.open(pngs[0]).text["subject_guidance"] == "30.0"
    from dreambooth.checkpoint import load_run_model

    model, cfg = load_run_model(runs / "full")
    kw = dict(steps=4, guidance=cfg.sample.guidance, resolution=cfg.data.resolution)
    guided = generate(model, ["a photo of waj toy"] * 2, [0, 1], subject_guidance=30.0, token="waj",
                      class_noun="toy", **kw)
    for g, png in zip(guided, pngs):  # what the option does to images: test_sample.py
        assert np.array_equal(np.asarray(g), np.asarray(Image.open(png).convert("RGB")))


def test_sample_reads_prompts_from_a_file_and_refuses_none(runs, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# my prompts\na photo of my toy\n\nmy toy on the beach\n")
    assert main(["sample", str(runs / "full"), "--prompts-file", str(f), "--n", "1",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert len(list((tmp_path / "o").glob("0*.png"))) == 2
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
            "--set", "sweep.steps=[2]", "--set", "sweep.schedulers=[dpmpp,ddim]",
            "--set", "sweep.lora_scales=[0.5,1.0]", "--set", "sweep.num_images=1", "--no-progress"]
    assert main(args) == 0
    results = json.loads((run / "sweep/results.json").read_text())
    assert results["settings"] == 8 and results["reused"] == 0  # 2 x 1 x 2 x 2 (LoRA scales)
    scores = [r["score"] for r in results["ranked"]]
    assert scores == sorted(scores, reverse=True)
    chosen = json.loads((run / "sample-settings.json").read_text())
    keys = ("guidance", "steps", "scheduler", "lora_scale", "subject_guidance", "subject_below")
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


def test_grid_with_subject_guidance_names_ranks_and_tables():
    from dreambooth.sweep import table

    settings = grid([5.0], [10], ["dpmpp"], subject_guidance=[0, 2.5], subject_below=300)
    off, on = settings
    assert (off.subject_guidance, on.subject_guidance, on.subject_below) == (0.0, 2.5, 300)
    assert off.name == "g5-s10-dpmpp-l1"  # the name sweeps always had: old sweep folders resume
    assert on.name == "g5-s10-dpmpp-l1-h2.5-w300"
    assert on.kwargs()["subject_guidance"] == 2.5 and on.kwargs()["subject_below"] == 300
    tie = {on: {"fidelity": 0.5, "prompt_fidelity": 0.5}, off: {"fidelity": 0.6, "prompt_fidelity": 0.4}}
    assert [s for s, _ in rank(tie)] == [off, on]  # a tie goes to the cheaper setting (no third pass)
    md = table(rank(tie))
    assert "subject guidance" in md.splitlines()[0] and "2.5 (t < 300)" in md
    assert len({line.count("|") for line in md.splitlines()}) == 1  # every row has every column
    assert "subject guidance" not in table(rank({off: tie[off]}))  # not searched: no column


def test_sweep_searches_subject_guidance_and_sample_uses_the_pick(runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "full"
    shutil.copytree(runs / "full", run)  # the sweep writes sample-settings.json into the run
    args = ["sweep", str(run), "--dino", "tiny", "--clip", "tiny", "--set", "sweep.guidance=[4]",
            "--set", "sweep.steps=[3]", "--set", "sweep.schedulers=[dpmpp]",
            "--set", "sweep.subject_guidance=[0,30]", "--set", "sample.subject_guidance_below=1000",
            "--set", "sweep.num_images=1", "--no-progress"]
    assert main(args) == 0
    results = json.loads((run / "sweep/results.json").read_text())
    assert results["settings"] == 2 and {r["subject_guidance"] for r in results["ranked"]} == {0.0, 30.0}
    on = Setting(4.0, 3, "dpmpp", 1.0, 30.0, 1000)
    drawn = run / "sweep/samples" / on.name / "p00-seed2000.png"
    from dreambooth.checkpoint import load_run_model

    model, cfg = load_run_model(run)
    prompts = [expand_prompt(p, "waj", "toy") for p in cfg.sweep.prompts]
    expected = generate(model, prompts, [2000] * len(prompts), steps=3, guidance=4.0,  # batched as the sweep
                        resolution=cfg.data.resolution, batch_size=max(1, cfg.prior.batch_size),
                        subject_guidance=30.0, subject_below=1000, token="waj", class_noun="toy")[0]
    assert np.array_equal(np.asarray(Image.open(drawn).convert("RGB")), np.asarray(expected))
    off = run / "sweep/samples" / Setting(4.0, 3, "dpmpp", 1.0, 0.0, 1000).name / "p00-seed2000.png"
    assert not np.array_equal(np.asarray(Image.open(off)), np.asarray(Image.open(drawn)))
    chosen = json.loads((run / "sample-settings.json").read_text())
    assert chosen["subject_guidance"] in (0.0, 30.0) and chosen["subject_below"] == 1000
    capsys.readouterr()
    out = tmp_path / "s"
    assert main(["sample", str(run), "--prompt", "my toy", "--n", "1", "--out", str(out), "--no-progress"]) == 0
    meta = Image.open(next(out.glob("0*.png"))).text
    assert float(meta["subject_guidance"]) == chosen["subject_guidance"]
    assert int(meta["subject_below"]) == chosen["subject_below"]


@pytest.mark.parametrize("flag, value", [("--guidance", "-2"), ("--subject-guidance", "-0.5"),
                                         ("--lora-scale", "-3"), ("--steps", "-1")])
def test_sample_refuses_negative_settings(runs, tmp_path, capsys, flag, value):
    assert main(["sample", str(runs / "full"), "--prompt", "my toy", flag, value,
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert flag in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_sweep_refuses_subject_guidance_on_sdxl_before_drawing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    photos = paint_subject(tmp_path / "photos", count=3)[0].parent
    train(build_config("tiny", overrides=[f"data.images={photos}", "data.class_noun=toy", "data.token=waj",
                                          "model.path=tiny-sdxl", "train.mode=lora", "train.steps=1",
                                          "prior.num_images=2", "prior.steps=2"]), tmp_path / "run", progress=False)
    assert main(["sweep", str(tmp_path / "run"), "--dino", "tiny", "--clip", "tiny",
                 "--set", "sweep.subject_guidance=[0,2.5]", "--no-progress"]) == 2
    assert "sweep.subject_guidance is for SD 1.x/2.x" in capsys.readouterr().err
    assert not (tmp_path / "run/sweep/samples").exists()
