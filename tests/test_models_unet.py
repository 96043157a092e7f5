"""Our UNet against diffusers' UNet2DConditionModel: weights converted both ways give the same outputs."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from presets import config

from trainer.models.convert import (
    diffusers_unet_config,
    unet_config_from_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
)
from trainer.models.unet import UNetConfig, UNetModel

TINY = dict(channel_mult=[1, 2, 2], num_res_blocks=2, context_dim=24)  # unet/tiny, three levels deep
VARIANTS = {
    "text": config("unet/tiny", **TINY),
    "linear_headdim_classes": config(
        "unet/tiny",
        **TINY,
        num_heads=-1,
        head_dim=8,
        use_linear_in_transformer=True,
        num_classes=10,
        transformer_depth=2,
    ),
    "inpainting_concat": config("unet/tiny", **TINY, in_channels=9, attention_resolutions=[2, 4]),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def inputs(cfg: UNetConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    t = torch.tensor([3, 871])
    ctx = torch.randn(2, 5, cfg.context_dim, generator=g)
    y = torch.tensor([1, 7]) if cfg.num_classes else None
    return x, t, ctx, y


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero everywhere (our zero-initialised output layers would hide mapping errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if is_norm_scale else 0.0))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_diffusers_to_ours_and_back(name):
    cfg = VARIANTS[name]
    ref = UNet2DConditionModel(**diffusers_unet_config(cfg)).eval()
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(unet_from_diffusers(ref.state_dict(), cfg), strict=True)
    x, t, ctx, y = inputs(cfg)
    with torch.no_grad():
        want = ref(x, t, ctx, class_labels=y).sample
        got = ours(x, t, ctx, y)
    assert rel_err(got, want) < 1e-5

    randomize(ours, seed=1)
    ref.load_state_dict(unet_to_diffusers(ours.state_dict(), cfg), strict=True)
    with torch.no_grad():
        assert rel_err(ours(x, t, ctx, y), ref(x, t, ctx, class_labels=y).sample) < 1e-5
    assert unet_config_from_diffusers(dict(ref.config)) == UNetConfig(
        **{**vars(cfg), "_target_": cfg._target_}
    )


# The configs of the released checkpoints (config.json of runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-2-base), and their published parameter counts.
SD15 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    cross_attention_dim=768,
    block_out_channels=[320, 640, 1280, 1280],
    attention_head_dim=8,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SD2 = {
    **SD15,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
}


@pytest.mark.parametrize("name,reference,count", [("sd15", SD15, 859_520_964), ("sd2", SD2, 865_910_724)])
def test_real_shapes_match_diffusers_parameter_counts(name, reference, count):
    from omegaconf import OmegaConf

    fields = OmegaConf.to_container(OmegaConf.load(f"conf/unet/{name}.yaml"))
    with torch.device("meta"):
        ours = UNetModel(**fields)
        ref = UNet2DConditionModel(**reference)
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters()) == count
    assert set(unet_to_diffusers({k: v for k, v in ours.state_dict().items()}, ours.config)) == set(
        ref.state_dict()
    )


def test_attention_backends_agree_and_xformers_fails_clearly_on_cpu():
    cfg = VARIANTS["text"]
    sdpa = UNetModel(cfg).eval()
    randomize(sdpa)
    math = UNetModel(UNetConfig(**{**vars(cfg), "attention": "math"})).eval()
    math.load_state_dict(sdpa.state_dict())
    x, t, ctx, _ = inputs(cfg)
    with torch.no_grad():
        assert rel_err(math(x, t, ctx), sdpa(x, t, ctx)) < 1e-5
    with pytest.raises((ImportError, RuntimeError), match="xformers"):
        m = UNetModel(UNetConfig(**{**vars(cfg), "attention": "xformers"}))
        m(x, t, ctx)
    with pytest.raises(ValueError, match="attention backend must be one of"):
        UNetModel(UNetConfig(**{**vars(cfg), "attention": "flash"}))


def test_gradient_checkpointing_and_channels_last_change_nothing():
    cfg = VARIANTS["linear_headdim_classes"]
    base = UNetModel(cfg)
    randomize(base)
    ckpt = UNetModel(UNetConfig(**{**vars(cfg), "gradient_checkpointing": True}))
    ckpt.load_state_dict(base.state_dict())
    x, t, ctx, y = inputs(cfg)
    out_a = base(x, t, ctx, y)
    out_a.square().mean().backward()
    out_b = ckpt(x.to(memory_format=torch.channels_last), t, ctx, y)
    out_b.square().mean().backward()
    assert rel_err(out_b, out_a) < 1e-5
    for (name, pa), pb in zip(base.named_parameters(), ckpt.parameters(), strict=True):
        assert rel_err(pb.grad, pa.grad) < 1e-4, name


def test_class_conditional_model_needs_labels():
    cfg = VARIANTS["linear_headdim_classes"]
    x, t, ctx, _ = inputs(cfg)
    with pytest.raises(ValueError, match="class-conditional"):
        UNetModel(cfg)(x, t, ctx)


def test_bf16_autocast_on_cpu_keeps_group_norm_and_attention_in_fp32():
    """Under bf16 autocast on the CPU, GroupNorm computes in fp32 (its bf16 CPU backward kernel is 4x slower,
    issue 19) and hands bf16 back: outputs and gradients stay close to fp32's."""
    from trainer.models import norm

    torch.manual_seed(0)
    model = UNetModel(config("unet/tiny", **TINY))
    randomize(model)
    x, t, ctx, _ = inputs(model.config)
    x = x.contiguous(memory_format=torch.channels_last)
    ref = model(x, t, ctx)
    seen = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: (
            seen.append((args[0].dtype, out.dtype)) if isinstance(m, norm.GroupNorm) else None
        )
    )
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, ctx)
    finally:
        hook.remove()
    assert out.dtype == torch.bfloat16 and all(i == o for i, o in seen)  # bf16 in, bf16 out
    assert any(i == torch.bfloat16 for i, _ in seen)
    assert rel_err(out.float(), ref) < 0.05
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    layer = norm.GroupNorm(4, 8)
    y = torch.randn(2, 8, 4, 4).bfloat16()
    expect = torch.nn.functional.group_norm(y.float(), 4, layer.weight, layer.bias, 1e-5).bfloat16()
    assert torch.equal(layer(y), expect)


def test_bf16_cpu_attention_is_explicit_for_short_sequences_and_fused_fp32_for_long(monkeypatch):
    """bf16 CPU attention: an explicit bf16 QK^T with an fp32 softmax while the score matrix is small (2-4x faster
    than the fp32 flash kernel at 4-64 tokens, issue 19), torch's fp32 flash kernel above the limit (no N x M
    scores in memory); both within bf16 rounding of a float64 reference, values and gradients."""
    from trainer.models import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 16, generator=g).bfloat16().requires_grad_() for n in (64, 16, 16))

    def ref():
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        out = ((q64 @ k64.transpose(-1, -2)) / 4.0).softmax(-1) @ v64
        out.square().sum().backward()
        return out, [x.grad for x in (q64, k64, v64)]

    def run():
        for x in (q, k, v):
            x.grad = None
        out = attention.dot_product_attention(q, k, v)
        out.float().square().sum().backward()
        return out, [x.grad for x in (q, k, v)]

    expect, expect_grads = ref()
    explicit, grads = run()
    assert explicit.dtype == torch.bfloat16
    assert torch.equal(explicit, attention._math(q, k, v))
    monkeypatch.setattr(attention, "CPU_BF16_EXPLICIT_MAX_SCORES", 2 * 4 * 64 * 16 - 1)
    fused, fused_grads = run()
    expect_fused = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float()
    ).bfloat16()
    assert torch.equal(fused, expect_fused)
    for out, gs in ((explicit, grads), (fused, fused_grads)):
        assert rel_err(out.double(), expect) < 1e-2
        assert all(rel_err(a.double(), b) < 3e-2 for a, b in zip(gs, expect_grads, strict=True))
