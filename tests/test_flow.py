"""Flow-matching math: hand-computed values, and equality with diffusers' own training utilities,
scheduler and FLUX.1 pipeline helpers where diffusers has them."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from dreambooth.flow import (flow_target, flux_mu, guidance_vector, latent_image_ids, loss_weights,
                             mode_map, noised, pack_latents, sample_u, script_scheme, shift_sigmas,
                             sigmas_from_u, time_shift, train_schedule, unpack_latents,
                             x0_from_velocity)
from dreambooth.loss import dreambooth_loss


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --- noising and target ------------------------------------------------------------------------

def test_noised_and_target_by_hand():
    x0 = torch.tensor([[[[1.0, 2.0]]], [[[4.0, -2.0]]]])  # (2, 1, 1, 2)
    eps = torch.tensor([[[[3.0, 0.0]]], [[[0.0, 2.0]]]])
    x = noised(x0, eps, torch.tensor([0.25, 0.5]))
    assert torch.equal(x, torch.tensor([[[[1.5, 1.5]]], [[[2.0, 0.0]]]]))  # 0.75·x0 + 0.25·ε; halves
    assert torch.equal(noised(x0, eps, torch.tensor([0.0, 1.0])), torch.stack([x0[0], eps[1]]))
    assert torch.equal(flow_target(x0, eps), torch.tensor([[[[2.0, -2.0]]], [[[-4.0, 4.0]]]]))
    # sigmas shaped (B, 1, 1, 1), as the scripts' get_sigmas returns them, give the same
    assert torch.equal(noised(x0, eps, torch.tensor([0.25, 0.5]).view(2, 1, 1, 1)), x)


def test_target_is_the_velocity_and_x0_comes_back():
    x0, eps = torch.randn(3, 4, 2, 2, generator=_gen(0)), torch.randn(3, 4, 2, 2, generator=_gen(1))
    s, ds = torch.tensor([0.2, 0.5, 0.9]), 1e-3
    velocity = (noised(x0, eps, s + ds) - noised(x0, eps, s)) / ds
    assert torch.allclose(velocity, flow_target(x0, eps), atol=1e-2)
    x = noised(x0, eps, s)
    assert torch.allclose(x0_from_velocity(x, flow_target(x0, eps), s), x0, atol=1e-6)


def test_preconditioned_x0_loss_is_the_velocity_loss_times_sigma_squared():
    """train_dreambooth_lora_sd3.py --precondition_outputs 1 (its default): x̂₀ = x_σ − σ v̂ against x₀."""
    x0, eps = torch.randn(2, 4, 2, 2, generator=_gen(2)), torch.randn(2, 4, 2, 2, generator=_gen(3))
    pred, s = torch.randn(2, 4, 2, 2, generator=_gen(4)), torch.tensor([0.3, 0.8])
    x = noised(x0, eps, s)
    script = ((x0_from_velocity(x, pred, s) - x0) ** 2).flatten(1).mean(1)
    ours = s ** 2 * ((pred - flow_target(x0, eps)) ** 2).flatten(1).mean(1)
    assert torch.allclose(script, ours, atol=1e-6)


# --- timestep sampling -------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_sample_u_equals_diffusers_with_equal_seeds(scheme):
    for seed in (0, 7):
        torch.manual_seed(seed)
        ref = compute_density_for_timestep_sampling(scheme if scheme != "uniform" else "none", 64,
                                                    logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
        ours = sample_u(_gen(seed), 64, scheme, logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
        assert torch.equal(ours, ref)
        ref_gen = compute_density_for_timestep_sampling(scheme, 64, 0.3, 1.2, 1.29, generator=_gen(seed))
        assert torch.equal(ours, ref_gen)
    assert not torch.equal(sample_u(_gen(0), 64, scheme), sample_u(_gen(1), 64, scheme))


def test_logit_normal_is_sigmoid_of_mean_plus_std_normal():
    z = torch.randn(32, generator=_gen(5))
    assert torch.allclose(sample_u(_gen(5), 32, "logit_normal", 0.5, 2.0), torch.sigmoid(0.5 + 2.0 * z))


def test_logit_normal_distribution():
    u = sample_u(_gen(0), 20000, "logit_normal", logit_mean=0.5, logit_std=1.0)
    assert u.min() > 0 and u.max() < 1
    assert u.median().item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.01)  # sigmoid(0.5) = 0.6225
    logit = torch.log(u / (1 - u))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.03)
    assert logit.std().item() == pytest.approx(1.0, abs=0.03)
    # density 1/(s√2π) · 1/(t(1−t)) · exp(−(logit t − m)²/2s²): P(u < ½) = Φ(−0.5) = 0.3085
    assert (u < 0.5).float().mean().item() == pytest.approx(0.3085, abs=0.015)


def test_mode_map_by_hand():
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    # f(¼) = ¾ − 1.29 (cos²(π/8) − ¾) = 0.75 − 1.29 · 0.1035534 = 0.6164161
    assert torch.allclose(mode_map(u, 1.29), torch.tensor([1.0, 0.6164161, 0.5, 0.3835839, 0.0]), atol=1e-6)
    assert torch.allclose(mode_map(u, 0.0), 1 - u)  # scale 0 is uniform, reversed
    v = sample_u(_gen(0), 20000, "mode", mode_scale=1.29)
    assert v.min() >= 0 and v.max() <= 1
    assert v.mean().item() == pytest.approx(0.5, abs=0.01)
    # P(f(U) ∈ [¼, ¾]) = P(U ∈ [f⁻¹(¾), f⁻¹(¼)]) > ½: mode sampling favours the middle
    assert ((v > 0.25) & (v < 0.75)).float().mean().item() > 0.6


def test_sample_u_rejects_unknown_scheme():
    with pytest.raises(ValueError, match="timestep sampling"):
        sample_u(_gen(0), 4, "cosmap")


# --- shifts ------------------------------------------------------------------------------------

def test_shift_sigmas_by_hand():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_sigmas(s, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))  # 0.75/1.5, 1.5/2
    assert torch.equal(shift_sigmas(s, 1.0), s)


def test_flux_mu_by_hand_and_diffusers():
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(1024) == pytest.approx(0.63)  # 0.5 + 0.65 · 768 / 3840: 512 px
    for n in (64, 256, 1024, 3600, 4096, 6000):
        assert flux_mu(n) == pytest.approx(calculate_shift(n))


def test_time_shift_by_hand():
    s = torch.tensor([0.25, 0.5, 1.0, 0.0])
    # e^μ = 3: 3/(3 + 3), 3/(3 + 1), 3/(3 + 0), 3/(3 + ∞)
    assert torch.allclose(time_shift(math.log(3), s), torch.tensor([0.5, 0.75, 1.0, 0.0]))
    assert time_shift(math.log(3), s[:1], power=2.0).item() == pytest.approx(0.25)  # 3/(3 + 9)
    assert torch.allclose(time_shift(1.15, s), shift_sigmas(s, math.exp(1.15)))


def test_time_shift_equals_flux_scheduler():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    base = torch.linspace(1.0, 1 / 28, 28)  # FluxPipeline's sigmas for 28 steps
    mu = flux_mu(4096)
    sched.set_timesteps(sigmas=base.numpy(), mu=mu)
    assert torch.allclose(sched.sigmas[:-1], time_shift(mu, base), atol=1e-6)
    assert torch.allclose(sched.time_shift(mu, 1.0, base), time_shift(mu, base))


def test_static_shift_equals_sd3_scheduler():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 0.02, 50).numpy())
    assert torch.allclose(sched.sigmas[:-1], shift_sigmas(torch.linspace(1.0, 0.02, 50), 3.0), atol=1e-6)


# --- training sigmas and timesteps ------------------------------------------------------------

@pytest.mark.parametrize("kwargs,shift", [({"shift": 3.0}, 3.0), ({}, 1.0),
                                          ({"shift": 3.0, "use_dynamic_shifting": True}, 1.0)])
def test_train_schedule_equals_the_scheduler_grid(kwargs, shift):
    """SD3 / 3.5 (shift 3), FLUX.1 [schnell] (shift 1) and FLUX.1 [dev] (dynamic: no shift in training)."""
    sched = FlowMatchEulerDiscreteScheduler(**kwargs)
    sigmas, timesteps = train_schedule(1000, shift)
    assert torch.equal(sigmas, sched.sigmas) and torch.equal(timesteps, sched.timesteps)


def test_train_schedule_by_hand():
    sigmas, timesteps = train_schedule(4, 3.0)  # σ = 1, ¾, ½, ¼ shifted by 3
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.9, 0.75, 0.5]))  # 2.25/2.5, 1.5/2, 0.75/1.5
    assert torch.allclose(timesteps, torch.tensor([4.0, 3.6, 3.0, 2.0]))


def test_sigmas_from_u_by_hand():
    sigmas, timesteps = sigmas_from_u(torch.tensor([0.0, 0.3, 0.5, 0.999, 1.0]), *train_schedule(4, 1.0))
    # indices (4u).long() = 0, 1, 2, 3, 4 → clamped to 3
    assert torch.equal(sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.25]))
    assert torch.equal(timesteps, torch.tensor([4.0, 3.0, 2.0, 1.0, 1.0]))


def test_sigmas_from_u_equals_the_reference_scripts():
    """train_dreambooth_lora_{flux,sd3}.py: indices = (u · T).long(); timesteps = sched.timesteps[indices];
    sigmas = get_sigmas(timesteps) (looked up in sched.sigmas by timestep)."""
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    torch.manual_seed(3)
    u = compute_density_for_timestep_sampling("logit_normal", 16, 0.0, 1.0, 1.29)
    indices = (u * sched.config.num_train_timesteps).long()
    timesteps = sched.timesteps[indices]
    step_indices = [(sched.timesteps == t).nonzero().item() for t in timesteps]
    script_sigmas = sched.sigmas[step_indices].flatten()
    sigmas, ours_t = sigmas_from_u(u, sched.sigmas, sched.timesteps)
    assert torch.equal(ours_t, timesteps) and torch.equal(sigmas, script_sigmas)
    assert torch.equal(sigmas_from_u(u, *train_schedule(1000, 3.0))[0], script_sigmas)


# --- loss weighting ----------------------------------------------------------------------------

def test_loss_weights_by_hand():
    s = torch.tensor([0.5, 0.25, 1.0])
    assert torch.equal(loss_weights("none", s), torch.ones(3))
    assert torch.equal(loss_weights("sigma_sqrt", s), torch.tensor([4.0, 16.0, 1.0]))
    # 2 / (π (1 − 2σ + 2σ²)): σ = ½ → 4/π; σ = ¼ → 2/(π · 0.625) = 3.2/π; σ = 1 → 2/π
    assert torch.allclose(loss_weights("cosmap", s), torch.tensor([4.0, 3.2, 2.0]) / math.pi)
    with pytest.raises(ValueError, match="loss weighting"):
        loss_weights("logit_normal", s)


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_equal_diffusers(scheme):
    s = sample_u(_gen(1), 32, "uniform").clamp_min(1e-3).view(-1, 1, 1, 1)
    assert torch.equal(loss_weights(scheme, s), compute_loss_weighting_for_sd3(scheme, s))


def test_script_scheme():
    assert script_scheme("logit_normal") == ("logit_normal", "none")
    assert script_scheme("mode") == ("mode", "none")
    assert script_scheme("cosmap") == ("uniform", "cosmap")
    assert script_scheme("sigma_sqrt") == ("uniform", "sigma_sqrt")
    assert script_scheme("none") == ("uniform", "none")
    with pytest.raises(ValueError):
        script_scheme("uniform")


def test_a_training_step_equals_the_reference_script_loss():
    """noised + target + weights through dreambooth_loss = the script's loss with prior preservation."""
    x0, eps = torch.randn(4, 4, 2, 2, generator=_gen(6)), torch.randn(4, 4, 2, 2, generator=_gen(7))
    pred = torch.randn(4, 4, 2, 2, generator=_gen(8))
    sigmas, _ = sigmas_from_u(sample_u(_gen(9), 4, "uniform"), *train_schedule(1000, 3.0))
    w, target = loss_weights("cosmap", sigmas), flow_target(x0, eps)
    ours = dreambooth_loss(pred, target, num_instance=2, prior_weight=0.5, weights=w).total
    wb = w.view(-1, 1, 1, 1)
    inst = (wb[:2] * (pred[:2] - target[:2]) ** 2).reshape(2, -1).mean(1).mean()
    prior = (wb[2:] * (pred[2:] - target[2:]) ** 2).reshape(2, -1).mean(1).mean()
    assert ours.item() == pytest.approx((inst + 0.5 * prior).item(), rel=1e-6)


# --- FLUX.1 packing, position ids, guidance ---------------------------------------------------

def test_pack_latents_by_hand():
    x = torch.arange(16.0).view(1, 2, 2, 4)  # channel 0: [[0 1 2 3] [4 5 6 7]], channel 1: + 8
    packed = pack_latents(x)
    assert packed.shape == (1, 2, 8)
    assert torch.equal(packed[0], torch.tensor([[0.0, 1, 4, 5, 8, 9, 12, 13],
                                                [2.0, 3, 6, 7, 10, 11, 14, 15]]))
    assert torch.equal(unpack_latents(packed, 2, 4), x)


def test_pack_round_trip_and_diffusers():
    x = torch.randn(2, 16, 6, 8, generator=_gen(0))
    packed = pack_latents(x)
    assert packed.shape == (2, 12, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), x)
    assert torch.equal(unpack_latents(packed, 6, 8), FluxPipeline._unpack_latents(packed, 48, 64, 8))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 4, 3, 4))


def test_latent_image_ids_by_hand_and_diffusers():
    ids = latent_image_ids(4, 6)
    assert torch.equal(ids, torch.tensor([[0.0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]))
    ref = FluxPipeline._prepare_latent_image_ids(2, 64 // 2, 48 // 2, "cpu", torch.bfloat16)
    assert torch.equal(latent_image_ids(64, 48, dtype=torch.bfloat16), ref)
    assert latent_image_ids(128, 128).shape[0] == 4096  # 1024 px: the sequence length flux_mu reads


def test_guidance_vector():
    g = guidance_vector(3, 3.5)
    assert g.dtype == torch.float32 and torch.equal(g, torch.tensor([3.5, 3.5, 3.5]))
    assert torch.equal(guidance_vector(2, 1), torch.tensor([1.0]).expand(2))  # the script's form
