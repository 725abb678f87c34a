"""FLUX.1 and SD 3.x on their tiny in-process models: the family's conditioning and prediction
are the diffusers pipelines', its timesteps are the reference scripts' pick, and training keeps
every promise the UNet families keep (pinned losses, bit-exact resume, accumulation, lambda = 0,
masks, LoRA final/ that reloads to the same image)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreambooth import flow
from dreambooth.config import build_config
from dreambooth.family import family_of
from dreambooth.models import build_tiny
from dreambooth.train import train

pytestmark = pytest.mark.usefixtures("isolated_cache")
KINDS = ["tiny-flux1", "tiny-sd3"]
PROMPTS = ["a photo of waj toy", "a photo of a toy on the beach"]


def make_cfg(photos, model, *sets):
    return build_config(model, overrides=[
        f"data.images={photos}", "data.class_noun=toy", "data.token=waj", "prior.num_images=2",
        "prior.steps=2", "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5", *sets])


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run, step=4):
    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors"))


# ------------------------------------------------------------------ the family is the pipeline's math


@pytest.mark.parametrize("name", KINDS)
def test_conditioning_is_the_pipelines(name):
    model = build_tiny(name)
    family = family_of(model)
    with torch.no_grad():
        ours = family.encode_prompts(model, PROMPTS, "cpu")
        pipe = model.pipeline()
        if name == "tiny-flux1":
            embeds, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=model.t5_length)
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, device="cpu",
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=model.t5_length)
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled_projections"], pooled, rtol=0, atol=0)


@pytest.mark.parametrize("name", KINDS)
def test_prediction_is_one_pipeline_step(name):
    """From pure noise (σ = 1) one Euler step of the pipeline lands on x1 − v: the family's
    prediction v, with its packing, position ids and (FLUX.1 [dev]) guidance input."""
    model = build_tiny(name)
    family = family_of(model)
    family.settings.guidance = 3.5
    x1 = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = family.encode_prompts(model, PROMPTS[:1], "cpu")
        v = family.predict(model.transformer, x1, torch.tensor([1000.0]), cond)
        pipe = model.pipeline()
        pipe.set_progress_bar_config(disable=True)
        latents = flow.pack_latents(x1) if name == "tiny-flux1" else x1
        out = pipe(PROMPTS[:1], latents=latents, sigmas=[1.0], num_inference_steps=1, height=64, width=64,
                   guidance_scale=3.5 if name == "tiny-flux1" else 1.0, output_type="latent",
                   max_sequence_length=model.t5_length).images
    if name == "tiny-flux1":
        out = flow.unpack_latents(out, 8, 8)
    torch.testing.assert_close(out, x1 - v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, shift", [("tiny-flux1", 1.0), ("tiny-sd3", 3.0)])
def test_timesteps_are_the_reference_scripts_pick(name, shift):
    """FLUX.1 [dev]'s scheduler shifts dynamically, so the scripts train it on unshifted sigmas;
    SD 3.x's shifts by 3. Either way u is drawn, then indexes the scheduler's grid."""
    model = build_tiny(name)
    family = family_of(model)
    for seed in range(20):
        u = flow.sample_u(torch.Generator().manual_seed(seed), 1, "logit_normal")
        expected = flow.sigmas_from_u(u, *flow.train_schedule(1000, shift))[1]
        assert torch.equal(family.draw_timestep(torch.Generator().manual_seed(seed), model), expected)
    family.settings.resolution_shift = True  # FLUX.1's shift for the training resolution instead
    family._grid = None
    seq = (family.resolution // model.vae_scale_factor // 2) ** 2  # packed latent tokens
    for seed in range(20):
        u = flow.sample_u(torch.Generator().manual_seed(seed), 1, "logit_normal")
        sigma = flow.sigmas_from_u(u, *flow.train_schedule(1000, 1.0))[0]
        expected = flow.time_shift(flow.flux_mu(seq), sigma) * 1000
        assert torch.equal(family.draw_timestep(torch.Generator().manual_seed(seed), model), expected)
    x0, eps, t = torch.ones(1, 16, 8, 8), torch.zeros(1, 16, 8, 8), torch.tensor([250.0])
    noisy, target = family.noisy_and_target(model, x0, eps, t)
    assert torch.allclose(noisy, torch.full_like(x0, 0.75)) and torch.equal(target, -x0)


# ------------------------------------------------------------------ training


# per step: [loss, instance_loss, prior_loss]; recorded when the families were added
EXPECTED = {
    "tiny-flux1": [
        [2.8022184, 1.3893626, 1.4128559],
        [2.8264785, 1.4544322, 1.3720461],
        [2.7041430, 1.4581727, 1.2459702],
        [2.7893577, 1.3529346, 1.4364231],
    ],
    "tiny-sd3": [  # SD 3.5 medium's layout (q/k norms, dual attention in block 0)
        [3.5632882, 1.8204339, 1.7428544],
        [3.5742044, 1.8681533, 1.7060512],
        [3.4467654, 1.7795303, 1.6672350],
        [3.5177674, 1.8381860, 1.6795813],
    ],
}


@pytest.mark.parametrize("name", KINDS)
def test_losses_are_pinned(name, painted_photos, tmp_path):
    train(make_cfg(painted_photos, name, "train.lr=1e-3", "train.checkpoint_every=100"), tmp_path / "run",
          progress=False)
    logged = [[r["loss"], r["instance_loss"], r["prior_loss"]] for r in metrics(tmp_path / "run")]
    torch.testing.assert_close(torch.tensor(logged, dtype=torch.float64),
                               torch.tensor(EXPECTED[name], dtype=torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, sets", [
    ("tiny-flux1", ["train.mode=lora", "train.train_text_encoder=true"]),
    ("tiny-flux1", ["train.mode=full", "prior.target=base"]),
    ("tiny-sd3", ["train.mode=lora", "prior.target=base"]),
    ("tiny-sd3", ["train.mode=full", "train.train_text_encoder=true"]),
], ids=["flux1-lora+text-encoder", "flux1-full+base-target", "sd3-lora+base-target", "sd3-full+text-encoders"])
def test_resume_gives_identical_weights(painted_photos, tmp_path, name, sets):
    common = ["train.lr_scheduler=cosine", "train.warmup_steps=1", "train.lr=1e-3", *sets]
    train(make_cfg(painted_photos, name, *common), tmp_path / "straight", progress=False)
    assert train(make_cfg(painted_photos, name, *common), tmp_path / "split", progress=False,
                 stop_after=2).step == 2
    assert train(None, tmp_path / "split", resume=True, progress=False).step == 4
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(tmp_path / "straight")] == [m["loss"] for m in metrics(tmp_path / "split")]


SGD = ["train.adam_eps=1e3", "train.lr=1e3", "train.weight_decay=0", "train.steps=2", "train.mode=full"]


def test_accumulation_equals_a_bigger_batch_and_lambda_0_equals_no_prior(painted_photos, tmp_path):
    # SGD-like Adam (huge eps) so that float rounding between batch shapes is not amplified
    runs = {"big": ["train.batch_size=2"], "acc": ["train.batch_size=1", "train.grad_accum=2"],
            "none": ["prior.enabled=false"], "zero": ["prior.weight=0"]}
    for run, sets in runs.items():
        train(make_cfg(painted_photos, "tiny-flux1", *SGD, *sets), tmp_path / run, progress=False)
    got = {run: weights(tmp_path / run, 2) for run in runs}
    start = {f"transformer.{k}": v for k, v in build_tiny("tiny-flux1").transformer.state_dict().items()}
    moved = max((got["big"][k] - start[k]).abs().max().item() for k in got["big"])
    for a, b in (("big", "acc"), ("none", "zero")):
        diff = max((got[a][k] - got[b][k]).abs().max().item() for k in got[a])
        assert diff < 1e-5 and moved > 100 * diff, (a, b, diff, moved)


def test_masks_limit_the_instance_loss(painted_photos, tmp_path):
    from PIL import Image

    for photo in sorted(painted_photos.glob("*.png")):  # the left half of every photo
        mask = Image.new("L", Image.open(photo).size, 0)
        mask.paste(255, (0, 0, mask.width // 2, mask.height))
        mask.save(photo.with_name(photo.stem + ".mask.png"))
    train(make_cfg(painted_photos, "tiny-sd3", "train.steps=2"), tmp_path / "masked", progress=False)
    train(make_cfg(painted_photos, "tiny-sd3", "train.steps=2", "data.masks=false"), tmp_path / "plain",
          progress=False)
    masked, plain = metrics(tmp_path / "masked"), metrics(tmp_path / "plain")
    assert masked[0]["prior_loss"] == plain[0]["prior_loss"]  # the class half is never masked
    assert masked[0]["instance_loss"] != plain[0]["instance_loss"]


@pytest.mark.parametrize("name", KINDS)
def test_lora_final_reloads_to_the_same_image(painted_photos, tmp_path, name):
    from dreambooth.checkpoint import load_checkpoint_model
    from dreambooth.sample import generate

    train(make_cfg(painted_photos, name, "train.lr=1e-2", "train.train_text_encoder=true"), tmp_path / "run",
          progress=False)
    final, _, _ = load_checkpoint_model(tmp_path / "run", "final")
    last, _, _ = load_checkpoint_model(tmp_path / "run", "step-4")
    base = build_tiny(name)
    draw = [np.asarray(generate(m, PROMPTS[:1], [0], steps=2, guidance=3.0, resolution=64, scheduler="euler")[0],
                       dtype=np.int16) for m in (final, last, base)]
    assert np.abs(draw[0] - draw[1]).max() == 0  # final/ (diffusers LoRA names) is the last checkpoint
    assert np.abs(draw[0] - draw[2]).max() > 0  # and it learned something


# ------------------------------------------------------------------ exports


@pytest.fixture(scope="module")
def flow_runs(tmp_path_factory):
    """LoRA runs of both families, with CLIP text-encoder LoRA and without it."""
    from painting import paint_subject

    root = tmp_path_factory.mktemp("flow-runs")
    photos = paint_subject(root / "photos", count=3)[0].parent
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DREAMBOOTH_CACHE", str(root / "cache"))
        for name in KINDS:
            for te in ("true", "false"):
                train(make_cfg(photos, name, "train.steps=2", "train.lr=1e-2", f"train.train_text_encoder={te}"),
                      root / f"{name}-te-{te}", progress=False)
    return root


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("fmt, te", [("lora-diffusers", "true"), ("lora-kohya", "true"), ("merged", "true"),
                                     ("diffusers", "true"), ("single-file", "false")])
def test_every_export_reloads_to_the_same_image(flow_runs, tmp_path, name, fmt, te):
    """Each format read back as its consumer reads it draws the run model's image (the
    single file, FLUX.1's BFL or SD 3.5's SAI layout, holds the transformer alone)."""
    from dreambooth.export import export_run

    result = export_run(flow_runs / f"{name}-te-{te}", fmt, tmp_path / ("x.safetensors" if fmt in (
        "single-file", "lora-kohya") else "x"), log=lambda _: None)
    assert result.info["verified"] and result.info["max_pixel_diff"] <= 1, result.info


@pytest.mark.parametrize("name", KINDS)
def test_a_single_file_refuses_a_run_that_trained_its_text_encoders(flow_runs, tmp_path, name):
    from dreambooth.export import ExportError, export_run

    with pytest.raises(ExportError, match="holds the transformer alone.*--format diffusers"):
        export_run(flow_runs / f"{name}-te-true", "single-file", tmp_path / "x.safetensors", log=lambda _: None)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_run_is_sampled_with_the_t5_length_it_trained_on(painted_photos, tmp_path, mode):
    """flow.max_sequence_length shapes the conditioning: the loaded run (final/ and a checkpoint)
    keeps the run's length, not the model's default."""
    from dreambooth.checkpoint import load_checkpoint_model

    train(make_cfg(painted_photos, "tiny-flux1", f"train.mode={mode}", "flow.max_sequence_length=8"),
          tmp_path / "run", progress=False)
    for which in ("final", "step-4"):
        model, _, _ = load_checkpoint_model(tmp_path / "run", which)
        cond = family_of(model).encode_prompts(model, PROMPTS[:1], "cpu")
        assert model.t5_length == 8 and cond["encoder_hidden_states"].shape[1] == 8, which
