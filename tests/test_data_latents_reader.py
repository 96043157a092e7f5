"""Issue 17, item 5: the latent loader's byte-range reader agrees with safetensors and refuses what it must."""

from __future__ import annotations

import itertools
import json
import struct

import pytest
import torch
from safetensors.torch import load, save

from data_pipeline.errors import SampleError
from data_pipeline.latents import LATENT_EXT, LatentDecoder, LatentShardsConfig
from data_pipeline.rawtensors import Layouts, stack, tensor_bytes
from data_pipeline.tario import RawSample
from data_pipeline.transforms import SampleRandom, sample_rng


def raw(key: str, tensors: dict, caption: str = "a cat\na dog", meta: dict | None = None) -> RawSample:
    files = {LATENT_EXT: save(tensors), "txt": caption.encode()}
    files["json"] = json.dumps(meta or {"original_size": [300, 400], "crop_top_left": [0, 21]}).encode()
    return RawSample(key, "s.tar", files)


def latent(i: int, dtype=torch.float16, shape=(4, 8, 8)) -> dict:
    g = torch.Generator().manual_seed(i)
    return {
        "mean": torch.randn(shape, generator=g).to(dtype),
        "std": torch.rand(shape, generator=g).to(dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_batches_equal_safetensors_loads_stacked(dtype):
    cfg = LatentShardsConfig(caption_dropout=0.5, caption_choice="random")
    null = torch.zeros(3, 16, dtype=dtype)
    decode = LatentDecoder(cfg, null, (dtype, (4, 8, 8)))
    samples = []
    for i in range(12):
        t = latent(i, dtype) | {"text": torch.randn(2, 3, 16).to(dtype)}
        samples.append((raw(f"k{i}", t), t))
    items = [decode(r, epoch=1) for r, _ in samples]
    batch = decode.collate(items)
    assert torch.equal(batch["latent_mean"], torch.stack([t["mean"] for _, t in samples]))
    assert torch.equal(
        batch["latent_std"], torch.stack([load(r.files[LATENT_EXT])["std"] for r, _ in samples])
    )
    assert batch["latent_mean"].dtype == dtype and batch["latent_mean"].shape == (12, 4, 8, 8)
    assert batch["original_size"].tolist() == [[300, 400]] * 12 and batch["crop_top_left"][0].tolist() == [
        0,
        21,
    ]
    for (_, t), caption, tokens in zip(samples, batch["caption"], batch["text_tokens"], strict=True):
        expected = null if caption == "" else t["text"][["a cat", "a dog"].index(caption)]
        assert torch.equal(tokens, expected)
    assert "" in batch["caption"] and {"a cat", "a dog"} & set(batch["caption"])
    batch["latent_mean"].add_(1)  # the batch owns writable memory


@pytest.mark.parametrize(
    "case,data,message",
    [
        ("too short", b"\x01\x00", "too short"),
        ("header runs past the end", struct.pack("<Q", 10**6) + b"{}", "runs past the end"),
        ("not json", struct.pack("<Q", 3) + b"{x}", "not JSON"),
        ("unknown dtype", None, "unknown dtype"),
        ("offsets disagree with shape", None, "do not hold"),
        ("trailing bytes", None, "but the header describes"),
        ("wrong shape", None, r"expected torch.float16\[4, 8, 8\]"),
        ("no std", None, "no mean/std"),
    ],
)
def test_malformed_or_mismatched_latents_are_bad_samples(case, data, message):
    good = save(latent(0))
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + n])
    if case == "unknown dtype":
        header["mean"]["dtype"] = "F8_E9"
    if case == "offsets disagree with shape":
        header["mean"]["shape"] = [4, 8, 9]
    if data is None and case in ("unknown dtype", "offsets disagree with shape"):
        head = json.dumps(header).encode()
        data = struct.pack("<Q", len(head)) + head + good[8 + n :]
    if case == "trailing bytes":
        data = good + b"\0"
    if case == "wrong shape":
        data = save(latent(0, shape=(4, 8, 16)))
    if case == "no std":
        data = save({"mean": latent(0)["mean"]})
    sample = raw("k", {})
    sample.files[LATENT_EXT] = data
    decode = LatentDecoder(LatentShardsConfig(), None, (torch.float16, (4, 8, 8)))
    with pytest.raises(SampleError, match=message) as exc:
        decode(sample, 0)
    assert exc.value.reason == "bad_latent" and "s.tar:k" in str(exc.value)


def test_layouts_agree_with_safetensors_on_every_dtype():
    tensors = {
        "a": torch.arange(6, dtype=torch.int64).view(2, 3),
        "b": torch.tensor([True, False]),
        "c": torch.randn(3, 1).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
    }
    data = save(tensors, metadata={"note": "kept out of the layout"})
    layout = Layouts().parse(data)
    assert sorted(layout) == sorted(tensors)
    for name, t in tensors.items():
        e = layout[name]
        got = stack([memoryview(data)[e.start : e.end]], e.dtype, e.shape)[0]
        assert torch.equal(got, t) and got.dtype == t.dtype
    assert tensor_bytes(tensors["c"]) == bytes(memoryview(data)[layout["c"].start : layout["c"].end])


def test_sample_random_is_seeded_per_sample_and_uniform():
    a = [sample_rng(0, 1, "key").random() for _ in range(3)]
    assert a == [sample_rng(0, 1, "key").random() for _ in range(3)]
    r = SampleRandom("x")
    draws = [r.random() for _ in range(20_000)]  # crosses many 8-draw digests
    assert min(draws) >= 0 and max(draws) < 1 and abs(sum(draws) / len(draws) - 0.5) < 0.01
    assert len(set(draws)) == len(draws)
    counts = [0] * 5
    for _ in range(10_000):
        counts[r.randrange(5)] += 1
    assert all(1800 < c < 2200 for c in counts)
    assert {r.randint(3, 4) for _ in range(100)} == {3, 4}
    firsts = {sample_rng(0, e, k).random() for e, k in itertools.product(range(3), "abc")}
    assert len(firsts) == 9
