"""Issue 17: progress that fits a Slurm log: totals, and plain lines (no carriage returns) off a terminal."""

from __future__ import annotations

import subprocess
import sys

from trainrun import ROOT, env

from data_pipeline.progress import PlainProgress, progress


def test_plain_progress_prints_totals_rates_and_a_last_line(capsys):
    bar = PlainProgress(range(10), desc="precompute rank 0", unit="shard", interval=0.0)
    assert list(bar) == list(range(10))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "\r" not in err and len(lines) == 11  # one per update at interval 0, and the closing line
    assert lines[-1].startswith("precompute rank 0: 10/10 shard (100%)") and "shard/s" in lines[-1]
    quiet = PlainProgress(total=5, desc="x", interval=3600)  # a long interval: only the closing line
    quiet.update(3)
    quiet.set_postfix(img_s="9.5")
    quiet.close()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("x: 3/5 it (60%)") and line.endswith("[img_s=9.5]")


def test_off_a_terminal_jobs_write_lines_not_bars(synth_shards, tmp_path):
    """ldm-data validate with stderr to a file, as under Slurm: no carriage return, a line with the total."""
    out = subprocess.run([sys.executable, "-m", "data_pipeline.cli", "validate", str(synth_shards)], cwd=ROOT,
                         env=env() | {"LDM_PROGRESS_INTERVAL": "0"}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\r" not in out.stderr
    assert "validate: 8/8 shard (100%)" in out.stderr
    assert progress(total=3, disable=True).disable
