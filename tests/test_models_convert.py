"""Stable Diffusion single-file checkpoints (safetensors and .ckpt) load into our modules by prefix."""

from __future__ import annotations

import os

import pytest
import torch
from presets import config
from safetensors.torch import save_file

from trainer.models.autoencoder import AutoencoderKL
from trainer.models.convert import load_single_file
from trainer.models.safe_pickle import Skipped, load_checkpoint
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


class OnlyInThisTest:
    """Stands for a Lightning callback: a class the loading side must never construct."""

    def __init__(self):
        self.best_model_score = torch.tensor(0.25)

    def __setstate__(self, state):
        CONSTRUCTED.append(state)
        self.__dict__.update(state)


class RunsACommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


CONSTRUCTED: list = []


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_compvis_ckpt_with_pickled_callbacks_loads_through_the_restricted_unpickler(tmp_path, zipfile):
    """A Lightning .ckpt holds pickled objects besides tensors: weights_only refuses the file; our restricted
    unpickler loads its weights and turns every other object into an inert stub (no class constructed, no
    function called)."""
    torch.manual_seed(0)
    unet, vae = UNetModel(UNET), AutoencoderKL(VAE)
    marker = tmp_path / "pwned"
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd |= {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    ckpt = {"state_dict": sd, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
            "callbacks": {OnlyInThisTest: OnlyInThisTest()}, "hyper_parameters": RunsACommand(f"touch {marker}"),
            "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 1e-4}]}]}  # fmt: skip
    torch.save(ckpt, tmp_path / "sd.ckpt", _use_new_zipfile_serialization=zipfile)
    with pytest.raises(Exception, match=r"(?i)weights_only|unsupported global"):
        torch.load(tmp_path / "sd.ckpt", weights_only=True)
    parts = load_single_file(tmp_path / "sd.ckpt")
    unet2 = UNetModel(UNET)
    unet2.load_state_dict(parts["unet"], strict=True)
    assert all(
        torch.equal(a, b)
        for a, b in zip(unet.state_dict().values(), unet2.state_dict().values(), strict=True)
    )
    assert set(parts["autoencoder"]) == set(vae.state_dict())
    assert not marker.exists() and CONSTRUCTED == []
    whole = load_checkpoint(tmp_path / "sd.ckpt")
    ((key, callback),) = whole["callbacks"].items()
    assert (
        isinstance(callback, Skipped) and issubclass(key, Skipped) and key.origin.endswith("OnlyInThisTest")
    )
    assert torch.equal(callback.state["best_model_score"], torch.tensor(0.25))  # its state is plain data
    assert isinstance(whole["hyper_parameters"], Skipped) and whole["hyper_parameters"].args == (
        f"touch {marker}",
    )
    assert whole["global_step"] == 470000 and torch.equal(
        whole["optimizer_states"][0]["state"][0]["exp_avg"], torch.ones(2)
    )
    assert not marker.exists() and CONSTRUCTED == []


def test_pickled_code_is_never_run_and_a_non_tensor_weight_is_named(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {"model.diffusion_model.x": Evil()}}, tmp_path / "evil.ckpt")
    with pytest.raises(
        ValueError, match=r"'model\.diffusion_model\.x' is <skipped builtins\.print>, not a tensor"
    ):
        load_single_file(tmp_path / "evil.ckpt")
    assert "pwned" not in capsys.readouterr().out
