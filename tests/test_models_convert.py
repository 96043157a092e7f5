"""Stable Diffusion single-file checkpoints (safetensors and .ckpt) load into our modules by prefix."""

from __future__ import annotations

import pytest
import torch
from presets import config
from safetensors.torch import save_file

from trainer.models.autoencoder import AutoencoderKL
from trainer.models.convert import load_single_file
from trainer.models.unet import UNetModel

UNET = config("unet/tiny", context_dim=16)
VAE = config("autoencoder/tiny", ch=16, ch_mult=[1, 2], resolution=16)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_single_file_checkpoint_loads_by_prefix(tmp_path, fmt):
    torch.manual_seed(0)
    unet, vae = UNetModel(UNET), AutoencoderKL(VAE)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd |= {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    sd |= {
        "cond_stage_model.model.token_embedding.weight": torch.zeros(3, 2),
        "model_ema.decay": torch.tensor(0.9999),
    }
    path = tmp_path / f"model.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 1000}, path)
    parts = load_single_file(path)
    unet2, vae2 = UNetModel(UNET), AutoencoderKL(VAE)
    unet2.load_state_dict(parts["unet"], strict=True)
    vae2.load_state_dict(parts["autoencoder"], strict=True)
    assert all(
        torch.equal(a, b)
        for a, b in zip(unet.state_dict().values(), unet2.state_dict().values(), strict=True)
    )
    assert list(parts["text_encoder"]) == ["model.token_embedding.weight"]


def test_single_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        load_single_file(tmp_path / "missing.safetensors")
    save_file({"foo": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(KeyError, match="not a Stable Diffusion checkpoint"):
        load_single_file(tmp_path / "other.safetensors")


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {"model.diffusion_model.x": Evil()}}, tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match=r"(?i)weights_only|unsupported global"):
        load_single_file(tmp_path / "evil.ckpt")
