"""The orthogonal-probe hold: the bases' math exactly, and a run whose UNet change stays off them."""

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.train import train
from research.orthogonal import orthogonal
from research.orthogonal.train_probes import train_with_probes

pytestmark = pytest.mark.usefixtures("isolated_cache")


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


import test_nullspace  # noqa: E402  (tests/: the same tiny run and photos fixture)

make_cfg, photos = test_nullspace.make_cfg, test_nullspace.photos


def unet_change(run_dir, base_unet):
    saved = load_file(str(run_dir / "checkpoints/step-000005/trainable.safetensors"))
    return [(saved[f"unet.{name}"] - p.detach()).reshape(-1) for name, p in base_unet.named_parameters()]


def test_the_run_s_change_stays_off_the_class_prompt_s_probes(photos, tmp_path):
    """The bases are recomputed here from the base model and the cached class images: the trained
    change has no component along them (tensors with no more weights than probes do not move),
    while the same run without the hold has a clear one."""
    from dreambooth.models import build_tiny, concat_cond, encode_prompts
    from dreambooth.prior import class_images, encode_images

    train_with_probes(make_cfg(photos), tmp_path / "held", probes=4)
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
