"""Counting what a training step makes the host wait for: device-to-host reads (``.item()``, ``bool()``,
``.tolist()``, ``nonzero``) and collectives (with the bytes they move), each by the code that asked for it
(ours, DeepSpeed's, or other). Used by ``bench/host_syncs.py`` and its test; costs nothing when not active.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default, aten.equal.default}
_ROOT = Path(__file__).resolve().parents[2]
OURS = (str(_ROOT / "trainer"), str(_ROOT / "data_pipeline"))


def origin() -> str:
    """``torch.optim:<f>``, ``deepspeed:<f>`` or ``ours:<file>:<f>`` for the innermost such frame, else
    ``other``."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        name = frame.filename
        if name == __file__:
            continue
        if "/torch/optim/" in name:  # e.g. AdamW reading its per-parameter step counts (CPU scalars)
            return f"torch.optim:{frame.name}"
        if "/deepspeed/" in name:
            return f"deepspeed:{frame.name}"
        if name.startswith(OURS):
            return f"ours:{Path(name).name}:{frame.name}"
    return "other"


def _bytes(args) -> int:
    """A collective's message size: its largest tensor argument (all-reduce: the tensor; all-gather: the
    gathered output; reduce-scatter: the input)."""
    sizes = [0]
    for a in args:
        if isinstance(a, torch.Tensor):
            sizes.append(a.numel() * a.element_size())
        elif isinstance(a, list | tuple):
            sizes.append(_bytes(a))
    return max(sizes)


class HostSyncs(TorchDispatchMode):
    """``with HostSyncs() as s: ...`` then ``s.reads`` / ``s.collectives`` (Counters by origin) and ``s.bytes``.

    ``device``: count only reads of tensors on that device type (on a GPU run the CPU control flags are free);
    None counts every read (on CPU everything lives on the host, so the origin is what tells them apart)."""

    def __init__(self, device: str | None = None):
        super().__init__()
        self.device = device
        self.reads: Counter = Counter()
        self.collectives: Counter = Counter()
        self.bytes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            t = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if self.device is None or (t is not None and t.device.type == self.device):
                self.reads[origin()] += 1
        elif func.namespace == "c10d":
            where = origin()
            self.collectives[where] += 1
            self.bytes[where] += _bytes(args)
        return func(*args, **(kwargs or {}))
