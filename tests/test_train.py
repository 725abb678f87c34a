"""The training loop on the tiny model (64 px, 8x8 latents): behaviour, not just "it runs"."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dreambooth import checkpoint as ckpt
from dreambooth.checkpoint import load_run_model
from painting import paint_subject
from dreambooth.config import build_config
from dreambooth.errors import ConfigError, DreamboothError
from dreambooth.train import TrainingError, train


@pytest.fixture
def photos(tmp_path_factory):
    return paint_subject(tmp_path_factory.mktemp("photos"), count=3)[0].parent


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))


def make_cfg(photos, *sets, model="tiny"):
    return build_config("tiny", overrides=[
        f"data.images={photos}", "data.class_noun=toy", "data.token=waj", f"model.path={model}",
        "prior.num_images=4", "prior.steps=2", "train.steps=4", "train.checkpoint_every=2",
        "train.keep_checkpoints=5", *sets])


def weights_of(path):
    return load_file(str(path / "trainable.safetensors"))


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def fixed_loss(model, photos, prompt):
    """Noise-prediction loss on the subject's photos at fixed noise and timesteps."""
    from dreambooth.data import read_photos, square_crop, to_tensor
    from dreambooth.models import encode_prompts
    from dreambooth.models import encode_latents

    pixels = torch.stack([to_tensor(square_crop(p.image, 64)) for p in read_photos(photos, 64).photos])
    x0 = encode_latents(model, pixels)
    g = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        cond = encode_prompts(model, [prompt] * len(x0))
        for t in (100, 300, 500, 700):
            noise = torch.randn(x0.shape, generator=g)
            ts = torch.full((len(x0),), t)
            pred = model.unet(model.scheduler.add_noise(x0, noise, ts), ts, **cond).sample
            total += torch.mean((pred - noise) ** 2).item()
    return total / 4


def test_loss_decreases_on_the_subject(photos, tmp_path):
    from dreambooth.models import build_tiny

    cfg = make_cfg(photos, "train.steps=40", "train.checkpoint_every=100", "prior.enabled=false")
    before = fixed_loss(build_tiny(), photos, "a photo of waj toy")
    train(cfg, tmp_path / "run", progress=False)
    model, _ = load_run_model(tmp_path / "run")
    after = fixed_loss(model, photos, "a photo of waj toy")
    assert after < 0.8 * before, (before, after)
    logged = metrics(tmp_path / "run")
    assert [m["step"] for m in logged] == list(range(1, 41))
    assert set(logged[0]) == {"step", "loss", "instance_loss", "prior_loss", "lr", "seconds"}


def test_prior_half_is_weighted_by_lambda(photos, tmp_path):
    # Adam divides by sqrt(v): it would blow the 1e-7 rounding differences between a batch of 1
    # and a batch of 2 up to the size of a real update. A large eps makes it plain SGD (lr=eps).
    runs = {}
    for name, sets in {"none": ["prior.enabled=false"], "zero": ["prior.weight=0"],
                       "one": ["prior.weight=1"]}.items():
        train(make_cfg(photos, "train.steps=2", "train.adam_eps=1e3", "train.lr=1e3",
                       "train.weight_decay=0", *sets), tmp_path / name, progress=False)
        runs[name] = weights_of(tmp_path / name / "checkpoints" / "step-000002")
    diff = {pair: max((runs[pair[0]][k] - runs[pair[1]][k]).abs().max().item() for k in runs["one"])
            for pair in (("none", "zero"), ("zero", "one"))}
    assert diff["none", "zero"] < 1e-5, diff  # lambda = 0 trains as if there were no prior batch
    assert diff["zero", "one"] > 100 * max(diff["none", "zero"], 1e-7), diff
    one = metrics(tmp_path / "one")
    assert all(m["prior_loss"] > 0 for m in one)
    assert one[0]["loss"] == pytest.approx(one[0]["instance_loss"] + one[0]["prior_loss"], rel=1e-5)
    assert all(m["prior_loss"] == 0 for m in metrics(tmp_path / "none"))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_base_target_distils_the_frozen_base_model(photos, tmp_path, mode):
    # prior.target=base: the class half's target is the base model's own prediction, so before the
    # first update the prior loss is zero (full: a frozen copy; LoRA: adapters off, and
    # they start as zero). After an update it is not, and the paper's noise target never is.
    sets = [f"train.mode={mode}", "train.lr=1e-2", "train.steps=3", "train.train_text_encoder=true"]
    train(make_cfg(photos, *sets, "prior.target=base"), tmp_path / "base", progress=False)
    train(make_cfg(photos, *sets, "prior.target=noise"), tmp_path / "noise", progress=False)
    base, noise = metrics(tmp_path / "base"), metrics(tmp_path / "noise")
    assert base[0]["prior_loss"] < 1e-10  # not bit-exact: batched vs single prompt encoding
    assert all(m["prior_loss"] > 0 for m in base[1:]), base
    assert all(m["prior_loss"] > 0.05 for m in noise), noise
    assert base[0]["instance_loss"] == noise[0]["instance_loss"]


@pytest.mark.parametrize("sets", [
    ["train.mode=full"],
    ["train.mode=lora", "train.lr=1e-2"],
    ["train.mode=full", "train.train_text_encoder=true", "train.text_encoder_steps=3"],
    ["train.mode=lora", "train.lr=1e-2", "train.train_text_encoder=true"],
    ["train.mode=full", "prior.target=base", "train.train_text_encoder=true"],
    ["train.mode=lora", "train.lr=1e-2", "prior.target=base"],
    ["train.mode=full", "prior.null_space=0.99"],
], ids=["full", "lora", "full+text-encoder", "lora+text-encoder", "full+base-target", "lora+base-target",
        "full+null-space"])
def test_resume_gives_identical_weights(photos, tmp_path, sets):
    cfg = make_cfg(photos, "train.steps=4", "train.lr_scheduler=cosine", "train.warmup_steps=1", *sets)
    straight = train(cfg, tmp_path / "straight", progress=False)
    first = train(make_cfg(photos, "train.steps=4", "train.lr_scheduler=cosine",
                           "train.warmup_steps=1", *sets), tmp_path / "split", progress=False,
                  stop_after=2)
    assert first.final is None and first.step == 2
    resumed = train(None, tmp_path / "split", resume=True, progress=False)
    assert resumed.step == 4 and straight.step == 4
    assert_same(weights_of(tmp_path / "straight/checkpoints/step-000004"),
                weights_of(tmp_path / "split/checkpoints/step-000004"))
    assert [m["loss"] for m in metrics(tmp_path / "straight")] == \
        [m["loss"] for m in metrics(tmp_path / "split")]


def test_killed_checkpoint_write_keeps_the_previous_one(photos, tmp_path, monkeypatch):
    real_save = ckpt.save_file
    calls = {"n": 0}

    def dying_save(tensors, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # the second checkpoint's state.safetensors
            raise KeyboardInterrupt("killed while writing")
        return real_save(tensors, f, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(photos), tmp_path / "run", progress=False)
    monkeypatch.setattr(ckpt, "save_file", real_save)
    names = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert names == ["step-000002"]
    state = ckpt.load_checkpoint(tmp_path / "run/checkpoints/step-000002")
    assert state["state"]["step"] == 2 and state["weights"]
    result = train(None, tmp_path / "run", resume=True, progress=False)
    assert result.step == 4 and result.final.is_dir()


def test_full_final_is_a_diffusers_folder(photos, tmp_path):
    from diffusers import StableDiffusionPipeline

    train(make_cfg(photos, "train.steps=2"), tmp_path / "run", progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run/final", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of waj toy", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and 0 <= out.min() <= out.max() <= 1
    assert (tmp_path / "run/final/config.yaml").is_file()


def test_lora_final_loads_into_the_base_pipeline(photos, tmp_path):
    from dreambooth.models import build_tiny

    train(make_cfg(photos, "train.mode=lora", "train.lr=5e-2", "train.steps=3"), tmp_path / "run",
          progress=False)
    final = tmp_path / "run/final"
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    base = build_tiny().pipeline()
    base.set_progress_bar_config(disable=True)

    def draw():
        return base("a photo of waj toy", num_inference_steps=2, height=64, width=64,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images

    before = draw()
    base.load_lora_weights(str(final))
    assert not torch.allclose(torch.from_numpy(before), torch.from_numpy(draw()))


def test_v_prediction_and_sdxl_train(photos, tmp_path):
    r1 = train(make_cfg(photos, "train.steps=2", model="tiny-sd2"), tmp_path / "sd2", progress=False)
    assert load_run_model(tmp_path / "sd2")[0].prediction_type == "v_prediction"
    r2 = train(make_cfg(photos, "train.steps=2", "train.mode=lora", model="tiny-sdxl"),
               tmp_path / "sdxl", progress=False)
    for r in (r1, r2):
        assert r.final.is_dir() and all(torch.isfinite(torch.tensor(m["loss"]))
                                        for m in metrics(r.run_dir))


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(photos, tmp_path, monkeypatch):
    import dreambooth.train as train_module

    real = train_module.dreambooth_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        parts = real(*a, **k)
        if calls["n"] == 3:
            parts.total = parts.total * float("nan")
        return parts

    monkeypatch.setattr(train_module, "dreambooth_loss", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan at step 3.*step-000002"):
        train(make_cfg(photos), tmp_path / "run", progress=False)
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-000002"


def test_train_command_refuses_to_overwrite_and_leaves_photos_alone(photos, tmp_path, capsys):
    from dreambooth.cli import main

    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    args = ["train", "--images", str(photos), "--class", "toy", "--token", "waj", "--model", "tiny",
            "--preset", "tiny", "--set", "train.steps=2", "--set", "prior.num_images=2",
            "--set", "prior.steps=2", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before
    saved = build_config(config_file=str(tmp_path / "run/config.yaml"))
    assert saved.data.token == "waj" and saved.train.steps == 2


def test_bad_photos_fail_before_the_run_directory_holds_a_run(photos, tmp_path, capsys):
    """A wrong --images fails without writing config.yaml, so the same command, fixed, runs."""
    from dreambooth.cli import main

    args = ["train", "--class", "toy", "--token", "waj", "--preset", "tiny", "--set", "train.steps=1",
            "--set", "prior.num_images=2", "--set", "prior.steps=2", "--out", str(tmp_path / "run"),
            "--no-progress"]
    assert main(args + ["--images", str(tmp_path / "no-such-folder")]) == 2
    assert "photo folder not found" in capsys.readouterr().err
    assert not (tmp_path / "run/config.yaml").exists()
    assert main(args + ["--images", str(photos)]) == 0


def test_resume_before_the_first_checkpoint_starts_from_step_0(photos, tmp_path):
    """A run stopped before any checkpoint (killed while drawing class images, say) resumes by
    starting over from its config.yaml, and ends with the weights of a run never stopped."""
    sets = ("train.steps=2", "train.checkpoint_every=2")
    straight = train(make_cfg(photos, *sets), tmp_path / "straight", progress=False)
    stopped = train(make_cfg(photos, *sets), tmp_path / "split", progress=False, stop_after=0)
    assert stopped.step == 0 and stopped.final is None
    assert (tmp_path / "split/config.yaml").is_file() and not list((tmp_path / "split").glob("checkpoints/step-*"))
    resumed = train(None, tmp_path / "split", resume=True, progress=False)
    assert resumed.step == straight.step == 2 and resumed.final is not None
    assert_same(weights_of(tmp_path / "straight/checkpoints/step-000002"),
                weights_of(tmp_path / "split/checkpoints/step-000002"))


def test_only_the_newest_checkpoints_are_kept(photos, tmp_path):
    train(make_cfg(photos, "train.steps=6", "train.keep_checkpoints=2"), tmp_path / "run", progress=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-000004", "step-000006"]
    assert not list((tmp_path / "run/checkpoints").glob(".tmp-*"))


def test_gradient_accumulation_matches_a_bigger_batch(photos, tmp_path):
    # SGD-like Adam (huge eps) so that float rounding between batch shapes is not amplified.
    sgd = ["train.adam_eps=1e3", "train.lr=1e3", "train.weight_decay=0", "train.steps=2"]
    train(make_cfg(photos, *sgd, "train.batch_size=2"), tmp_path / "big", progress=False)
    train(make_cfg(photos, *sgd, "train.batch_size=1", "train.grad_accum=2"), tmp_path / "acc",
          progress=False)
    big = weights_of(tmp_path / "big/checkpoints/step-000002")
    acc = weights_of(tmp_path / "acc/checkpoints/step-000002")
    from dreambooth.models import build_tiny

    start = {f"unet.{k}": v for k, v in build_tiny().unet.state_dict().items()}
    moved = max((big[k] - start[k]).abs().max().item() for k in big)
    diff = max((big[k] - acc[k]).abs().max().item() for k in big)
    assert diff < 1e-5 and moved > 100 * diff, (diff, moved)


def test_trains_on_real_photos(dreambench, tmp_path):
    result = train(make_cfg(dreambench / "dog", "train.steps=2"), tmp_path / "run", progress=False)
    assert result.final.is_dir()
    assert len(metrics(tmp_path / "run")) == 2


def test_retired_keys_are_refused_on_the_command_line_and_dropped_from_old_runs(photos, tmp_path, capsys):
    """Keys that left the config (data.crop, research's) fail when set now, and an old run's
    config.yaml that holds them at their old "off" values still loads, with renamed keys mapped."""
    import yaml

    from dreambooth.config import load_config

    for key in ("data.crop=random", "train.timestep_bias=0.5", "prior.orthogonal_probes=4"):
        with pytest.raises(ConfigError, match=r"is not a config key any more: (ignored|.*research/)"):
            make_cfg(photos, key)
    old = make_cfg(photos).to_dict()
    old["data"]["crop"] = "center"
    old["prior"].update(solver="unipc", orthogonal_probes=0, orthogonal_min_t=300, null_space_weighting="inputs")
    old["prior"].pop("scheduler"), old["prior"].pop("null_space_min_t")
    old["train"].update(timestep_bias=0.0, timestep_bias_min=500)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = load_config(tmp_path / "config.yaml")
    assert cfg.prior.scheduler == "unipc" and cfg.prior.null_space_min_t == 300
    (tmp_path / "flat.yaml").write_text("prior.solver: ddim\nsweep.schedulers: [ddim]\n")
    flat = build_config(config_file=str(tmp_path / "flat.yaml"))
    assert flat.prior.scheduler == "ddim" and flat.sweep.scheduler == ["ddim"]
    assert capsys.readouterr().err == ""  # at their "off" values: dropped silently


def test_lora_with_text_encoder_trains_and_reloads_both(photos, tmp_path):
    """LoRA on the text encoder too: its adapters train, are saved in final/, and come back."""
    from dreambooth.models import build_tiny, encode_prompts

    train(make_cfg(photos, "train.mode=lora", "train.lr=5e-2", "train.steps=3",
                   "train.train_text_encoder=true"), tmp_path / "run", progress=False)
    saved = load_file(str(tmp_path / "run/final/pytorch_lora_weights.safetensors"))
    assert any(k.startswith("text_encoder.") for k in saved) and any(k.startswith("unet.") for k in saved)
    tuned, _ = load_run_model(tmp_path / "run")
    with torch.no_grad():
        a = encode_prompts(tuned, ["a photo of waj toy"])["encoder_hidden_states"]
        b = encode_prompts(build_tiny(), ["a photo of waj toy"])["encoder_hidden_states"]
    assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_sdxl_text_encoder_training_trains_both_encoders(photos, tmp_path, mode):
    """SDXL conditions on two text encoders: train.train_text_encoder trains both, final/ keeps
    both, and a kill + resume gives the same weights for each."""
    from dreambooth.models import build_tiny

    sets = ["train.train_text_encoder=true", "train.steps=2", "train.checkpoint_every=1",
            *(["train.lr=5e-2"] if mode == "lora" else ["train.lr=1e-3"]), f"train.mode={mode}"]
    straight = train(make_cfg(photos, *sets, model="tiny-sdxl"), tmp_path / "run", progress=False)
    saved = weights_of(tmp_path / "run/checkpoints/step-000002")
    for part in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(part) for k in saved), part
    if mode == "lora":
        lora = load_file(str(straight.final / "pytorch_lora_weights.safetensors"))
        assert any(k.startswith("text_encoder_2.") for k in lora)
    tuned, base = load_run_model(tmp_path / "run")[0], build_tiny("tiny-sdxl")
    ids = tuned.tokenizer_2(["a photo of waj toy"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = tuned.text_encoder_2(ids).text_embeds, base.text_encoder_2(ids).text_embeds
    assert not torch.allclose(a, b, atol=1e-4)  # the second encoder was trained and reloads so
    first = train(make_cfg(photos, *sets, model="tiny-sdxl"), tmp_path / "split", progress=False,
                  stop_after=1)
    assert first.final is None
    train(None, tmp_path / "split", resume=True, progress=False)
    assert_same(saved, weights_of(tmp_path / "split/checkpoints/step-000002"))


def test_train_token_moves_only_the_identifier_embedding(photos, tmp_path):
    """Pivotal tuning: the identifier's embedding row trains, every other text-encoder weight
    (other rows included) stays bit-identical, so prompts without the identifier are unchanged."""
    from dreambooth.models import build_tiny, encode_prompts

    train(make_cfg(photos, "train.train_token=true", "train.text_encoder_lr=5e-2", "train.steps=3"),
          tmp_path / "run", progress=False)
    tuned, _ = load_run_model(tmp_path / "run")
    base = build_tiny()
    ids = base.tokenizer("waj", add_special_tokens=False).input_ids
    before, after = base.text_encoder.state_dict(), tuned.text_encoder.state_dict()
    emb = "embeddings.token_embedding.weight"
    changed = (before[emb] != after[emb]).any(dim=1).nonzero().flatten().tolist()
    assert changed == ids
    assert all(torch.equal(before[k], after[k]) for k in before if k != emb)
    with torch.no_grad():
        same = [encode_prompts(m, ["a photo of a toy"])["encoder_hidden_states"] for m in (base, tuned)]
    assert torch.equal(*same)


def masked_copy(photos, folder, box):
    """The photos again, each with PHOTO.mask.png white inside ``box`` (left, top, right, bottom)."""
    import shutil

    from PIL import Image

    shutil.copytree(photos, folder)
    for p in sorted(folder.glob("photo-*.png")):
        mask = Image.new("L", Image.open(p).size, 0)
        mask.paste(255, box)
        mask.save(p.with_name(p.stem + ".mask.png"))
    return folder


def test_masks_limit_the_instance_loss_to_the_subject(photos, tmp_path):
    # A mask that covers everything is exactly the unmasked loss; a partial mask changes what is
    # learned; data.masks=false ignores the mask files.
    whole = masked_copy(photos, tmp_path / "whole", (0, 0, 128, 128))
    half = masked_copy(photos, tmp_path / "half", (0, 0, 64, 128))
    runs = {"plain": make_cfg(photos), "whole": make_cfg(whole), "half": make_cfg(half),
            "ignored": make_cfg(half, "data.masks=false")}
    for name, cfg in runs.items():
        train(cfg, tmp_path / "runs" / name, progress=False)
    tmp_path = tmp_path / "runs"
    last = "checkpoints/step-000004"
    assert_same(weights_of(tmp_path / "plain" / last), weights_of(tmp_path / "whole" / last))
    assert_same(weights_of(tmp_path / "plain" / last), weights_of(tmp_path / "ignored" / last))
    plain, half_m = metrics(tmp_path / "plain"), metrics(tmp_path / "half")
    assert plain[0]["prior_loss"] == half_m[0]["prior_loss"]  # the class half is never masked
    assert plain[0]["instance_loss"] != half_m[0]["instance_loss"]
    changed = weights_of(tmp_path / "half" / last)
    assert any(not torch.equal(v, changed[k]) for k, v in weights_of(tmp_path / "plain" / last).items())


def test_latent_masks_keep_any_covered_cell():
    from dreambooth.batch import latent_masks

    pixels = torch.zeros(1, 16, 16, dtype=torch.bool)
    pixels[0, 5, 9] = True  # one pixel in latent cell (1, 2) at factor 4
    cells = latent_masks(pixels, 4)
    assert cells.shape == (1, 1, 4, 4) and cells.sum() == 1 and cells[0, 0, 1, 2] == 1


def test_a_mask_cropped_away_is_refused(tmp_path):
    from PIL import Image

    folder = tmp_path / "wide"
    paint_subject(folder, count=3)
    Image.new("RGB", (256, 128), (90, 90, 90)).save(folder / "wide.png")
    mask = Image.new("L", (256, 128), 0)
    mask.paste(255, (0, 0, 40, 128))  # the center crop keeps x in [64, 192)
    mask.save(folder / "wide.mask.png")
    with pytest.raises(DreamboothError, match=r"wide\.png: its mask is empty after the center crop"):
        train(make_cfg(folder), tmp_path / "run", progress=False)


def test_metrics_log_reads_appends_and_trims_after_a_kill(tmp_path):
    from dreambooth.runlog import evaluations, log_metrics, read_metrics, trim_metrics

    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []  # no log yet
    for step in (10, 20, 30):
        log_metrics(path, {"step": step, "loss": step / 100})
    log_metrics(path, {"kind": "eval", "step": 20, "fidelity": 0.5})
    path.write_text(path.read_text() + "\n")  # a blank line (an editor's, or a torn write's) is no row
    assert [r["step"] for r in read_metrics(path)] == [10, 20, 30, 20]
    assert evaluations(read_metrics(path)) == [{"kind": "eval", "step": 20, "fidelity": 0.5}]
    trim_metrics(path, 20)  # the run was killed after its step-20 checkpoint
    assert read_metrics(path) == [{"step": 10, "loss": 0.1}, {"step": 20, "loss": 0.2},
                                  {"kind": "eval", "step": 20, "fidelity": 0.5}]


def test_offload_frozen_moves_the_frozen_parts_and_trains_the_same(photos, tmp_path, monkeypatch):
    """train.offload_frozen: the VAE and the text encoder leave the training device once their
    caches are made, and come back for evaluation and the final samples. On a CPU the move is to
    the same device, so the losses are those of a run without it; the moves are recorded."""
    import dreambooth.train as tr

    moves = []
    real_move = tr.move_frozen
    monkeypatch.setattr(tr, "move_frozen", lambda s, device: (moves.append(device.type), real_move(s, device)))
    plain = train(make_cfg(photos, "train.steps=3"), tmp_path / "plain", progress=False)
    moves.clear()
    off = train(make_cfg(photos, "train.steps=3", "train.offload_frozen=true", "eval.every=2",
                         "eval.metrics=clip", "eval.dino=tiny", "eval.clip=tiny", "eval.num_images=1",
                         "eval.class_images=1", "eval.steps=2"), tmp_path / "off", progress=False)
    assert [m["loss"] for m in metrics(tmp_path / "plain")] == \
        [m["loss"] for m in metrics(tmp_path / "off") if "loss" in m]
    assert plain.loss == off.loss
    # away once setup has cached the embeddings, back and away around each evaluation (steps 0, 2,
    # 3), back for final/ (all to "cpu" here)
    assert len(moves) == 2 + 1 + 2 + 2 + 1
