"""Safetensors files read as byte ranges, without a torch call per sample.

The latent loader copies each sample's bytes straight into its batch's tensors: one copy and one tensor per
batch instead of ``safetensors.torch.load`` per sample (two tensors, a reshape each, ~20 us). The header is
JSON, parsed once per distinct header (the samples of a shard share one) and checked as safetensors checks
it: a known dtype, a byte range that matches the shape, ranges inside the file and covering it. Nothing in the
file is executed; a file that fails a check raises ``ValueError`` naming what is wrong.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass

import torch

DTYPES = {  # safetensors' names
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 << 20  # safetensors' own limit


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: its dtype, shape and absolute byte range."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _entry(name: str, spec: object, base: int) -> Entry:
    if not isinstance(spec, dict):
        raise ValueError(f"tensor {name!r} has no description")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPES:
        raise ValueError(f"tensor {name!r} has an unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f"tensor {name!r} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ValueError(f"tensor {name!r} has malformed data_offsets {offsets!r}")
    start, end = offsets
    size = math.prod(shape) * DTYPES[dtype].itemsize
    if not 0 <= start <= end or end - start != size:
        raise ValueError(f"tensor {name!r}: data_offsets {offsets} do not hold {dtype}{shape} ({size} bytes)")
    return Entry(DTYPES[dtype], tuple(shape), base + start, base + end)


class Layouts:
    """Parses safetensors headers, remembering the last ones seen (most files of a shard share theirs)."""

    def __init__(self, keep: int = 64):
        self.keep = keep
        self._seen: dict[bytes, tuple[dict[str, Entry], int]] = {}

    def parse(self, data: bytes) -> dict[str, Entry]:
        """The tensors of the safetensors file ``data`` by name; ValueError when it is malformed."""
        if len(data) < 8:
            raise ValueError(f"{len(data)} bytes: too short for a safetensors file")
        n = int.from_bytes(data[:8], "little")
        if n > min(MAX_HEADER, len(data) - 8):
            raise ValueError(f"header length {n} runs past the end of the file ({len(data)} bytes)")
        head = data[8 : 8 + n]
        known = self._seen.get(head)
        if known is None:
            known = self._parse(head, 8 + n)
            if len(self._seen) >= self.keep:
                self._seen.clear()
            self._seen[head] = known
        layout, size = known
        if len(data) != size:
            raise ValueError(f"{len(data)} bytes, but the header describes {size}")
        return layout

    @staticmethod
    def _parse(head: bytes, base: int) -> tuple[dict[str, Entry], int]:
        try:
            spec = json.loads(head)
        except ValueError as exc:
            raise ValueError(f"the header is not JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise ValueError("the header is not a JSON object")
        layout = {name: _entry(name, s, base) for name, s in spec.items() if name != "__metadata__"}
        ranges = sorted((e.start, e.end) for e in layout.values())
        for (_, end), (start, _) in itertools.pairwise(ranges):
            if start < end:
                raise ValueError("tensors overlap")
        return layout, max((e.end for e in layout.values()), default=base)


def stack(parts: list, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """One tensor ``(len(parts), *shape)`` from byte ranges of that dtype and shape (one copy each)."""
    buffer = bytearray().join(parts)
    if not buffer:
        return torch.empty((len(parts), *shape), dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).view(len(parts), *shape)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes as safetensors stores them (any dtype, bf16 included)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()
