"""Writing shards: synthetic set, from-folder, atomic writes."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from shardmaker import image_bytes

from data_pipeline.shards import AtomicShardWriter, from_folder
from data_pipeline.synthetic import (
    COLOURS,
    NUM_CLASSES,
    POSITIONS,
    SHAPES,
    class_id,
    class_name,
    combinations,
    write_synthetic,
)
from data_pipeline.tario import iter_shard


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_synthetic_is_deterministic_and_carries_ground_truth(tmp_path):
    write_synthetic(str(tmp_path / "a"), 50, 20, 32, seed=3, progress=False)
    write_synthetic(str(tmp_path / "b"), 50, 20, 32, seed=3, workers=2, progress=False)
    write_synthetic(str(tmp_path / "c"), 50, 20, 32, seed=4, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert len(_digest(tmp_path / "a")) == 3
    samples = [s for p in sorted((tmp_path / "a").glob("*.tar")) for s in iter_shard(str(p))]
    assert len(samples) == 50
    for s in samples:
        truth = json.loads(s.files["json"])
        caption = s.files["txt"].decode()
        assert caption == f"a {truth['colour']} {truth['shape']} in the {truth['position']}"
        assert not truth["held_out"]


def test_held_out_combinations_are_unseen_but_every_attribute_is_trained():
    train, held = combinations("train"), combinations("heldout")
    assert len(COLOURS) >= 6 and len(SHAPES) >= 4 and 2 <= len(POSITIONS) <= 4
    assert len(train) + len(held) == len(COLOURS) * len(SHAPES) * len(POSITIONS)
    assert not set(train) & set(held) and len(held) == 12
    for i, values in enumerate((COLOURS, SHAPES, POSITIONS)):
        assert {t[i] for t in train} == set(values)


def test_atomic_writer_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "s.tar"
    with AtomicShardWriter(target) as w:
        w.write({"__key__": "k0", "txt": "first"})
    good = target.read_bytes()
    with pytest.raises(RuntimeError), AtomicShardWriter(target) as w:
        w.write({"__key__": "k1", "txt": "half written"})
        raise RuntimeError("killed mid-shard")
    assert target.read_bytes() == good  # the good shard was not replaced
    assert [p.name for p in tmp_path.iterdir()] == ["s.tar"]  # no temp file left


def _folder(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(7):
        sub = src / "sub" if i % 2 else src
        (sub / f"img{i}.jpg").write_bytes(image_bytes(40, 30, i))
        (sub / f"img{i}.txt").write_text(f"picture number {i}")
    (src / "nocap.jpg").write_bytes(image_bytes(40, 30, 99))  # no caption: skipped and counted
    (src / "broken.png").write_bytes(b"not a png")
    (src / "broken.txt").write_text("broken image")
    return src


def test_from_folder_packs_sorted_deterministic_shards(tmp_path):
    src = _folder(tmp_path)
    s1 = from_folder(str(src), str(tmp_path / "o1"), shard_size=3, workers=2, progress=False)
    from_folder(str(src), str(tmp_path / "o2"), shard_size=3, workers=1, progress=False)
    assert s1["samples"] == 7 and s1["skipped"] == {"missing_caption": 1, "undecodable_image": 1}
    assert _digest(tmp_path / "o1") == _digest(tmp_path / "o2")
    samples = [s for p in sorted((tmp_path / "o1").glob("*.tar")) for s in iter_shard(str(p))]
    keys = [s.key for s in samples]
    assert keys == sorted(keys) and len(set(keys)) == 7
    for s in samples:
        meta = json.loads(s.files["json"])
        n = Path(meta["path"]).stem.removeprefix("img")
        assert s.files["txt"].decode() == f"picture number {n}"
        assert (meta["width"], meta["height"]) == (40, 30)
    assert not list((tmp_path / "o1").glob(".*tmp*"))


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_from_folder_with_caption_listing(tmp_path, kind):
    src = tmp_path / "imgs"
    src.mkdir()
    rows = []
    for i in range(4):
        (src / f"{i}.jpg").write_bytes(image_bytes(32, 32, i))
        rows.append({"path": f"{i}.jpg", "caption": f"listed caption {i}"})
    listing = tmp_path / f"list.{kind}"
    if kind == "csv":
        listing.write_text("path,caption\n" + "".join(f"{r['path']},{r['caption']}\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), listing)
    out = tmp_path / "out"
    summary = from_folder(str(src), str(out), str(listing), shard_size=10, workers=1, progress=False)
    assert summary["samples"] == 4
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert "000000002.txt" in names
        assert tar.extractfile("000000002.txt").read() == b"listed caption 2"


def test_from_folder_names_a_bad_listing(tmp_path):
    (tmp_path / "src").mkdir()
    bad = tmp_path / "l.csv"
    bad.write_text("filename,label\na.jpg,x\n")
    with pytest.raises(ValueError, match=r"l\.csv needs a path column"):
        from_folder(str(tmp_path / "src"), str(tmp_path / "o"), str(bad), progress=False)


def test_synthetic_labels_are_exact_and_leave_the_images_unchanged(tmp_path):
    write_synthetic(str(tmp_path / "plain"), 30, 30, 32, seed=5, progress=False)
    write_synthetic(str(tmp_path / "lab"), 30, 30, 32, seed=5, progress=False, labels=True)
    plain = {s.key: s for p in sorted((tmp_path / "plain").glob("*.tar")) for s in iter_shard(str(p))}
    labelled = [s for p in sorted((tmp_path / "lab").glob("*.tar")) for s in iter_shard(str(p))]
    assert len(labelled) == 30
    for s in labelled:
        assert s.files["jpg"] == plain[s.key].files["jpg"] and s.files["txt"] == plain[s.key].files["txt"]
        truth = json.loads(s.files["json"])
        assert {k: v for k, v in truth.items() if k in json.loads(plain[s.key].files["json"])} == json.loads(
            plain[s.key].files["json"]
        )
        label = truth["class_id"]
        assert label == class_id(truth["colour"], truth["shape"]) and 0 <= label < NUM_CLASSES
        assert class_name(label) == f"{truth['colour']} {truth['shape']}"
        assert truth["box_labels"] == [label] and len(truth["boxes"]) == 1
        mask = np.asarray(Image.open(io.BytesIO(s.files["mask.png"])))
        seg = np.asarray(Image.open(io.BytesIO(s.files["seg.png"])))
        assert mask.shape == seg.shape == (32, 32) and set(np.unique(mask)) == {0, 255}
        assert np.array_equal(seg, (mask == 255) * (label + 1))
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = (v * 32 for v in truth["boxes"][0])
        # a mask pixel is at least half covered, so its centre (i + 0.5) is inside the box; the box is tight:
        # the pixels just outside the mask are less than half covered, so the box ends within them
        assert x0 <= xs.min() + 0.5 and xs.max() + 0.5 <= x1 and y0 <= ys.min() + 0.5 and ys.max() + 0.5 <= y1
        assert xs.min() - 1 <= x0 and x1 <= xs.max() + 2 and ys.min() - 1 <= y0 and y1 <= ys.max() + 2
        row, col = truth["position"].split()
        assert ((x0 + x1) / 2 > 16) == (col == "right") and ((y0 + y1) / 2 > 16) == (row == "bottom")
