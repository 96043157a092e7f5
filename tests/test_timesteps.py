"""Training timestep samplers: importance draws keep the objective and lower the variance (float64 references)."""

from __future__ import annotations

import pytest
import torch

from trainer.config import ConfigError
from trainer.diffusion.objectives import Diffusion, DiffusionObjective
from trainer.diffusion.timesteps import ImportanceTimesteps, ImportanceTimestepsConfig, UniformTimesteps

V_MIN_SNR = {
    "schedule": {"_target_": "trainer.diffusion.schedules.ScaledLinearSchedule", "zero_terminal_snr": True},
    "parameterization": {"_target_": "trainer.diffusion.parameterizations.VPrediction"},
    "weighting": {"_target_": "trainer.diffusion.parameterizations.MinSNRWeighting", "gamma": 5.0},
}
IMPORTANCE = {"_target_": "trainer.diffusion.timesteps.ImportanceTimesteps"}


def weights_v_min_snr() -> torch.Tensor:
    return DiffusionObjective(Diffusion.from_node(V_MIN_SNR)).timestep_weights("cpu")


def test_uniform_draws_are_the_plain_randint_stream_with_unit_ratios():
    """The default keeps the random stream every earlier run (and its resume tests) was made with."""
    w = weights_v_min_snr()
    t, ratio = UniformTimesteps().sample(w, 64, torch.Generator().manual_seed(3))
    assert torch.equal(t, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))
    assert torch.equal(ratio, torch.ones(64))


def test_importance_draws_keep_the_expected_loss_exactly():
    """sum_t p(t) * ratio(t) * w(t) * L(t) is the uniform mean of w(t) * L(t), for any per-timestep loss L,
    with the ratios the sampler hands out."""
    w = weights_v_min_snr()
    sampler = ImportanceTimesteps()
    p = sampler.probabilities(w)
    assert torch.isclose(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (
        p.min() >= 0.5 / 1000 - 1e-15
    )  # the uniform share reaches every timestep, the zero-SNR one included
    t, ratio = sampler.sample(w, 100_000, torch.Generator().manual_seed(0))
    per_t = torch.zeros(1000, dtype=torch.float64).index_put_((t,), ratio.double())
    drawn = torch.bincount(t, minlength=1000) > 0
    assert drawn.sum() > 990
    loss_at_t = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    wd = w.double()
    expected = (p * per_t * wd * loss_at_t)[drawn].sum() + (wd * loss_at_t)[~drawn].sum() / 1000
    assert torch.isclose(expected, (wd * loss_at_t).mean(), rtol=1e-6)


def test_importance_draws_follow_their_probabilities_and_lower_the_variance():
    w = weights_v_min_snr()
    sampler = ImportanceTimesteps()
    n = 200_000
    t, ratio = sampler.sample(w, n, torch.Generator().manual_seed(1))
    p = sampler.probabilities(w)
    # drawn frequencies by decile of t against p
    counts = torch.bincount(t, minlength=1000).double().view(10, 100).sum(1) / n
    assert torch.allclose(counts, p.view(10, 100).sum(1), atol=4e-3)
    # a unit loss at every timestep: the same mean, a smaller spread of the per-sample weighted loss
    weighted = (w[t] * ratio).double()
    tu, _ = UniformTimesteps().sample(w, n, torch.Generator().manual_seed(1))
    uniform = w[tu].double()
    assert abs(weighted.mean() - w.double().mean()) < 3e-3
    assert abs(uniform.mean() - w.double().mean()) < 3e-3
    assert weighted.std() < 0.6 * uniform.std()  # 0.51 at the default uniform share of one half


def test_the_objective_multiplies_the_weight_by_the_ratio():
    """With a model that predicts zeros, each sample's loss is known in closed form: the returned mean must be
    the mean of weight x ratio x that loss for the timesteps the sampler drew with the same generator."""
    node = {**V_MIN_SNR, "timesteps": IMPORTANCE}
    obj = DiffusionObjective(Diffusion.from_node(node))
    x0 = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    loss, info = obj.loss(lambda z, tt: torch.zeros_like(z), x0, gen, noise=noise)
    t, ratio = obj.sample_timesteps(16, "cpu", torch.Generator().manual_seed(4))
    assert torch.equal(info["t"], t)
    a, s = obj.schedule.alpha_sigma(t, x0)
    per_sample = (a * noise - s * x0).pow(2).mean(dim=(1, 2, 3))
    expected = (obj.timestep_weights("cpu")[t] * ratio * per_sample).mean()
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_a_bad_uniform_share_fails_at_build_naming_the_key():
    with pytest.raises(ValueError, match="uniform_share"):
        ImportanceTimesteps(ImportanceTimestepsConfig(uniform_share=0.0))
    with pytest.raises((ConfigError, ValueError), match="timesteps"):
        Diffusion.from_node({"timesteps": {"_target_": "trainer.diffusion.timesteps.NoSuchSampler"}})
