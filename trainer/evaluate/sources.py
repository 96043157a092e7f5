"""Images streamed in batches from a folder of image files or of WebDataset tar shards, as uint8 tensors.

Only a few batches are in memory at a time (the one being processed and the loader's prefetch), whatever the
number of images. Images are decoded with PIL and converted to RGB exactly as torch-fidelity does; with
``size`` they are resized (shorter side, bilinear, PIL's antialiasing) and center-cropped to ``size``, which is
torch-fidelity's ``samples_resize_and_crop``. Without it they are passed at their own size and the feature
network resizes them (the FID Inception resizes to 299 × 299 like TensorFlow 1.x did).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SKIPPED_NAMES = ("grid.png",)  # ldm-sample's overview grid is not a sample


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files of ``folder`` (and its subfolders with ``recursive``), sorted by path."""
    pattern = "**/*" if recursive else "*"
    return sorted(
        p
        for p in folder.glob(pattern)
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name not in SKIPPED_NAMES
    )


def _transform(size: int):
    # torchvision is imported here, not at the top: importing it costs seconds per process (it pulls in
    # torch._dynamo), and ldm-eval recon / adherence never need it
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    to_tensor = TF.pil_to_tensor
    if not size:
        return to_tensor
    return T.Compose([T.Resize(size), T.CenterCrop(size), to_tensor])


class _Files(Dataset):
    def __init__(self, files: list[Path], size: int):
        self.files, self.transform = files, _transform(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.files[i]
        try:
            with Image.open(path) as img:
                return self.transform(img.convert("RGB"))
        except OSError as exc:
            raise OSError(f"{path}: cannot read the image ({exc})") from exc


class _Shards(IterableDataset):
    """The images of tar shards, in shard order; with loader workers, worker w reads shards w, w + W, ..."""

    def __init__(self, shards: list[Path], size: int):
        self.shards, self.transform = shards, _transform(size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        from data_pipeline.tario import iter_shard

        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for shard in mine:
            errors: list = []
            for sample in iter_shard(str(shard), errors):
                data = next((sample.files[k] for k in SHARD_IMAGE_KEYS if k in sample.files), None)
                if data:
                    with Image.open(io.BytesIO(data)) as img:
                        yield self.transform(img.convert("RGB"))
            if errors:
                raise OSError(f"{shard}: {errors[0].detail} ({errors[0].reason})")


@dataclass
class ImageSource:
    """A folder of images or of ``*.tar`` shards; ``count`` is known for image folders only."""

    path: Path
    dataset: Dataset
    count: int | None

    def batches(self, batch_size: int, workers: int = 0) -> Iterator[list[torch.Tensor]]:
        """Lists of (3, H, W) uint8 tensors, in a fixed order (for a given ``workers`` with shards)."""
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        sharded = isinstance(self.dataset, IterableDataset)
        workers = min(workers, len(self.dataset.shards)) if sharded else workers
        loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=list,
            shuffle=False,
            persistent_workers=False,
        )
        yield from loader


def open_source(source: str | Path, size: int = 0, recursive: bool = False) -> ImageSource:
    """An :class:`ImageSource` for a folder of image files, or of tar shards (``*.tar``)."""
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder (of images or of .tar shards)")
    shards = sorted(path.rglob("*.tar") if recursive else path.glob("*.tar"))
    if shards:
        return ImageSource(path, _Shards(shards, size), None)
    files = image_files(path, recursive)
    if not files:
        hint = "" if recursive else " (images in subfolders: --recursive)"
        raise FileNotFoundError(
            f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no .tar shards{hint}"
        )
    return ImageSource(path, _Files(files, size), len(files))


def stack_runs(images: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Batches (B, 3, H, W) of consecutive images of the same size, in order."""
    start = 0
    for i in range(1, len(images) + 1):
        if i == len(images) or images[i].shape != images[start].shape:
            yield torch.stack(images[start:i])
            start = i
