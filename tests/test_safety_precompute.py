"""Issue 15, ldm-precompute: stale or colliding outputs are recomputed or refused, one job per output folder,
and a stop signal loses no finished shard (real processes)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from safetensors.torch import load as safetensors_load
from test_precompute import precompute, precompute_cmd, read_latents
from trainrun import ROOT, env, kill_tree

from data_pipeline.latents import LATENT_EXT, MANIFEST
from data_pipeline.tario import iter_shard
from data_pipeline.urls import expand_shards

pytestmark = pytest.mark.slow


def failed(out, data, ae, extra=()) -> subprocess.CompletedProcess:
    res = subprocess.run(precompute_cmd(out, data, ae, extra), cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert res.returncode != 0
    return res


def stored_shape(folder) -> tuple[int, ...]:
    shard = expand_shards(str(folder))[0]
    return tuple(safetensors_load(next(iter_shard(shard)).files[LATENT_EXT])["mean"].shape)


def test_a_rerun_with_other_settings_re_encodes_instead_of_trusting_old_shards(
    tmp_path, synth_shards, tiny_ae
):
    ae, _ = tiny_ae
    out = tmp_path / "lat"
    precompute(out, synth_shards, ae, ["data.resolution=16"])
    assert stored_shape(out) == (4, 4, 4)
    precompute(out, synth_shards, ae, ["data.resolution=32"])
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["settings"]["resolution"] == 32 and manifest["settings"]["latent_shape"] == [4, 8, 8]
    assert stored_shape(out) == (4, 8, 8) and manifest["samples"] == 320  # every shard re-encoded


def test_inputs_that_collide_or_would_be_overwritten_are_refused(tmp_path, synth_shards, tiny_ae):
    ae, _ = tiny_ae
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        shutil.copy(sorted(synth_shards.glob("*.tar"))[0], folder / "train-000000.tar")
    res = failed(tmp_path / "out", [str(a), str(b)], ae)
    assert "would both write" in res.stderr and "train-000000.tar" in res.stderr
    assert not (tmp_path / "out" / MANIFEST).exists()
    before = (a / "train-000000.tar").read_bytes()
    res = failed(a, str(a), ae)
    assert "is a folder of the input shards" in res.stderr
    assert (a / "train-000000.tar").read_bytes() == before and not (a / "_manifest").exists()  # untouched


def test_two_precompute_jobs_on_one_output_folder_refuse_the_second(tmp_path, synth_shards, tiny_ae):
    ae, _ = tiny_ae
    out = tmp_path / "lat"
    first = subprocess.Popen(precompute_cmd(out, synth_shards, ae, ["pause_after_shards=1"]), cwd=ROOT, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 600
        while not (out / "PAUSED").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        res = failed(out, synth_shards, ae)
        assert "is in use by another ldm-precompute job" in res.stderr and "pid" in res.stderr
    finally:
        kill_tree(first)  # torchrun's ranks run in sessions of their own: killpg alone leaves them running


def test_a_stop_signal_keeps_finished_shards_and_the_rerun_completes_them(tmp_path, synth_shards, tiny_ae):
    ae, _ = tiny_ae
    clean, stopped = tmp_path / "clean", tmp_path / "stopped"
    precompute(clean, synth_shards, ae)
    proc = subprocess.Popen(precompute_cmd(stopped, synth_shards, ae, ["pause_after_shards=1"]), cwd=ROOT,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 600
    while not (stopped / "PAUSED").exists():  # rank 0 finished a shard and waits for a signal
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-2000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # the launcher, its ranks and their DataLoader workers
    proc.wait(timeout=300)  # (torchrun's agent itself exits non-zero after a signal; its ranks exit 0)
    err = proc.stdout.read()
    assert (
        err.count("stopped by a signal; finished shards are kept") == 2 and "ChildFailedError" not in err
    ), err
    assert (stopped / "PREEMPTED").is_file() and not (stopped / MANIFEST).exists()
    assert not list(stopped.glob(".*.tmp-*"))  # the unfinished shards were discarded
    precompute(stopped, synth_shards, ae)
    assert read_latents(stopped) == read_latents(clean)
