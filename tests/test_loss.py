"""The loss is pure math: every expectation here is computed by hand."""

import pytest
import torch

from dreambooth.loss import (dreambooth_loss, masked_mse, min_snr_weights, offset_noise,
                             per_sample_mse, snr, training_target, v_target)


def test_snr_from_alphas_cumprod():
    acp = torch.tensor([0.5, 0.8, 0.9])
    assert torch.allclose(snr(torch.tensor([0, 1, 2]), acp), torch.tensor([1.0, 4.0, 9.0]))


def test_v_target_by_hand():
    acp = torch.tensor([0.64])  # sqrt = 0.8, sqrt(1 - a) = 0.6
    x0, eps = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)
    v = v_target(x0, eps, torch.tensor([0]), acp)
    assert torch.allclose(v, torch.full_like(v, 0.8 * 2 - 0.6 * 1))
    assert training_target("epsilon", x0, eps, torch.tensor([0]), acp) is eps
    with pytest.raises(ValueError, match="prediction_type"):
        training_target("sample", x0, eps, torch.tensor([0]), acp)


def test_min_snr_weights_epsilon_and_v():
    s = torch.tensor([1.0, 4.0, 9.0])
    assert torch.allclose(min_snr_weights(s, 4.0, "epsilon"), torch.tensor([1.0, 1.0, 4 / 9]))
    assert torch.allclose(min_snr_weights(s, 4.0, "v_prediction"), torch.tensor([1 / 2, 4 / 5, 4 / 10]))


def _batch(values):
    """pred = 0, target rows filled so that row i has MSE values[i]."""
    target = torch.stack([torch.full((4, 2, 2), float(v) ** 0.5) for v in values])
    return torch.zeros_like(target), target


def test_per_sample_mse():
    pred, target = _batch([1, 3, 5, 7])
    assert torch.allclose(per_sample_mse(pred, target), torch.tensor([1.0, 3.0, 5.0, 7.0]))


def test_instance_plus_weighted_prior():
    pred, target = _batch([1, 3, 5, 7])
    parts = dreambooth_loss(pred, target, num_instance=2, prior_weight=0.5)
    assert parts.instance.item() == pytest.approx(2.0)
    assert parts.prior.item() == pytest.approx(6.0)
    assert parts.total.item() == pytest.approx(2.0 + 0.5 * 6.0)


def test_lambda_zero_is_instance_loss_exactly():
    pred, target = _batch([1, 3, 5, 7])
    parts = dreambooth_loss(pred, target, num_instance=2, prior_weight=0.0)
    assert torch.equal(parts.total, parts.instance)
    no_prior = dreambooth_loss(pred[:2], target[:2], num_instance=2)
    assert torch.equal(parts.total, no_prior.total)
    assert no_prior.prior.item() == 0.0


def test_weights_scale_each_sample():
    pred, target = _batch([1, 3, 5, 7])
    parts = dreambooth_loss(pred, target, 2, 1.0, weights=torch.tensor([1.0, 0.0, 0.5, 0.5]))
    assert parts.instance.item() == pytest.approx(0.5)
    assert parts.prior.item() == pytest.approx(3.0)


def test_offset_noise_adds_a_per_channel_constant():
    noise = torch.zeros(2, 4, 3, 3)
    assert offset_noise(noise, 0.0) is noise
    shifted = offset_noise(noise, 0.1, torch.Generator().manual_seed(0))
    flat = shifted.flatten(2)
    assert torch.allclose(flat, flat[..., :1].expand_as(flat))
    assert shifted.abs().max() > 0


def test_masked_mse_counts_only_the_masked_cells():
    pred = torch.zeros(2, 2, 2, 2)
    target = torch.zeros(2, 2, 2, 2)
    target[0, :, 0, 0] = 3.0  # masked in: squared error 9 in both channels
    target[0, :, 1, 1] = 5.0  # masked out
    target[1] = 2.0  # second sample: error 4 everywhere
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    # sample 0: (9 + 9) / (2 channels * 2 cells); sample 1: the plain MSE
    assert torch.allclose(masked_mse(pred, target, mask), torch.tensor([4.5, 4.0]))
    assert torch.equal(masked_mse(pred, target, torch.ones(2, 1, 2, 2)), per_sample_mse(pred, target))


def test_the_mask_reaches_the_instance_half():
    pred, target = _batch([1, 3, 5, 7])
    full = torch.ones(4, 1, *pred.shape[2:])
    assert torch.equal(dreambooth_loss(pred, target, 2, mask=full).total,
                       dreambooth_loss(pred, target, 2).total)
    off = full.clone()
    off[0, :, 0] = 0.0  # the first instance's top row does not count
    expected = masked_mse(pred[:1], target[:1], off[:1])
    parts = dreambooth_loss(pred, target, 2, mask=off)
    assert parts.instance.item() == pytest.approx((expected.item() + 3.0) / 2)
    assert parts.prior.item() == pytest.approx(6.0)
