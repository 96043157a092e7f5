"""Reading W&B's offline transaction logs (``run-<id>.wandb``) back: the SDK's protobuf records
(``wandb.proto.wandb_internal_pb2.Record``) framed as a LevelDB-style log (32 KiB blocks, 7-byte chunk headers,
after a 7-byte ``:W&B`` file header)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, size, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if size == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + size]
        pos += 7 + size
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def read_run(path: Path) -> dict:
    """``{"id", "name", "steps": [history steps in order], "artifacts": [(name, type)]}`` of one session."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict = {"id": None, "name": None, "steps": [], "artifacts": []}
    for raw in raw_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["name"] = rec.run.run_id, rec.run.display_name
        elif kind == "history":
            out["steps"].append(rec.history.step.num)
        elif kind == "artifact":
            out["artifacts"].append((rec.artifact.name, rec.artifact.type))
    return out
