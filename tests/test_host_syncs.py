"""Issue 16: what a training step makes the host wait for, counted by who asks (bench/host_syncs.py, real
ranks). Our code reads at most one value back per step from the device (fp32 ZeRO-0's gradient check) plus
the stop flag, which is a CPU all-reduce (on GPU runs over a gloo group: no device sync); the sharded EMA moves
nothing per step where the old one gathered the whole model under bf16 and ZeRO-3."""

from __future__ import annotations

import json
import subprocess

import pytest
from trainrun import PY, ROOT, env

pytestmark = pytest.mark.slow


def test_host_syncs_per_step_from_our_code_and_the_ema(tmp_path):
    out = tmp_path / "syncs.json"
    cmd = [PY, "bench/host_syncs.py", "--steps", "2", "--configs", "0:fp32,2:bf16,3:fp32", "--json", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = {(r["zero"], r["precision"]): r for r in json.loads(out.read_text())}
    for (zero, precision), r in rows.items():
        sites = dict(r["reads_per_step_ours_by_site"])
        assert sites.pop("ours:distributed.py:any_rank") == 1.0  # the stop flag: host-side
        device_reads = sum(sites.values())
        assert device_reads <= 1.0, (zero, precision, sites)
        assert r["collectives_per_step_ours"] == 1.0  # the stop flag again, nothing else of ours per step
        assert r["ema_update_bytes_sharded"] == 0 and r["ema_update_collectives_sharded"] == 0
    assert rows[(0, "fp32")]["reads_per_step_ours_by_site"] == {
        "ours:deepspeed_setup.py:check_and_clip_stage0": 1.0,
        "ours:distributed.py:any_rank": 1.0,
    }
    for key in ((2, "bf16"), (3, "fp32")):  # the old EMA gathered every fp32 weight, every step
        assert rows[key]["ema_update_bytes_old"] >= 0.99 * rows[key]["model_fp32_bytes"]


def test_one_rank_zero0_moves_no_gradient_bytes(tmp_path):
    """On one rank (the demo's stages, a single-GPU job) DeepSpeed's gradient all-reduce has no peer: it is off,
    so a step's only collective is the stop flag and no gradient byte is flattened and copied back."""
    out = tmp_path / "syncs.json"
    cmd = [PY, "bench/host_syncs.py", "--steps", "2", "--nproc", "1", "--configs", "0:fp32", "--json", str(out)]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    [row] = json.loads(out.read_text())
    # the stop flag, one int32 (before: 2 collectives and the 4.1 MB of gradients)
    assert row["world"] == 1 and row["collectives_per_step"] == 1.0 and row["bytes_per_step"] == 4
