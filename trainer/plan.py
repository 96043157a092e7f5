"""What a model config costs before anything runs: parameters per module, training FLOPs per sample, and the
per-rank memory of model states under ZeRO stages 0-3 (Rajbhandari et al., 2020). Everything is built on the
meta device, so the real SD shapes need no memory."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import ConfigError, build, offline
from .engine.precision import precision as precision_named
from .models.autoencoder import Autoencoder
from .models.text_encoders import ConditionEncoder
from .models.unet import UNetModel


def count(module: torch.nn.Module | None) -> dict[str, int]:
    if module is None:
        return {"total": 0, "trainable": 0}
    return {
        "total": sum(p.numel() for p in module.parameters()),
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def flops_per_sample(unet, autoencoder, text_encoder, resolution: int) -> dict[str, int]:
    """Matmul/conv FLOPs for one sample (meta tensors; multiply-add = 2 FLOPs)."""
    f = autoencoder.config.downsampling if autoencoder is not None else 8
    latent = resolution // f
    channels = autoencoder.config.embed_dim if autoencoder is not None else unet.config.in_channels
    ucfg = unet.config
    x = torch.randn(1, ucfg.in_channels, latent, latent, device="meta")
    ctx = torch.randn(1, 77, ucfg.context_dim, device="meta")
    t = torch.zeros(1, device="meta")
    y = torch.zeros(1, dtype=torch.long, device="meta") if ucfg.num_classes else None

    def unet_train():
        unet(x, t, ctx, y).sum().backward()

    out = {"unet_forward": _flops(lambda: unet(x, t, ctx, y)), "unet_train": _flops(unet_train)}
    if autoencoder is not None:
        img = torch.randn(1, autoencoder.config.in_channels, resolution, resolution, device="meta")
        out["autoencoder_encode"] = _flops(lambda: autoencoder.encode_latents(img))
        out["autoencoder_decode"] = _flops(
            lambda: autoencoder.decode(torch.randn(1, channels, latent, latent, device="meta"))
        )
    if text_encoder is not None:
        conds = text_encoder.null_conditions(1)  # padded to the context length: the same cost as any caption
        out["text_encoder_forward"] = _flops(lambda: text_encoder(conds))
    text_cost = out.get("text_encoder_forward", 0) * (
        3 if text_encoder is not None and text_encoder.trainable else 1
    )
    out["train_step_from_latents"] = out["unet_train"] + text_cost
    out["train_step_encoding_images"] = out["train_step_from_latents"] + out.get("autoencoder_encode", 0)
    return out


def zero_memory(trainable: int, frozen: int, world_size: int, precision: str) -> dict:
    """Per-rank bytes of model states (params, grads, Adam states) by ZeRO stage.

    Mixed precision (bf16/fp16): 2-byte params and grads + 12 bytes of fp32 master weights, momentum and
    variance per parameter; fp32: 4 + 4 + 8. Frozen modules (VAE, frozen text encoder) are replicated, never
    sharded. Activations, buffers and the EMA copy are not included.
    """
    prec = precision_named(precision)
    p = g = prec.dtype.itemsize
    k = 12 if prec.mixed else 8
    n = world_size
    stages = {
        0: (p, g, k),
        1: (p, g, k / n),
        2: (p, g / n, k / n),
        3: (p / n, g / n, k / n),
    }
    out = {
        "world_size": n,
        "precision": precision,
        "trainable_params": trainable,
        "frozen_params": frozen,
        "frozen_bytes": frozen * p,
    }
    for stage, (pp, gg, kk) in stages.items():
        parts = {"params": trainable * pp, "grads": trainable * gg, "optimizer": trainable * kk}
        parts = {key: int(v) for key, v in parts.items()}
        parts["total"] = sum(parts.values()) + frozen * p
        out[f"stage_{stage}"] = parts
    return out


GPUS = {  # peak dense bf16 tensor TFLOP/s (vendor data sheets, SXM parts)
    "v100": 125.0,  # fp16
    "a100": 312.0,
    "a10g": 70.0,
    "l40s": 362.0,
    "h100": 989.0,
    "h200": 989.0,
    "b200": 2250.0,
    "mi250x": 383.0,
    "mi300x": 1307.0,
}


def activation_bytes_per_sample(unet, x, t, ctx, y, bytes_per_value: int) -> int:
    """Bytes autograd keeps for backward through one training forward of one sample (meta tensors: tensors
    saved for backward, parameters excluded, each counted once). With the math attention it includes the
    attention matrices; flash/memory-efficient attention keeps far less of those."""
    params = {id(p) for p in unet.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(tensor):
        nonlocal total
        weight = id(tensor) in params or id(tensor._base) in params  # a parameter or a view of one (W.t())
        if not weight and id(tensor) not in seen and tensor.is_floating_point():
            seen.add(id(tensor))
            total += tensor.numel() * bytes_per_value
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        unet(x, t, ctx, y)
    return total


def job_plan(plan: dict, cfg, world_size: int) -> dict:
    """Per-rank memory (model states at the configured ZeRO stage, activations at the configured micro-batch,
    the EMA fragments) and the step time at ``plan.mfu`` of ``plan.gpu``'s peak, for ``ldm-train dry_run``."""
    gpu = cfg.plan.gpu.lower()
    if gpu not in GPUS:
        raise ConfigError(f"plan.gpu={cfg.plan.gpu!r} is not one of {sorted(GPUS)}")
    if not 0 < cfg.plan.mfu <= 1:
        raise ConfigError(f"plan.mfu={cfg.plan.mfu} must be in (0, 1]")
    batch, accum = cfg.data.batch_size, cfg.deepspeed.grad_accum
    states = plan["zero_model_states_per_rank_bytes"][f"stage_{cfg.deepspeed.zero_stage}"]["total"]
    activations = plan["activation_bytes_per_sample"] * batch
    trainable = sum(m["trainable"] for m in plan["modules"].values())
    ema = 4 * trainable // world_size if cfg.ema.enabled else 0  # fp32, sharded like the optimizer
    from_latents = "latent" in str(cfg.data.get("_target_", ""))
    flops = plan["flops_per_sample"][
        "train_step_from_latents" if from_latents else "train_step_encoding_images"
    ]
    step = flops * batch * accum / (GPUS[gpu] * 1e12 * cfg.plan.mfu)
    return {
        "world_size": world_size,
        "micro_batch_per_rank": batch,
        "global_batch": batch * accum * world_size,
        "zero_stage": cfg.deepspeed.zero_stage,
        "memory_per_rank_bytes": {
            "model_states": states,
            "activations": activations,
            "ema": ema,
            "total": states + activations + ema,
        },
        "gpu": gpu,
        "mfu": cfg.plan.mfu,
        "step_time_s": step,
        "samples_per_s": batch * accum * world_size / step,
    }


def build_plan(unet, autoencoder, text_encoder, resolution: int, world_size: int, precision: str) -> dict:
    """The JSON plan printed by ``ldm-info`` (and ``ldm-train dry_run=true``)."""
    if resolution % (autoencoder.config.downsampling * unet.config.downsampling if autoencoder else 1):
        raise ConfigError(
            f"resolution {resolution} is not divisible by the autoencoder's f times the UNet's "
            f"downsampling ({autoencoder.config.downsampling} x {unet.config.downsampling})"
        )
    modules = {"unet": count(unet), "autoencoder": count(autoencoder), "text_encoder": count(text_encoder)}
    if autoencoder is not None:  # the autoencoder is frozen during UNet training
        modules["autoencoder"]["trainable"] = 0
    trainable = sum(m["trainable"] for m in modules.values())
    frozen = sum(m["total"] - m["trainable"] for m in modules.values())
    return {
        "modules": modules,
        "resolution": resolution,
        "latent_size": resolution // (autoencoder.config.downsampling if autoencoder else 1),
        "flops_per_sample": flops_per_sample(unet, autoencoder, text_encoder, resolution),
        "activation_bytes_per_sample": _activations(unet, autoencoder, resolution, precision),
        "zero_model_states_per_rank_bytes": zero_memory(trainable, frozen, world_size, precision),
    }


def _activations(unet, autoencoder, resolution: int, precision: str) -> int:
    f = autoencoder.config.downsampling if autoencoder is not None else 1
    c = unet.config
    x = torch.randn(1, c.in_channels, resolution // f, resolution // f, device="meta")
    ctx = torch.randn(1, 77, c.context_dim, device="meta")
    y = torch.zeros(1, dtype=torch.long, device="meta") if c.num_classes else None
    t = torch.zeros(1, device="meta")
    return activation_bytes_per_sample(unet, x, t, ctx, y, precision_named(precision).dtype.itemsize)


def plan_for(unet_node, ae_node, text_node, resolution: int, world_size: int, precision: str) -> dict:
    """Build the modules on the meta device (no weights are loaded) and compute the plan."""
    with torch.device("meta"):
        unet = build(unet_node, "unet", UNetModel, attention="math")
        ae = build(ae_node, "autoencoder", Autoencoder) if ae_node else None
        te = build(offline(text_node), "text_encoder", ConditionEncoder) if text_node else None
    if te is not None and unet.config.context_dim != te.context_dim:
        raise ConfigError(
            f"unet.context_dim={unet.config.context_dim} but the text encoder gives {te.context_dim}"
        )
    return build_plan(unet, ae, te, resolution, world_size, precision)
