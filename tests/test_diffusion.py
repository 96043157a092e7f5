"""Schedules and samplers against diffusers' schedulers; parameterizations in float64."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from trainer.diffusion.objectives import Diffusion, DiffusionConfig, DiffusionObjective
from trainer.diffusion.parameterizations import (
    EpsPrediction,
    MinSNRConfig,
    MinSNRWeighting,
    VPrediction,
    X0Prediction,
)
from trainer.diffusion.samplers import DDIMSampler, DDPMSampler, DPMSolverPP2M
from trainer.diffusion.schedules import CosineSchedule, LinearSchedule, NoiseSchedule, ScaledLinearSchedule

KINDS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def ref_kwargs(kind: str, zero_snr: bool = False, pred: str = "eps") -> dict:
    beta = (0.0001, 0.02) if kind == "linear" else (0.00085, 0.012)
    return dict(
        num_train_timesteps=1000,
        beta_start=beta[0],
        beta_end=beta[1],
        beta_schedule=KINDS[kind],
        rescale_betas_zero_snr=zero_snr,
        prediction_type=PRED[pred],
    )


SCHEDULES = {"linear": LinearSchedule, "scaled_linear": ScaledLinearSchedule, "cosine": CosineSchedule}
PARAMS = {"eps": EpsPrediction(), "v": VPrediction(), "x0": X0Prediction()}


def ours(kind: str, zero_snr: bool = False) -> NoiseSchedule:
    cls = SCHEDULES[kind]
    return cls(cls.Config(zero_terminal_snr=zero_snr))  # the defaults are the reference betas


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_match_diffusers(kind, zero_snr):
    ref = DDPMScheduler(**ref_kwargs(kind, zero_snr))
    assert (ours(kind, zero_snr).alphas_cumprod - ref.alphas_cumprod).abs().max() < 1e-6
    if zero_snr:
        assert ours(kind, zero_snr).alphas_cumprod[-1] == 0


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for a UNet: smooth in x, varies with t."""
    return 0.7 * torch.sin(1.3 * x) + 0.2 * torch.cos(float(t) / 137.0 + x)


def pair(name: str, kind: str, pred_name: str, zero_snr: bool = False, **kw):
    sched, pred = ours(kind, zero_snr), PARAMS[pred_name]
    if name == "ddpm":
        return DDPMSampler(sched, pred, spacing=kw.get("spacing", "leading")), DDPMScheduler(
            **ref_kwargs(kind, zero_snr, pred_name),
            clip_sample=False,
            timestep_spacing=kw.get("spacing", "leading"),
        )
    if name == "ddim":
        return DDIMSampler(
            sched,
            pred,
            eta=kw.get("eta", 0.0),
            spacing=kw.get("spacing", "leading"),
            steps_offset=kw.get("offset", 0),
            set_alpha_to_one=kw.get("alpha_one", True),
        ), DDIMScheduler(
            **ref_kwargs(kind, zero_snr, pred_name),
            clip_sample=False,
            timestep_spacing=kw.get("spacing", "leading"),
            steps_offset=kw.get("offset", 0),
            set_alpha_to_one=kw.get("alpha_one", True),
        )
    return DPMSolverPP2M(sched, pred), DPMSolverMultistepScheduler(
        **ref_kwargs(kind, zero_snr, pred_name), algorithm_type="dpmsolver++", solver_order=2
    )


CASES = [
    ("ddpm", "scaled_linear", "eps", {}),
    ("ddpm", "linear", "v", {"spacing": "trailing"}),
    ("ddpm", "cosine", "x0", {"spacing": "linspace"}),
    ("ddim", "scaled_linear", "eps", {"offset": 1, "alpha_one": False}),
    ("ddim", "scaled_linear", "v", {"spacing": "trailing", "eta": 0.7}),
    ("ddim", "cosine", "x0", {"eta": 1.0}),
    ("ddim", "linear", "eps", {"spacing": "linspace"}),
    ("dpmpp_2m", "scaled_linear", "eps", {}),
    ("dpmpp_2m", "linear", "v", {}),
    ("dpmpp_2m", "cosine", "x0", {}),
]


@pytest.mark.parametrize("name,kind,pred,kw", CASES)
def test_one_step_and_a_20_step_loop_match_diffusers(name, kind, pred, kw):
    sampler, ref = pair(name, kind, pred, **kw)
    sampler.set_timesteps(20)
    ref.set_timesteps(20)
    assert torch.equal(sampler.timesteps, ref.timesteps)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    # one step from the same (x_t, output), at a timestep in the middle of the schedule
    t = int(sampler.timesteps[7])
    if name == "dpmpp_2m":  # multistep: feed both the same history first
        for tt in sampler.timesteps[:7]:
            out = fake_model(x0, tt)
            sampler.step(out, tt, x0)
            ref.step(out, tt, x0)
    out = fake_model(x0, t)
    mine = sampler.step(out, t, x0, generator=torch.Generator().manual_seed(3))
    extra = {"eta": kw.get("eta", 0.0)} if name == "ddim" else {}  # diffusers' DDIM takes eta per step
    theirs = ref.step(out, t, x0, generator=torch.Generator().manual_seed(3), **extra).prev_sample
    assert (mine - theirs).abs().max() < 1e-6
    # a whole loop, with per-sample generators for the stochastic samplers
    sampler.set_timesteps(20)
    ref.set_timesteps(20)
    xa = xb = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ga = [torch.Generator().manual_seed(10 + i) for i in range(2)]
    gb = [torch.Generator().manual_seed(10 + i) for i in range(2)]
    for tt in sampler.timesteps:
        xa = sampler.step(fake_model(xa, tt), tt, xa, generator=ga)
        xb = ref.step(fake_model(xb, tt), tt, xb, generator=gb, **extra).prev_sample
    assert (xa - xb).abs().max() < 1e-6, (xa - xb).abs().max()


def test_zero_terminal_snr_with_v_prediction_matches_diffusers():
    for name in ("ddim", "dpmpp_2m"):
        sampler, ref = pair(name, "scaled_linear", "v", zero_snr=True, spacing="trailing")
        if name == "ddim":
            ref = DDIMScheduler(
                **ref_kwargs("scaled_linear", True, "v"), clip_sample=False, timestep_spacing="trailing"
            )
        sampler.set_timesteps(10)
        ref.set_timesteps(10)
        xa = xb = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
        for tt in sampler.timesteps:
            xa = sampler.step(fake_model(xa, tt), tt, xa)
            xb = ref.step(fake_model(xb, tt), tt, xb).prev_sample
        assert torch.isfinite(xa).all() and (xa - xb).abs().max() < 1e-5


def test_v_and_eps_targets_give_the_same_x0_in_float64():
    sched = ours("scaled_linear")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    abar = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    z = a * x0 + s * noise
    for pred in PARAMS.values():
        rec_x0, rec_eps = pred.to_x0_eps(pred.target(x0, noise, a, s), z, a, s)
        assert torch.allclose(rec_x0, x0, atol=1e-9, rtol=0) and torch.allclose(
            rec_eps, noise, atol=1e-9, rtol=0
        )


def test_ddim_eta0_with_the_true_noise_recovers_the_clean_latent():
    sched = ScaledLinearSchedule()
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sampler = DDIMSampler(sched, EpsPrediction(), eta=0.0, set_alpha_to_one=True)
    sampler.set_timesteps(25)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)  # pure noise at t = T
    for t in sampler.timesteps:
        abar = sampler.abar[int(t)]
        true_eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()  # the noise that takes x0 to x
        x = sampler.step(true_eps, t, x)
    assert torch.allclose(x, x0, atol=1e-12, rtol=0)


def test_min_snr_weights_and_offset_noise():
    snr = torch.tensor([0.5, 5.0, 50.0])
    weighting = MinSNRWeighting(MinSNRConfig(gamma=5.0))
    assert torch.allclose(weighting(snr, EpsPrediction()), torch.tensor([1.0, 1.0, 0.1]))
    assert torch.allclose(weighting(snr, VPrediction()), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))
    assert torch.allclose(weighting(snr, X0Prediction()), torch.tensor([0.5, 5.0, 5.0]))
    obj = DiffusionObjective(Diffusion(DiffusionConfig(offset_noise=0.1)))
    x = torch.zeros(64, 4, 16, 16)
    noise = obj.sample_noise(x, torch.Generator().manual_seed(0))
    per_channel_mean = noise.mean(dim=(2, 3))
    assert 0.05 < per_channel_mean.std() < 0.15  # the offset is constant over each channel


def test_objective_loss_is_the_mse_of_the_chosen_target():
    obj = DiffusionObjective(
        Diffusion.from_node({"parameterization": {"_target_": VPrediction.Config._target_}})
    )
    x0 = torch.randn(3, 4, 8, 8)
    noise = torch.randn(3, 4, 8, 8)
    t = torch.tensor([1, 400, 999])
    seen = {}

    def model(z, tt):
        seen["z"], seen["t"] = z, tt
        return torch.zeros_like(z[:, :4])

    loss, _info = obj.loss(model, x0, t=t, noise=noise, concat=torch.ones(3, 5, 8, 8))
    a, s = obj.schedule.alpha_sigma(t, x0)
    assert seen["z"].shape[1] == 9 and torch.equal(seen["z"][:, 4:], torch.ones(3, 5, 8, 8))
    assert torch.allclose(seen["z"][:, :4], a * x0 + s * noise)
    assert torch.allclose(loss, (a * noise - s * x0).pow(2).mean())


def test_min_snr_with_zero_terminal_snr_is_finite_at_the_last_timestep():
    """eps + min-SNR + zero terminal SNR once divided 0 by 0 at t = T-1 (a NaN loss)."""
    sched = ScaledLinearSchedule(ScaledLinearSchedule.Config(zero_terminal_snr=True))
    t = torch.tensor([999, 998, 500, 0])
    snr = sched.snr(t)
    assert snr[0] == 0
    weighting = MinSNRWeighting(MinSNRConfig(gamma=5.0))
    for pred in PARAMS.values():
        assert torch.isfinite(weighting(snr, pred)).all(), pred
    assert weighting(snr, EpsPrediction())[0] == 1.0  # the limit of min(SNR, gamma) / SNR as SNR -> 0
    diffusion = Diffusion.from_node(
        {
            "schedule": {"_target_": ScaledLinearSchedule.Config._target_, "zero_terminal_snr": True},
            "weighting": {"_target_": MinSNRConfig._target_},
        }
    )
    x0 = torch.randn(4, 4, 8, 8)
    loss, _ = DiffusionObjective(diffusion).loss(lambda z, tt: torch.zeros_like(z), x0, t=t)
    assert torch.isfinite(loss)
