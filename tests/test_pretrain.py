"""World-model pretraining: runs end to end at a toy size and resumes exactly after a kill."""

import json

import pytest
import torch

from dreambooth import checkpoint as ckpt
from dreambooth.world import pretrain as pt

SMALL = dict(vae_steps=4, vae_batch=2, decoder_steps=4, unet_steps=4, marks_steps=4, marks_pool=16,
             unet_batch=4, pool=16,
             checkpoint_every=2, text_hidden=32, unet_channels=(32, 32, 32), warmup=1, calibration=8)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """One finished toy pretraining, shared by the tests that read it (the first also re-runs it,
    which must leave it unchanged); each run costs seconds, and this file used to run it five times."""
    out = tmp_path_factory.mktemp("toy") / "w"
    pt.pretrain(out, pt.PretrainConfig(**SMALL))
    return out


def unet_weights(out, stage="marks"):
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(out / stage))["weights"]


def test_pretrain_writes_a_loadable_fp16_model(toy_run):
    from diffusers import StableDiffusionPipeline

    final = toy_run / "model"
    made = json.loads((toy_run / "made.json").read_text())
    assert made["vae_psnr_db"] > 0 and set(made["final_losses"]) == {"vae", "decoder", "unet", "marks"}
    from safetensors import safe_open

    with safe_open(str(final / "unet/diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor("conv_in.weight").dtype == torch.float16  # shipped in fp16
    pipe = StableDiffusionPipeline.from_pretrained(final, local_files_only=True)
    before = (final / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    assert pt.pretrain(toy_run, pt.PretrainConfig(**SMALL)) == final  # finished: re-exports, trains nothing
    assert (final / "unet/diffusion_pytorch_model.safetensors").read_bytes() == before
    assert pipe.tokenizer.model_max_length == 32
    assert pipe.vae.config.scaling_factor != 0.18215  # calibrated on the world's latents


def test_killed_pretraining_resumes_exactly(toy_run, tmp_path, monkeypatch):
    real_save = ckpt.save_checkpoint

    def save_then_die(run_dir, step, **kw):
        real_save(run_dir, step, **kw)
        if run_dir.name == "marks" and step == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pt.pretrain(tmp_path / "split", pt.PretrainConfig(**SMALL))
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    pt.pretrain(tmp_path / "split", pt.PretrainConfig(**SMALL))
    a, b = unet_weights(toy_run), unet_weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_load_partial_gives_the_checkpointed_weights(toy_run):
    model = pt.load_partial(toy_run)
    saved = unet_weights(toy_run)
    for k, v in model.unet.state_dict().items():
        assert torch.equal(v, saved[f"unet.{k}"]), k
    assert model.vae.config.scaling_factor != 0.18215


def test_decoder_stage_keeps_the_encoder_the_unet_learned_on(toy_run):
    vae_stage = ckpt.load_checkpoint(ckpt.latest_checkpoint(toy_run / "vae"))["weights"]
    model = pt.load_partial(toy_run)
    for k, v in model.vae.state_dict().items():
        if k.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(v, vae_stage[f"vae.{k}"]), k
    changed = [k for k, v in model.vae.decoder.state_dict().items()
               if not torch.equal(v, vae_stage[f"vae.decoder.{k}"])]
    assert changed, "the decoder stage trained nothing"


def test_marks_pool_weighs_the_cells_a_mark_covers():
    model = pt.architecture(pt.PretrainConfig(**SMALL))
    pool = pt.latent_pool(model, 6, 5, (0.45, 0.7), mark_rate=1.0, mark_named=1.0, mark_weight=10.0)
    w = pool["weights"]
    assert w.shape == (6, 1, 16, 16) and set(w.unique().tolist()) == {1.0, 10.0}
    marked = (w == 10).float().mean((1, 2, 3))
    assert (marked > 0.02).all() and (marked < 0.5).all()  # every mark, and only around it
    plain = pt.latent_pool(model, 6, 5, (0.45, 0.7))
    assert "weights" not in plain and torch.equal(plain["ids"], pt.latent_pool(model, 6, 5, (0.45, 0.7))["ids"])


def gradients(model, loss_fn, as_worker, monkeypatch):
    """The gradient of loss_fn() computed as worker (rank, world) would compute it."""
    monkeypatch.setattr(pt, "worker", lambda: as_worker)
    params = [p for m in (model.unet, model.text_encoder, model.vae) for p in m.parameters()]
    for p in params:
        p.grad = None
    loss = loss_fn()
    loss.backward()
    return loss.item(), [None if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("loss", ["denoising", "weighted", "vae"])
def test_worker_shares_sum_to_the_batch_loss_and_gradient(loss, monkeypatch):
    cfg = pt.PretrainConfig(**{**SMALL, "unet_batch": 5, "vae_batch": 3})  # uneven shares
    model = pt.architecture(cfg)
    pool = pt.latent_pool(model, 8, 1, (0.45, 0.7), mark_rate=1.0, mark_weight=10.0)
    if loss == "denoising":
        del pool["weights"]
    fn = {"vae": lambda: pt.reconstruction_loss(model.vae, cfg, 7, 0.5)}.get(
        loss, lambda: pt.denoising_loss(model, pool, cfg, 7))
    whole, grads = gradients(model, fn, (0, 1), monkeypatch)
    shares = [gradients(model, fn, (rank, 2), monkeypatch) for rank in (0, 1)]
    assert sum(s[0] for s in shares) == pytest.approx(whole, rel=1e-5)
    assert abs(shares[0][0] - shares[1][0]) > 1e-3 * whole  # the two shares are different rows
    scale = max(g.abs().max().item() for g in grads if g is not None)
    for g, g0, g1 in zip(grads, shares[0][1], shares[1][1]):
        if g is None:
            assert g0 is None and g1 is None
            continue
        assert torch.allclose(g0 + g1, g, rtol=1e-4, atol=1e-6 * scale)


def test_two_workers_pretrain_end_to_end(toy_run, tmp_path):
    """Two spawned processes: the pool is shared, every stage ends with both workers' weights
    equal (the stage checks it), and the run matches one process up to Adam-amplified rounding:
    Adam turns float-order differences in near-zero gradients into lr-sized steps."""
    pt.pretrain(tmp_path / "two", pt.PretrainConfig(**SMALL), workers=2)
    one = [json.loads(x) for x in (toy_run / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in one] == [(r["stage"], r["step"]) for r in two]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.02), (a, b)
    made = json.loads((tmp_path / "two/made.json").read_text())
    assert made["workers"] == 2 and set(made["stage_seconds"]) == {"vae", "decoder", "unet", "marks"}
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(tmp_path / "two/model", local_files_only=True)


def test_a_worker_renders_only_its_rows_of_the_batch():
    from dreambooth.world.render import sample_pretraining

    images, captions, scenes = sample_pretraining(7, 3, mark_rate=0.5, mark_named=0.5)
    part, part_captions, part_scenes = sample_pretraining(7, 3, mark_rate=0.5, mark_named=0.5,
                                                          rows=range(1, 7, 2))
    assert (part == images[1::2]).all() and part_captions == captions[1::2]
    assert part_scenes == scenes[1::2]


def test_a_folder_of_other_weight_shapes_is_refused_before_anything_loads(toy_run, tmp_path):
    """A pretraining folder from before a change of the defaults (the UNet's channels) cannot be
    resumed: the error names the setting and the fix instead of a size mismatch from torch. The
    VAE stages do not depend on the UNet, so their checkpoints alone do not stop a run."""
    import shutil

    from dreambooth.errors import DreamboothError

    out = tmp_path / "w"
    shutil.copytree(toy_run, out)
    wider = pt.PretrainConfig(**{**SMALL, "unet_channels": (32, 32, 64)})
    with pytest.raises(DreamboothError, match=r"unet_channels \(32, 32, 32\) there, \(32, 32, 64\) now"):
        pt.pretrain(out, wider)
    pt.check_resumable(out, pt.PretrainConfig(**SMALL))  # the same shapes: resumable
    for stage in ("unet", "marks", "model"):
        shutil.rmtree(out / stage)
    pt.check_resumable(out, wider)  # only the vae and decoder stages: resumable with any UNet


def test_a_resumed_stage_counts_its_time_from_its_last_logged_row(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert pt.seconds_logged(metrics, "marks", 750) == 0.0  # no log yet
    rows = [{"stage": "unet", "step": 750, "seconds": 900.0},
            {"stage": "marks", "step": 700, "seconds": 597.5},
            {"stage": "marks", "step": 750, "seconds": 634.7},
            {"stage": "marks", "step": 800, "seconds": 680.0}]  # logged after the checkpoint, before the kill
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert pt.seconds_logged(metrics, "marks", 750) == 634.7
    assert pt.seconds_logged(metrics, "marks", 720) == 597.5
    assert pt.seconds_logged(metrics, "decoder", 750) == 0.0
