"""Autoencoder: equal to diffusers' AutoencoderKL, KL/VQ math, and which parameters each loss path trains."""

from __future__ import annotations

import pytest
import torch
import torchvision
from diffusers import AutoencoderKL as DiffusersKL
from presets import config

from trainer.models.ae_loss import AutoencoderLoss, AutoencoderLossConfig, build_lpips
from trainer.models.autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    DiagonalGaussian,
    VectorQuantizer,
    VQModel,
)
from trainer.models.convert import diffusers_vae_config, vae_from_diffusers, vae_to_diffusers

TINY = config("autoencoder/tiny")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if p.ndim == 1 and "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + scale)


def test_vae_matches_diffusers_both_ways():
    ref = DiffusersKL(**diffusers_vae_config(TINY)).eval()
    ours = AutoencoderKL(TINY).eval()
    ours.load_state_dict(vae_from_diffusers(ref.state_dict(), TINY), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        post = ours.encode(x)
        assert rel_err(post.mean, dist.mean) < 1e-5 and rel_err(post.logvar, dist.logvar) < 1e-5
        assert rel_err(ours.decode(z), ref.decode(z).sample) < 1e-5
    randomize(ours, 3)
    ref.load_state_dict(vae_to_diffusers(ours.state_dict(), TINY), strict=True)
    with torch.no_grad():
        assert rel_err(ours.encode(x).mean, ref.encode(x).latent_dist.mean) < 1e-5
        assert rel_err(ours.decode(z), ref.decode(z).sample) < 1e-5


@pytest.mark.parametrize("mult,f", [([1, 2, 2], 4), ([1, 2, 2, 4], 8), ([1, 1, 2, 2, 4], 16)])
def test_downsampling_factor(mult, f):
    model = AutoencoderKL(config("autoencoder/tiny", ch=16, ch_mult=mult, resolution=64))
    assert model.config.downsampling == f
    with torch.no_grad():
        z = model.encode_latents(torch.randn(1, 3, 64, 64))
        assert z.shape == (1, 4, 64 // f, 64 // f)
        assert model.decode(z).shape == (1, 3, 64, 64)


def test_real_shapes_parameter_counts():
    from omegaconf import OmegaConf

    with torch.device("meta"):
        kl = AutoencoderKL(**OmegaConf.to_container(OmegaConf.load("conf/autoencoder/kl_f8.yaml")))
        ref = DiffusersKL(**diffusers_vae_config(kl.config))
        vq = VQModel(**OmegaConf.to_container(OmegaConf.load("conf/autoencoder/vq_f4.yaml")))
    n = sum(p.numel() for p in kl.parameters())
    assert n == sum(p.numel() for p in ref.parameters()) == 83_653_863  # SD's VAE
    assert vq.config.downsampling == 4 and vq.quantize.embedding.weight.shape == (8192, 3)


def test_diagonal_gaussian_against_float64():
    g = torch.Generator().manual_seed(0)
    params = torch.randn(3, 8, 4, 4, generator=g, dtype=torch.float64) * 2
    post = DiagonalGaussian(params)
    mean, logvar = params[:, :4], params[:, 4:]
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=[1, 2, 3])
    assert torch.allclose(post.kl(), kl, rtol=1e-12)
    s = post.sample(torch.Generator().manual_seed(5))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.allclose(s, mean + (0.5 * logvar).exp() * noise)
    assert DiagonalGaussian(torch.full((1, 2, 1, 1), 100.0)).logvar.max() == 20.0  # clamped


def test_vector_quantizer_picks_nearest_codes_with_straight_through_gradient():
    vq = VectorQuantizer(4, 2, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]))
    z = (
        torch.tensor([[[[0.9, 0.1]], [[0.1, 0.8]]]]).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    )  # (1,2,2,1)
    zq, loss, info = vq(z)
    assert info["indices"].flatten().tolist() == [1, 2]
    assert info["usage"].item() == 0.5
    expected = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]]).permute(0, 3, 1, 2)
    assert torch.allclose(zq, expected)
    mse = ((z.detach() - expected) ** 2).mean()
    assert torch.allclose(loss, 1.25 * mse)
    zq.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through


def loss_cfg(**kw):
    base = dict(
        lpips_net="alex",
        lpips_random_backbone=True,
        disc_start=0,
        disc_layers=2,
        disc_channels=16,
        kl_weight=1e-3,
    )
    return AutoencoderLossConfig(**{**base, **kw})


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_each_loss_path_updates_only_its_parameters(kind):
    torch.manual_seed(0)
    model = (
        AutoencoderKL(TINY) if kind == "kl" else VQModel(AutoencoderConfig(**{**vars(TINY), "n_embed": 64}))
    )
    loss_fn = AutoencoderLoss(loss_cfg())
    gen_params = [*list(model.parameters()), loss_fn.logvar]
    opt_g = torch.optim.AdamW(gen_params, lr=1e-3)
    opt_d = torch.optim.AdamW(loss_fn.discriminator.parameters(), lr=1e-3)
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def snapshot():
        return {
            "ae": [p.detach().clone() for p in model.parameters()],
            "logvar": loss_fn.logvar.detach().clone(),
            "disc": [p.detach().clone() for p in loss_fn.discriminator.parameters()],
            "lpips": [p.detach().clone() for p in loss_fn.lpips.parameters()],
        }

    def changed(a, b):
        return any(not torch.equal(p, q) for p, q in zip(a, b, strict=True))

    before = snapshot()
    rec, reg = model(x)
    loss, logs = loss_fn.generator_loss(x, rec, reg, step=10, last_layer=model.last_layer)
    opt_g.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())
    opt_g.step()
    after = snapshot()
    assert changed(before["ae"], after["ae"]) and not torch.equal(before["logvar"], after["logvar"])
    assert not changed(before["disc"], after["disc"]) and not changed(before["lpips"], after["lpips"])
    assert (
        logs["d_weight"] > 0
        and ("kl_loss" in logs) == (kind == "kl")
        and ("codebook_loss" in logs) == (kind == "vq")
    )

    with torch.no_grad():
        rec, _ = model(x)
    d_loss, _ = loss_fn.discriminator_loss(x, rec, step=10)
    opt_d.zero_grad()
    d_loss.backward()
    opt_d.step()
    final = snapshot()
    assert changed(after["disc"], final["disc"])
    assert not changed(after["ae"], final["ae"]) and torch.equal(after["logvar"], final["logvar"])


def test_edge_term_against_float64():
    """loss.edge_weight adds |finite differences of the error| per pixel to the likelihood's pixel term: zero
    for a perfect or uniformly shifted reconstruction, and the float64 sum of the differences otherwise."""
    cfg = AutoencoderLossConfig(pixel_loss="l2", perceptual_weight=0.0, edge_weight=0.5, learn_logvar=False)
    loss = AutoencoderLoss(cfg)
    g = torch.Generator().manual_seed(0)
    x, rec = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    nll, logs = loss.reconstruction(x, x + 0.25)  # a uniform shift: edges intact
    assert logs["edge_loss"] < 1e-6 and torch.allclose(nll, torch.tensor(0.25**2 * 192), rtol=1e-5)
    nll, logs = loss.reconstruction(x, rec)
    e = (x - rec).double()
    edges = (e[:, :, 1:] - e[:, :, :-1]).abs().sum() + (e[..., 1:] - e[..., :-1]).abs().sum()
    assert torch.allclose(nll.double(), (e.square().sum() + 0.5 * edges) / 2, rtol=1e-6)
    assert torch.allclose(logs["edge_loss"].double(), edges / x.numel(), rtol=1e-6)


def test_adaptive_weight_and_discriminator_start():
    torch.manual_seed(1)
    model = AutoencoderKL(TINY)
    loss_fn = AutoencoderLoss(loss_cfg(disc_start=100, perceptual_weight=0.0))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, reg = model(x)
    _, early = loss_fn.generator_loss(x, rec, reg, step=99, last_layer=model.last_layer)
    assert "g_loss" not in early and early["disc_factor"] == 0
    d_loss, _ = loss_fn.discriminator_loss(x, rec, step=99)
    assert d_loss.item() == 0.0
    nll, _ = loss_fn.reconstruction(x, rec)
    g = -loss_fn.discriminator(rec).mean()
    a = torch.autograd.grad(nll, model.last_layer, retain_graph=True)[0].norm()
    b = torch.autograd.grad(g, model.last_layer, retain_graph=True)[0].norm()
    _, late = loss_fn.generator_loss(x, rec, reg, step=100, last_layer=model.last_layer)
    assert torch.allclose(late["d_weight"], (a / (b + 1e-4)) * 0.5)
    # the side-graph version (what the DeepSpeed task uses) gives the same weight
    seen = {}
    model.decoder.conv_out.register_forward_pre_hook(lambda m, args: seen.update(h=args[0].detach()))
    rec, _ = model(x, sample=False)
    nll, _ = loss_fn.reconstruction(x, rec)
    direct = loss_fn.adaptive_weight(nll, loss_fn.g_loss(rec), model.last_layer)
    side = loss_fn.adaptive_weight_at(x, model.decoder.conv_out, seen["h"])
    assert torch.allclose(side, direct, rtol=1e-5) and side > 0
    # under precision=bf16-autocast the hook sees a bf16 activation: the side graph computes in the weight's fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, sample=False)
    assert seen["h"].dtype == torch.bfloat16
    side_bf16 = loss_fn.adaptive_weight_at(x, model.decoder.conv_out, seen["h"])
    assert side_bf16.dtype == torch.float32 and torch.allclose(side_bf16, direct, rtol=0.05)


def test_lpips_backbone_comes_from_a_path_and_missing_weights_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lpips_backbone_path"):
        build_lpips(AutoencoderLossConfig(lpips_net="alex", lpips_backbone_path=str(tmp_path / "none.pth")))
    alex = torchvision.models.alexnet()
    torch.save(alex.state_dict(), tmp_path / "alex.pth")
    metric = build_lpips(
        AutoencoderLossConfig(lpips_net="alex", lpips_backbone_path=str(tmp_path / "alex.pth"))
    )
    assert torch.equal(metric.net.slice1[0].weight, alex.features[0].weight)
    assert torch.equal(dict(metric.net.slice5.named_children())["10"].weight, alex.features[10].weight)
    assert not any(p.requires_grad for p in metric.parameters())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert metric(x, x).abs().max() < 1e-6 and metric(x, -x).mean() > 0


@pytest.mark.parametrize("f", [1, 2, 4, 8, 16, 32])
def test_f_study_presets_downsample_by_their_f(f):
    """autoencoder/kl_f{f} (LDM's f-study, f = 1 ... 32): a 256px image becomes (embed_dim, 256/f, 256/f) latents
    and decodes back to 256px (built on the meta device: the real sizes, no memory)."""
    from presets import preset

    from trainer.config import build
    from trainer.models.autoencoder import Autoencoder

    with torch.device("meta"):
        model = build(preset(f"autoencoder/kl_f{f}"), f"autoencoder/kl_f{f}", Autoencoder)
        z = model.encode_latents(torch.empty(1, 3, 256, 256))
        x = model.decode(z)
    assert model.config.downsampling == f and model.config.scale_factor == 0.0  # measured from the data
    assert z.shape == (1, model.config.embed_dim, 256 // f, 256 // f) and x.shape == (1, 3, 256, 256)
