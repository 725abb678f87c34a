"""The output-weighted null-space reading (``weighting="outputs"``): each input row counts by how
much the UNet's output depends on that row's output."""

import pytest
import torch
from torch import nn

from research.null_space_outputs import nullspace_weighted as nullspace


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_add_moment_weighs_each_row():
    rows, w = randn(5, 3), torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0])
    moments = {}
    nullspace.add_moment(moments, "a", rows, w)
    nullspace.add_moment(moments, "a", rows)
    expected = sum(wi * torch.outer(r, r) for wi, r in zip(w, rows)) + rows.T @ rows
    assert torch.allclose(moments["a"].float(), expected, atol=1e-5)


@pytest.mark.parametrize("layer", [nn.Linear(5, 3), nn.Conv2d(2, 4, 3, stride=2, padding=1)], ids=["linear", "conv"])
def test_output_rows_follow_the_layer_inputs_order(layer):
    """Row i of ``layer_inputs`` makes output row i, and ``output_rows`` gives that row's gradient."""
    x = randn(2, 4, 5) if isinstance(layer, nn.Linear) else randn(2, 2, 6, 6)
    out = layer(x)
    g = randn(*out.shape, seed=3)
    out_rows = g.reshape(-1, 3) if isinstance(layer, nn.Linear) else g.permute(0, 2, 3, 1).reshape(-1, 4)
    weights = nullspace.output_rows(layer, g)
    assert len(weights) == len(nullspace.layer_inputs(layer, x))
    assert torch.allclose(weights, out_rows.pow(2).sum(1))


def test_output_weighting_reads_every_layer_and_leaves_the_unet_as_it_was():
    """The weighted reading back-propagates into the weights: every layer gets a basis, other bases
    than the plain reading's, and no gradient or requires_grad flag is left behind."""
    from dreambooth.models import build_tiny, concat_cond, encode_prompts

    base = build_tiny()
    base.unet.requires_grad_(False)
    latents = randn(8, 4, 8, 8)
    with torch.no_grad():
        conds = [encode_prompts(base, [p]) for p in ("a photo of a toy", "")]
    both = {w: nullspace.input_bases(base.unet, base.scheduler, latents, conds, 4, 400, 0.95, concat_cond,
                                     weighting=w) for w in ("inputs", "outputs")}
    assert both["inputs"].keys() == both["outputs"].keys()
    assert any(b.shape != both["inputs"][n].shape or not torch.allclose(b.abs(), both["inputs"][n].abs())
               for n, b in both["outputs"].items())
    assert all(not p.requires_grad and p.grad is None for p in base.unet.parameters())
