"""ldm-info: ZeRO memory formulas against the ZeRO paper, FLOPs against hand counts, the CLI on a tiny config."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from trainer.cli.info import info
from trainer.config import ConfigError, compose
from trainer.plan import _flops, zero_memory


def test_zero_memory_reproduces_the_zero_paper_example():
    # Rajbhandari et al. 2020, Figure 1: 7.5B parameters, 64 GPUs, mixed-precision Adam (K = 12)
    m = zero_memory(7_500_000_000, 0, 64, "bf16")
    gb = {s: m[f"stage_{s}"]["total"] / 1e9 for s in range(4)}
    assert gb[0] == pytest.approx(120.0)
    assert gb[1] == pytest.approx(31.4, abs=0.01)
    assert gb[2] == pytest.approx(16.6, abs=0.05)
    assert gb[3] == pytest.approx(1.875)
    fp32 = zero_memory(1000, 10, 4, "fp32")
    assert fp32["stage_2"] == {"params": 4000, "grads": 1000, "optimizer": 2000, "total": 7040}


def test_flop_counter_matches_hand_count():
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64)
    assert _flops(lambda: lin(x)) == 2 * 8 * 64 * 32
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    assert _flops(lambda: conv(torch.randn(1, 4, 16, 16))) == 2 * 16 * 16 * 8 * 4 * 9


def test_cli_prints_a_plan_for_tiny_models():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.cli.info",
            "unet=tiny",
            "autoencoder=tiny",
            "text_encoder=tiny_clip",
            "resolution=32",
            "world_size=2",
            "precision=fp32",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    plan = json.loads(out.stdout)
    assert plan["latent_size"] == 8
    assert plan["modules"]["text_encoder"] == {"total": 3_319_168, "trainable": 0}
    f = plan["flops_per_sample"]
    assert 2.5 < f["unet_train"] / f["unet_forward"] < 3.1  # backward ~ 2x forward
    assert (
        f["train_step_encoding_images"]
        == f["unet_train"] + f["text_encoder_forward"] + f["autoencoder_encode"]
    )
    z = plan["zero_model_states_per_rank_bytes"]
    assert z["trainable_params"] == plan["modules"]["unet"]["trainable"]
    assert z["stage_3"]["params"] * 2 == z["stage_0"]["params"]


@pytest.mark.parametrize(
    "override,message",
    [("resolution=36", "resolution 36 is not divisible"), ("+unet.num_head=4", "num_head")],
)
def test_bad_resolution_and_typos_fail_naming_the_key(override, message):
    cfg = compose("info", ["unet=tiny", "autoencoder=tiny", "text_encoder=tiny_clip", override])
    with pytest.raises(ConfigError, match=message):
        info(cfg)


def test_dry_run_sizes_the_job_per_rank_and_its_step_time(tmp_path):
    """Activations grow with the micro-batch, the EMA is fp32 split over the ranks, the step time follows from
    the FLOPs, the GPU's peak and the MFU; an unknown GPU is refused by name."""
    from trainer.plan import GPUS, job_plan
    from trainer.train import plan

    def job(*extra):
        cfg = compose("train", ["experiment=tiny_cpu", f"run_dir={tmp_path}", "plan.world_size=16", *extra])
        return plan(cfg)

    one, four = job("data.batch_size=1"), job("data.batch_size=4", "plan.gpu=a100", "plan.mfu=0.5")
    per_sample = one["activation_bytes_per_sample"]
    assert per_sample > 0 and four["job"]["memory_per_rank_bytes"]["activations"] == 4 * per_sample
    trainable = sum(m["trainable"] for m in one["modules"].values())
    assert one["job"]["memory_per_rank_bytes"]["ema"] == 4 * trainable // 16
    flops = four["flops_per_sample"]["train_step_encoding_images"]  # data=synthetic: images encoded each step
    assert four["job"]["step_time_s"] == pytest.approx(flops * 4 / (GPUS["a100"] * 1e12 * 0.5))
    assert four["job"]["global_batch"] == 4 * 16
    with pytest.raises(ConfigError, match=r"plan\.gpu='tpu9'"):
        job_plan(one, compose("train", ["experiment=tiny_cpu", "plan.gpu=tpu9"]), 16)


def test_activation_count_matches_a_hand_count():
    from trainer.plan import activation_bytes_per_sample

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x, t, ctx, y):
            return self.b(torch.relu(self.a(x)))

    with torch.device("meta"):
        m, x = Two(), torch.randn(3, 8)
    # saved: x (for a's weight grad), relu's output (for relu and for b's weight grad): 3*8 + 3*16 values
    assert activation_bytes_per_sample(m, x, None, None, None, 2) == 2 * (3 * 8 + 3 * 16)
