"""The streaming loader: batches, skip counters, bad-fraction abort, exact resume, rank/worker splits."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from data_pipeline.errors import DataQualityError, ShardNotFoundError
from data_pipeline.images import ImageShards, ImageShardsConfig


def cfg_for(urls, **kw) -> ImageShardsConfig:
    base = dict(urls=str(urls), resolution=32, batch_size=4, num_workers=0, shuffle_buffer=16, seed=1)
    base.update(kw)
    return ImageShardsConfig(**base)


def build_loader(cfg: ImageShardsConfig, rank: int = 0, world_size: int = 1):
    return ImageShards(cfg).loader(rank, world_size)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_batches_have_the_documented_layout(synth_shards):
    batch = take(build_loader(cfg_for(synth_shards, keep_json=True)), 1)[0]
    img = batch["image"]
    assert img.shape == (4, 3, 32, 32) and img.dtype == torch.uint8
    assert img.is_contiguous(memory_format=torch.channels_last)
    assert len(batch["caption"]) == 4 and all(c.startswith("a ") for c in batch["caption"])
    assert batch["original_size"].tolist() == [[32, 32]] * 4
    assert all(j["caption"] == c for j, c in zip(batch["json"], batch["caption"], strict=True))
    assert batch["epoch"].tolist() == [0, 0, 0, 0]


def test_img2dataset_shards_resize_crop_and_flip(img2dataset_dir):
    loader = build_loader(cfg_for(img2dataset_dir, resolution=24, crop="random", hflip=True, batch_size=6))
    batches = take(loader, 2)
    keys = sorted(k for b in batches for k in b["key"])
    assert keys == sorted(f"{s:05d}{i:04d}" for s in range(2) for i in range(6))
    assert batches[0]["image"].shape == (6, 3, 24, 24)
    assert batches[0]["original_size"][0].tolist() == [60, 80]
    # 80x60 -> 32x24: a random crop moves only horizontally, within [0, 8]
    crops = [tuple(c) for b in batches for c in b["crop_top_left"].tolist()]
    assert all(top == 0 and 0 <= left <= 8 for top, left in crops) and len(set(crops)) > 1


def test_caption_choice_and_dropout_are_per_sample_and_seeded(corrupt_set):
    folder, _ = corrupt_set
    cfg = cfg_for(
        f"{folder}/a.tar",
        min_size=16,
        max_pixels=100_000,
        batch_size=1,
        shuffle_buffer=1,
        caption_choice="random",
        max_bad_fraction=1.0,
    )
    picked = {b["caption"][0] for b in take(build_loader(cfg), 60) if b["key"][0] == "a9"}
    assert picked == {"a png", "second caption"}  # both lines of a9's caption get picked across epochs
    first = build_loader(ImageShardsConfig(**{**vars(cfg), "caption_choice": "first"}))
    assert {b["caption"][0] for b in take(first, 60) if b["key"][0] == "a9"} == {"a png"}

    def captions(p):
        c = cfg_for(folder, caption_dropout=p, min_size=16, max_pixels=100_000, max_bad_fraction=1.0)
        return [x for b in take(build_loader(c), 10) for x in b["caption"]]

    assert all(c == "" for c in captions(1.0))
    half = captions(0.5)
    assert half == captions(0.5)  # seeded: the same samples are dropped again
    assert 5 <= half.count("") <= 35


def test_skip_counters_match_validate_over_one_epoch(corrupt_set):
    folder, expected = corrupt_set
    cfg = cfg_for(
        folder,
        batch_size=1,
        shuffle_buffer=1,
        shard_shuffle=False,
        min_size=16,
        max_pixels=100_000,
        max_bad_fraction=1.0,
    )
    loader = build_loader(cfg)
    last = None
    for batch in loader:
        if batch["epoch"][0] == 1:
            break
        last = loader.counters()
    assert last["skipped"] == expected["invalid"]
    assert last["valid"] == expected["valid"] and last["seen"] == expected["total"]


def test_too_many_bad_samples_abort_with_a_clear_error(corrupt_set):
    folder, _ = corrupt_set
    cfg = cfg_for(
        f"{folder}/a.tar",
        min_size=16,
        max_pixels=100_000,
        max_bad_fraction=0.2,
        bad_fraction_min_samples=5,
        shuffle_buffer=1,
    )
    with pytest.raises(DataQualityError, match=r"data.max_bad_fraction=0.2"):
        take(build_loader(cfg), 5)


def test_bad_configs_fail_at_start(synth_shards, tmp_path):
    with pytest.raises(ValueError, match="pipe: URLs run shell commands"):
        build_loader(cfg_for("pipe:cat /etc/passwd"))
    with pytest.raises(ShardNotFoundError, match="does not exist"):
        build_loader(cfg_for(tmp_path / "x-{0..3}.tar"))
    with pytest.raises(ShardNotFoundError, match=r"data\.urls is empty"):
        build_loader(ImageShardsConfig(urls=[]))
    with pytest.raises(ValueError, match=r"8 shards cannot feed 3 ranks x 4 workers"):
        build_loader(cfg_for(synth_shards, num_workers=4), 0, 3)
    with pytest.raises(ValueError, match="epoch_samples"):
        build_loader(cfg_for(synth_shards, resampled=True))


def test_pipe_urls_work_when_allowed(synth_shards):
    url = f"pipe:cat {synth_shards}/train-000000.tar"
    batch = take(build_loader(cfg_for(url, allow_pipe=True, shuffle_buffer=1)), 1)[0]
    assert batch["key"] == ["00000000", "00000001", "00000002", "00000003"]


def _keys(batches):
    return [k for b in batches for k in b["key"]]


@pytest.mark.parametrize("workers,resampled", [(0, False), (2, False), (2, True)])
def test_resume_continues_exactly(synth_shards, workers, resampled):
    cfg = cfg_for(
        synth_shards,
        num_workers=workers,
        resampled=resampled,
        epoch_samples=200 if resampled else 0,
        crop="random",
        hflip=True,
        caption_dropout=0.3,
    )
    full = take(build_loader(cfg), 23)  # crosses at least one epoch boundary per worker
    first = build_loader(cfg)
    head = take(first, 9)
    state = first.state_dict()
    second = build_loader(cfg)
    second.load_state_dict(state)
    tail = take(second, 14)
    assert _keys(head + tail) == _keys(full)
    for a, b in zip(head + tail, full, strict=True):
        assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
        assert torch.equal(a["epoch"], b["epoch"])
    assert second.counters() == build_loader_counters(cfg, 23)


def build_loader_counters(cfg, n):
    loader = build_loader(cfg)
    take(loader, n)
    return loader.counters()


def test_resume_over_corrupt_shards_keeps_counts_exact(corrupt_set):
    folder, _ = corrupt_set
    cfg = cfg_for(
        folder, batch_size=2, shuffle_buffer=5, min_size=16, max_pixels=100_000, max_bad_fraction=1.0
    )
    full = build_loader(cfg)
    ref = take(full, 12)
    for k in (1, 4, 7):
        a = build_loader(cfg)
        head = take(a, k)
        b = build_loader(cfg)
        b.load_state_dict(a.state_dict())
        assert _keys(head + take(b, 12 - k)) == _keys(ref)
        assert b.counters() == full.counters()


def test_every_epoch_covers_the_data_once_per_rank_split(synth_shards):
    """Two ranks x two workers (computed in one process): disjoint, complete epoch 0."""
    seen = []
    for rank in range(2):
        loader = build_loader(cfg_for(synth_shards, num_workers=2, batch_size=5), rank, 2)
        keys = []
        for batch in itertools.islice(iter(loader), 60):
            keys += [k for k, e in zip(batch["key"], batch["epoch"].tolist(), strict=True) if e == 0]
        seen.append(keys)
    assert len(seen[0]) == len(set(seen[0])) and not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {f"{i:08d}" for i in range(320)}


def test_world_size_change_restarts_the_epoch_in_progress(synth_shards, caplog):
    a = build_loader(cfg_for(synth_shards, batch_size=5), 0, 2)
    take(a, 40)  # 200 samples: into epoch 1 (160 samples per rank per epoch)
    b = build_loader(cfg_for(synth_shards, batch_size=5), 0, 1)
    with caplog.at_level(logging.WARNING):
        b.load_state_dict(a.state_dict())
    assert "restarting epoch 1" in caplog.text
    batch = take(b, 1)[0]
    assert batch["epoch"].tolist() == [1] * 5
    assert b.counters()["valid"] == a.counters()["valid"] + 5


def test_labels_follow_the_crop_and_flip_of_their_image(synth_labelled):
    """class ids, boxes and segmentation maps pass through as batch keys; boxes and maps move with a random crop,
    a resize and a flip exactly as the pixels do, and `dropped` marks the samples whose caption was dropped."""
    cfg = cfg_for(synth_labelled, resolution=24, crop="random", hflip=True, caption_dropout=0.3, batch_size=16,
                  fields=["class_id", "boxes", "box_labels"], box_fields=["boxes"], maps=["seg.png", "mask.png"])  # fmt: skip
    batches = take(build_loader(cfg), 4)
    assert ImageShards(cfg).batch_keys() >= {"class_id", "boxes", "box_labels", "seg", "mask", "dropped"}
    flipped_any = False
    for batch in batches:
        assert batch["class_id"].dtype == torch.long and batch["seg"].shape == (16, 1, 24, 24)
        assert torch.equal(batch["dropped"], torch.tensor([c == "" for c in batch["caption"]]))
        for i in range(16):
            seg, label = batch["seg"][i, 0], int(batch["class_id"][i])
            assert set(seg.unique().tolist()) <= {0, label + 1} and batch["box_labels"][i] == [label]
            assert torch.equal(batch["mask"][i, 0] == 255, seg == label + 1)
            ys, xs = torch.nonzero(seg).T
            x0, y0, x1, y1 = (v * 24 for v in batch["boxes"][i][0])
            assert x0 - 1 <= xs.min() + 0.5 and xs.max() + 0.5 <= x1 + 1
            assert y0 - 1 <= ys.min() + 0.5 and ys.max() + 0.5 <= y1 + 1
            # the shape's colour is where the map says: the masked pixels differ from the background
            img = batch["image"][i].float()
            inside, outside = img[:, seg > 0].mean(1), img[:, seg == 0].mean(1)
            assert (inside - outside).abs().max() > 20
            flipped_any |= batch["boxes"][i][0][0] > 0.5 and "left" in batch["caption"][i]
    assert flipped_any  # some flipped samples (a "left" shape now on the right)
    assert any(batch["dropped"].any() for batch in batches)


def test_label_config_errors_name_the_key(synth_labelled):
    from data_pipeline.errors import InputError

    with pytest.raises(InputError, match=r"data\.box_fields"):
        ImageShards(cfg_for(synth_labelled, box_fields=["boxes"]))
    with pytest.raises(InputError, match=r"data\.maps"):
        ImageShards(cfg_for(synth_labelled, maps=["seg.jpg"]))
    with pytest.raises(InputError, match=r"data\.fields"):
        ImageShards(cfg_for(synth_labelled, fields=["image"]))
    from data_pipeline.errors import SampleError
    from data_pipeline.images import ImageDecoder
    from data_pipeline.tario import iter_shard

    raw = next(iter_shard(str(sorted(synth_labelled.glob("*.tar"))[0])))
    with pytest.raises(SampleError, match="no_such_field") as err:
        ImageDecoder(cfg_for(synth_labelled, fields=["no_such_field"]))(raw, 0)
    assert err.value.reason == "missing_label"
    del raw.files["seg.png"]
    with pytest.raises(SampleError, match=r"seg\.png") as err:
        ImageDecoder(cfg_for(synth_labelled, maps=["seg.png"]))(raw, 0)
    assert err.value.reason == "missing_label"
