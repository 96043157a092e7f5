"""``ldm-data validate``: exact counts by reason on a hand-made corrupted set; CLI contract."""

from __future__ import annotations

import json
import subprocess
import sys

from data_pipeline.samples import ImageLimits
from data_pipeline.urls import expand_shards
from data_pipeline.validate import validate_shards

CLI = [sys.executable, "-m", "data_pipeline.cli"]


def test_counts_by_reason_are_exact(corrupt_set):
    folder, expected = corrupt_set
    report = validate_shards(expand_shards(str(folder)), ImageLimits(16, 100_000), progress=False)
    assert report["invalid"] == expected["invalid"]
    assert (report["total"], report["valid"]) == (expected["total"], expected["valid"])
    per = {r["url"].rsplit("/", 1)[1]: r for r in report["per_shard"]}
    assert per["b.tar"]["valid"] == 3 and per["b.tar"]["invalid"] == {"truncated_tar": 1}
    assert per["d.tar"]["valid"] == 2 and per["d.tar"]["invalid"] == {"truncated_tar": 1}
    assert per["c.tar"]["invalid"] == {"unreadable_tar": 1}


def test_cli_json_and_parallel_workers_agree(corrupt_set):
    folder, expected = corrupt_set
    out = subprocess.run(
        [
            *CLI,
            "validate",
            f"{folder}/{{a,b,c,d,e}}.tar",
            "--json",
            "--min-size",
            "16",
            "--max-pixels",
            "100000",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout)  # exactly one JSON object on stdout
    assert report["invalid"] == expected["invalid"]
    assert report["total"] == expected["total"] and report["valid"] == expected["valid"]


def test_img2dataset_output_validates_as_is(img2dataset_dir):
    report = validate_shards(expand_shards(str(img2dataset_dir)), progress=False)
    assert report == {**report, "shards": 2, "total": 12, "valid": 12, "invalid": {}}


def test_cli_exits_2_when_nothing_matches(tmp_path):
    out = subprocess.run(
        [*CLI, "validate", str(tmp_path / "nothing-{000..003}.tar")], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "nothing-000.tar" in out.stderr and "does not exist" in out.stderr
    out = subprocess.run([*CLI, "validate", str(tmp_path / "*.tar")], capture_output=True, text=True)
    assert out.returncode == 2 and "matches no .tar file" in out.stderr
