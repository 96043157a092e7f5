"""Two real processes with a gloo process group: each rank's loader reads disjoint samples covering the epoch."""

from __future__ import annotations

import json
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from data_pipeline.images import ImageShards, ImageShardsConfig


def _rank_main(rank: int, world: int, port: int, urls: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = ImageShardsConfig(urls=urls, resolution=32, batch_size=4, num_workers=2, shuffle_buffer=20)
    loader = ImageShards(cfg).loader()  # rank and world size from the process group
    keys, epochs_done = [], set()
    it = iter(loader)
    while len(epochs_done) < 2:  # until both workers of this rank have moved to epoch 1
        batch = next(it)
        for k, e in zip(batch["key"], batch["epoch"].tolist(), strict=True):
            if e == 0:
                keys.append(k)
        epochs_done = {w for w, c in enumerate(loader.cursors) if c.epoch >= 1}
    gathered = [None] * world
    dist.all_gather_object(gathered, keys)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


@pytest.mark.slow  # spawns two ranks
def test_two_ranks_see_disjoint_samples_covering_the_epoch(synth_shards, tmp_path):
    out = tmp_path / "keys.json"
    port = 29500 + os.getpid() % 1000
    mp.spawn(_rank_main, args=(2, port, str(synth_shards), str(out)), nprocs=2, join=True)
    ranks = json.loads(out.read_text())
    assert all(len(r) == len(set(r)) for r in ranks)
    assert not set(ranks[0]) & set(ranks[1])
    assert set(ranks[0]) | set(ranks[1]) == {f"{i:08d}" for i in range(320)}
    assert abs(len(ranks[0]) - len(ranks[1])) <= 40  # one shard at most
