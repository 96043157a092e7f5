"""Shared fixtures: small data sets the project generates, and hand-made (img2dataset-style, corrupted) shards."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from shardmaker import image_bytes, img2dataset_shard, member_end, write_tar

from data_pipeline.synthetic import write_synthetic

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> Path:
    """8 shards x 40 synthetic 32px samples."""
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(str(out), num=320, shard_size=40, size=32, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def synth_labelled(tmp_path_factory) -> Path:
    """8 shards x 40 synthetic 32px samples with class ids, boxes, masks and segmentation maps."""
    out = tmp_path_factory.mktemp("synth_labelled")
    write_synthetic(str(out), num=320, shard_size=40, size=32, seed=0, progress=False, labels=True)
    return out


@pytest.fixture(scope="session")
def corrupt_set(tmp_path_factory) -> tuple[Path, dict]:
    """Shards with known faults; returns the folder and the exact counts validate must report
    (with min_size=16 and max_pixels=100_000)."""
    d = tmp_path_factory.mktemp("corrupt")
    good = [(f"g{i}", image_bytes(32, 32, i), f"caption {i}") for i in range(8)]

    def sample(key, img=None, txt=None, ext="jpg"):
        out = []
        if img is not None:
            out.append((f"{key}.{ext}", img))
        if txt is not None:
            out.append((f"{key}.txt", txt))
        return out

    # shard a: one of each per-sample fault among valid samples; it ends with a valid sample
    a = []
    a += sample("a0", good[0][1], b"a red circle")
    a += sample("a1", b"\x00not an image at all" * 10, b"garbage bytes")
    a += sample("a2", b"", b"zero byte image")
    a += sample("a3", good[1][1], None)
    a += sample("a4", good[2][1], b"\xff\xfe\xfa not utf-8")
    a += sample("a5", image_bytes(8, 8, 5), b"too small")
    a += sample("a6", image_bytes(400, 300, 6), b"too many pixels")
    a += sample("a7", None, b"caption without image")
    a += sample("a8", image_bytes(64, 64, 8)[:200], b"truncated jpeg data")
    a += sample("a9", image_bytes(48, 32, 9, "PNG"), b"a png\nsecond caption", ext="png")
    a += sample("a10", good[3][1], b"last one is valid")
    write_tar(d / "a.tar", a)
    # shard b: 3 complete samples, then cut inside the 4th sample's image data
    b = []
    for i in range(4):
        b += sample(f"b{i}", image_bytes(32, 32, 20 + i), f"b {i}".encode())
    write_tar(d / "b.tar", b, cut=member_end(b, 6) + 512 + 100)
    # shard c: not a tar at all
    (d / "c.tar").write_bytes(b"this is not a tar archive" * 40)
    # shard d: cut exactly at a member boundary (after 2 complete samples, no end-of-archive marker)
    dd = []
    for i in range(3):
        dd += sample(f"d{i}", image_bytes(32, 32, 30 + i), f"d {i}".encode())
    write_tar(d / "d.tar", dd, cut=member_end(dd, 4))
    # shard e: clean, last in name order
    e = []
    for i in range(2):
        e += sample(f"e{i}", image_bytes(32, 32, 40 + i), f"e {i}".encode())
    write_tar(d / "e.tar", e)
    expected = {
        # a: a0 a9 a10 valid; b: 3; d: 2; e: 2
        "valid": 3 + 3 + 2 + 2,
        "invalid": {
            "undecodable_image": 2,
            "zero_byte": 1,
            "missing_caption": 1,
            "non_utf8_caption": 1,
            "too_small": 1,
            "too_many_pixels": 1,
            "missing_image": 1,
            "truncated_tar": 2,
            "unreadable_tar": 1,
        },
    }
    expected["total"] = expected["valid"] + sum(expected["invalid"].values())
    return d, expected


@pytest.fixture(scope="session")
def img2dataset_dir(tmp_path_factory) -> Path:
    """Two shards laid out exactly as img2dataset writes them."""
    d = tmp_path_factory.mktemp("img2dataset")
    for shard in range(2):
        samples = [
            {
                "key": f"{shard:05d}{i:04d}",
                "jpg": image_bytes(80, 60, 100 * shard + i),
                "txt": f"photo {shard}-{i}",
                "w": 80,
                "h": 60,
            }
            for i in range(6)
        ]
        img2dataset_shard(d, shard, samples)
    return d


@pytest.fixture(scope="session")
def tiny_ae(tmp_path_factory):
    """A (random) tiny autoencoder saved as our export: every run that uses it gets these exact weights."""
    import json

    from presets import model as preset_model
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("ae")
    model = preset_model("autoencoder/tiny", seed=123)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "autoencoder.safetensors")
    )
    (folder / "autoencoder.json").write_text(json.dumps({"scale_factor": 0.5}))
    return folder, model.eval()


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real two-node Slurm cluster on this machine (slurm/localcluster.py), installed and started when it is
    missing (as root). When that cannot be done here, the tests that need it fail with one line naming the
    command to run (never a skip: the scheduler is a real component)."""
    from slurm import localcluster

    was_up = localcluster.status().startswith("n1 idle")
    try:
        conf = localcluster.up()
    except localcluster.ClusterUnavailable as exc:
        pytest.fail(f"no local Slurm cluster: {exc}", pytrace=False)
    os.environ["SLURM_CONF"] = str(conf)
    yield conf
    if not was_up:
        localcluster.down()


# -- the checkout stays clean: tests write only under temp dirs ------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
CACHES = (".venv/", ".cache/", ".pytest_cache/", ".ruff_cache/")  # tool caches, ignored by git


def checkout_state() -> set[str]:
    """Changed, untracked and ignored paths of the checkout (``git status``), but for tool caches."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored=matching", "--untracked-files=all"],
                         cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    if out.returncode != 0:
        return set()
    paths = {line[3:] for line in out.stdout.splitlines()}
    return {p for p in paths if not p.startswith(CACHES) and "__pycache__" not in p}


def pytest_configure(config):
    """Under pytest-xdist each worker (and every process a test starts) computes with one thread: two workers
    share two cores, and two intra-op threads per process on a shared core mostly wait on each other."""
    if hasattr(config, "workerinput"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# The longest files first (measured: make test's --durations): under ``--dist loadfile`` the two workers then
# finish together instead of one running a long file alone at the end.
LONGEST_FIRST = ("test_slurm.py", "test_safety_runs.py", "test_elastic_resume.py", "test_demo.py",
                 "test_safety_precompute.py", "test_precompute.py", "test_train_engine.py", "test_modes.py",
                 "test_evaluate_fidelity.py", "test_train_config.py", "test_remote_shards.py", "test_host_syncs.py",
                 "test_package.py")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order within each rank


def pytest_sessionstart(session):
    session.config._checkout_before = checkout_state()


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):
        return  # the controller checks once, after every worker has finished
    written = checkout_state() - session.config._checkout_before
    if written:
        print(
            f"\nFAILED: the tests wrote into the checkout (they must write under temp dirs): {sorted(written)}"
        )
        session.exitstatus = 1
