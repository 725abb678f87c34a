"""Evaluation during training, best-checkpoint selection in a real run, `eval`, `report` and
`bench`, on the tiny model with tiny random DINO/CLIP encoders."""

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from dreambooth import checkpoint as ckpt
from dreambooth.cli import main
from dreambooth.config import build_config
from dreambooth.errors import ConfigError
from dreambooth.train import train
from dreambooth.validation import Evaluator, eval_history
from painting import paint_subject

METRICS = ("dino", "clip_i", "clip_t", "pres", "div", "fidelity", "prompt_fidelity")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return paint_subject(tmp_path_factory.mktemp("photos"), count=3)[0].parent


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))


def make_cfg(photos, *sets):
    return build_config("tiny", overrides=[
        f"data.images={photos}", "data.class_noun=toy", "data.token=waj", "prior.num_images=4",
        "prior.steps=2", "train.steps=6", "train.checkpoint_every=100", "train.lr=3e-3",
        "eval.every=2", "eval.dino=tiny", "eval.clip=tiny", "eval.steps=3", "eval.num_images=2",
        "eval.class_images=2", "eval.prompts=[a photo of {token} {class}, a photo of {token} {class} in the snow]",
        *sets])


@pytest.fixture(scope="module")
def run(photos, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    result = train(make_cfg(photos), run_dir, progress=False)
    return run_dir, result


def test_evaluations_are_logged_with_real_scores_and_images(run):
    run_dir, result = run
    history = eval_history(run_dir / "metrics.jsonl")
    assert [e["step"] for e in history] == [0, 2, 4, 6]
    for e in history:
        for key in METRICS:
            assert isinstance(e[key], float) and -1.0 <= e[key] <= 2.0, (key, e)
        folder = run_dir / "samples" / e["name"]
        assert len(list(folder.glob("p0[01]-seed*.png"))) == 4  # 2 prompts x 2 seeds
        assert len(list(folder.glob("p02-seed1*.png"))) == 2  # the class prompt, seeds 10000+
        assert json.loads((folder / "scores.json").read_text())["dino"] == e["dino"]
    assert len({e["dino"] for e in history}) > 1, "training changed nothing the metric sees"


def test_final_holds_the_chosen_step_and_best_json_says_why(run):
    run_dir, result = run
    best = json.loads((run_dir / "best.json").read_text())
    assert best["step"] == result.best and best["final_is_best"]
    history = eval_history(run_dir / "metrics.jsonl")
    from dreambooth.selection import select_best

    assert select_best(history, 0.9).step == best["step"]
    assert "fidelity" in best["why"]
    final_unet = load_file(str(run_dir / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    if best["step"] < 6:  # final/ must be that checkpoint's weights, not the last step's
        chosen = load_file(str(run_dir / "checkpoints" / ckpt.step_dir_name(best["step"]) / "trainable.safetensors"))
        for k, v in chosen.items():
            assert torch.equal(final_unet[k.removeprefix("unet.")], v), k


def test_evaluation_is_deterministic(run, photos):
    run_dir, _ = run
    model, cfg, _ = ckpt.load_checkpoint_model(run_dir, "final")
    evaluator = Evaluator(cfg, run_dir)
    a, b = evaluator(model, "again-1"), evaluator(model, "again-2")
    assert all(a[k] == b[k] for k in METRICS)
    best = json.loads((run_dir / "best.json").read_text())
    logged = next(e for e in eval_history(run_dir / "metrics.jsonl") if e["step"] == best["step"])
    assert a["dino"] == pytest.approx(logged["dino"], abs=1e-5)  # final/ reproduces its scores


def test_resume_with_evaluation_gives_identical_weights(photos, tmp_path):
    straight = train(make_cfg(photos, "train.checkpoint_every=2"), tmp_path / "a", progress=False)
    train(make_cfg(photos, "train.checkpoint_every=2"), tmp_path / "b", progress=False, stop_after=3)
    resumed = train(None, tmp_path / "b", resume=True, progress=False)
    assert straight.best == resumed.best
    for name in ("unet/diffusion_pytorch_model.safetensors",):
        a, b = load_file(str(tmp_path / "a/final" / name)), load_file(str(tmp_path / "b/final" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = eval_history(tmp_path / "a/metrics.jsonl"), eval_history(tmp_path / "b/metrics.jsonl")
    assert [e["step"] for e in hb] == [0, 2, 4, 6]
    assert [e["dino"] for e in ha] == [e["dino"] for e in hb]


def test_early_stop_ends_training_and_keeps_a_final(photos, tmp_path):
    # flat=1.0: any fidelity counts as flat, so two falls of prompt fidelity in a row stop it.
    result = train(make_cfg(photos, "eval.early_stop=1", "eval.flat=1.0", "eval.every=1",
                            "train.steps=20"), tmp_path / "r", progress=False)
    history = eval_history(tmp_path / "r/metrics.jsonl")
    assert result.step < 20 and result.final is not None
    assert history[-1]["prompt_fidelity"] < history[-2]["prompt_fidelity"]
    assert json.loads((tmp_path / "r/best.json").read_text())["stopped_early"]


def test_evaluation_without_encoders_says_how_to_get_them(photos, tmp_path):
    cfg = make_cfg(photos, "eval.dino=", "eval.clip=")
    with pytest.raises(ConfigError, match="eval.dino and eval.clip"):
        train(cfg, tmp_path / "r", progress=False)


def test_eval_command_scores_a_checkpoint(run, capsys):
    run_dir, _ = run
    assert main(["eval", str(run_dir), "--checkpoint", "best", "--set", "eval.num_images=1"]) == 0
    rows = [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()]
    assert rows[-1]["checkpoint"] == "final" and isinstance(rows[-1]["clip_t"], float)
    assert "dino" in capsys.readouterr().out
    assert main(["eval", str(run_dir), "--checkpoint", "step-3"]) == 2  # no such checkpoint


CHECK = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.body.setAttribute('data-check', `images=${imgs.length} broken=${broken}`);
});</script>"""


def test_report_renders_in_headless_chromium_with_every_image(run, tmp_path):
    run_dir, _ = run
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert "step " + str(json.loads((run_dir / "best.json").read_text())["step"]) in page
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium package)")
    probe = tmp_path / "report-check.html"  # the report plus a script that counts broken images
    probe.write_text(page.replace("</body>", CHECK + "</body>"))
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-check="images=' in out, out[-2000:]
    counted = out.split('data-check="images=')[1].split('"')[0]
    images, broken = int(counted.split()[0]), int(counted.split("broken=")[1])
    assert broken == 0 and images == 2 + 4  # loss + metric curves, one grid per evaluation


def test_bench_runs_the_protocol_and_resumes(dreambench, tmp_path, capsys):
    args = ["bench", str(dreambench), "--model", "tiny", "--subjects", "2", "--prompts", "2",
            "--images", "2", "--out", str(tmp_path / "b"), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| backpack |" in out and "**mean**" in out and "CLIP-T" in out
    results = json.loads((tmp_path / "b/results.json").read_text())
    assert set(results["subjects"]) == {"backpack", "bear_plushie"}
    for scores in results["subjects"].values():
        assert scores["prompts"] == 2 and all(isinstance(scores[m], float) for m in METRICS[:5])
    images = tmp_path / "b/subjects/backpack/run/samples/bench"  # the evaluator's folder
    assert len(list(images.glob("p0[01]-seed*.png"))) == 4 and len(list(images.glob("p02-*.png"))) == 2
    assert main(args) == 0  # a second run reuses every subject
    assert capsys.readouterr().out.count("done earlier") == 2
