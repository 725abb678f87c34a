"""prior.orthogonal_probes: the bases' math exactly, and a run whose UNet change stays off them."""

import pytest
import torch
from safetensors.torch import load_file

from dreambooth import orthogonal
from dreambooth.commands.demo import paint_subject
from dreambooth.config import build_config
from dreambooth.errors import ConfigError
from dreambooth.train import TrainingError, train


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_orthonormal_basis_spans_its_columns():
    cols = randn(50, 6)
    q = orthogonal.orthonormal_basis(cols)
    assert q.shape == (50, 6)
    assert torch.allclose(q.T @ q, torch.eye(6), atol=1e-5)
    assert torch.allclose(q @ (q.T @ cols), cols, atol=1e-5)


def test_project_off_removes_exactly_the_spanned_part():
    q = orthogonal.orthonormal_basis(randn(40, 5))
    outside = randn(40, seed=1) - q @ (q.T @ randn(40, seed=1))
    inside = q @ randn(5, seed=2)
    assert torch.allclose(orthogonal.project_off(inside + outside, q), outside, atol=1e-5)
    assert torch.allclose(orthogonal.project_off(outside, q), outside, atol=1e-6)
    assert orthogonal.project_off(inside, q).abs().max() < 1e-5


def test_a_tensor_no_larger_than_the_probes_is_held_whole():
    q = orthogonal.orthonormal_basis(randn(3, 8))
    assert q.shape == (3, 3)
    assert orthogonal.project_off(randn(3, seed=4), q).abs().max() < 1e-5


def test_hold_projects_each_tensor_in_place():
    base = [randn(4, 5), randn(7, seed=1)]
    bases = [orthogonal.orthonormal_basis(randn(20, 3, seed=2)), orthogonal.orthonormal_basis(randn(7, 9))]
    params = [b + randn(*b.shape, seed=5) for b in base]
    orthogonal.hold(params, base, bases)
    assert (bases[0].T @ (params[0] - base[0]).reshape(-1)).abs().max() < 1e-5
    assert torch.allclose(params[1], base[1], atol=1e-5)  # 7 weights, 9 probes: held whole


@pytest.fixture
def photos(tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    return paint_subject(tmp_path_factory.mktemp("photos"), count=3)[0].parent


def make_cfg(photos, *sets):
    return build_config("tiny", overrides=[
        f"data.images={photos}", "data.class_noun=toy", "data.token=waj", "prior.num_images=4",
        "prior.steps=2", "train.steps=5", "train.lr=1e-3", "train.checkpoint_every=5", *sets])


def unet_change(run_dir, base_unet):
    saved = load_file(str(run_dir / "checkpoints/step-000005/trainable.safetensors"))
    return [(saved[f"unet.{name}"] - p.detach()).reshape(-1) for name, p in base_unet.named_parameters()]


def test_the_run_s_change_stays_off_the_class_prompt_s_probes(photos, tmp_path):
    """The bases are recomputed here from the base model and the cached class images: the trained
    change has no component along them (tensors with no more weights than probes do not move),
    while the same run without the hold has a clear one."""
    from dreambooth.models import build_tiny, concat_cond, encode_prompts
    from dreambooth.prior import class_images, encode_images

    train(make_cfg(photos, "prior.orthogonal_probes=4"), tmp_path / "held", progress=False)
    train(make_cfg(photos), tmp_path / "free", progress=False)
    base = build_tiny()
    cfg = make_cfg(photos)
    prior_set = class_images(base, cfg, "a photo of a toy", progress=False)
    latents = encode_images(base, prior_set.paths, cfg.data.resolution, prior_set.folder)
    conds = [encode_prompts(base, [p]) for p in ("a photo of a toy", "")]
    bases = orthogonal.probe_bases(base.unet, base.scheduler, latents, conds, 4, 400, concat_cond)
    held, free = unet_change(tmp_path / "held", base.unet), unet_change(tmp_path / "free", base.unet)

    def along(changes):  # the change's norm along the bases, over its norm, all tensors together
        inside = sum(float((q.T @ d).pow(2).sum()) for q, d in zip(bases, changes))
        return (inside / sum(float(d.pow(2).sum()) for d in changes)) ** 0.5

    # held: 3e-4 here, the float32 rounding of base + change (the change is ~1e-3 of the weights);
    # free: 9e-2
    assert along(held) < 1e-3, along(held)
    assert along(free) > 3e-2, along(free)
    small = [d for d in held if d.numel() <= 4]
    assert small and all(d.abs().max() < 1e-6 for d in small)
    moved = sum(float(d.pow(2).sum()) for d in held) ** 0.5
    assert moved > 0.1 * sum(float(d.pow(2).sum()) for d in free) ** 0.5  # it still learns


def test_orthogonal_probes_need_full_fine_tuning_and_are_off_without_a_prior(photos, tmp_path, capsys):
    with pytest.raises(TrainingError, match="it needs train.mode=full"):
        train(make_cfg(photos, "prior.orthogonal_probes=4", "train.mode=lora"), tmp_path / "lora",
              progress=False)
    # a preset with the probes on still trains without a prior (the paper's failure, for comparison)
    train(make_cfg(photos, "prior.orthogonal_probes=4", "prior.enabled=false"), tmp_path / "none",
          progress=False)
    assert "prior.orthogonal_probes is off in this run" in capsys.readouterr().out
    assert "orthogonal_probes: 0" in (tmp_path / "none" / "config.yaml").read_text()


def test_probe_settings_out_of_range_are_refused_before_any_work(photos, tmp_path):
    with pytest.raises(ConfigError, match=r"'prior.orthogonal_min_t' must be less than 1000, got 1000"):
        make_cfg(photos, "prior.orthogonal_probes=4", "prior.orthogonal_min_t=1000")
    with pytest.raises(ConfigError, match="'prior.orthogonal_probes' must be at least 0, got -1"):
        make_cfg(photos, "prior.orthogonal_probes=-1")
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.rglob("*.png"))


def test_bases_larger_than_free_memory_are_refused_before_any_work(photos, tmp_path, monkeypatch):
    """A Stable Diffusion UNet at K=256 would need 880 GB: say so, with the fix, before class
    images are drawn."""
    monkeypatch.setattr(orthogonal, "free_bytes", lambda: 2**20)
    with pytest.raises(TrainingError, match=r"prior.orthogonal_probes=4 keeps 4 directions .* GiB free"):
        train(make_cfg(photos, "prior.orthogonal_probes=4"), tmp_path / "run", progress=False)
    cache = tmp_path / "cache"  # DREAMBOOTH_CACHE: where class images would have been drawn
    assert not cache.exists() or not any(cache.rglob("*.png"))
