"""Loading checkpoint files never runs pickled code.

Every ``torch.load`` made while :func:`weights_only_loads` is active — ours, DeepSpeed's ``load_checkpoint``,
``zero_to_fp32`` — runs with ``weights_only=True`` (torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), admitting
tensors, containers and the four plain DeepSpeed types its optimizer states hold. A file holding anything
else (a pickle planted to run a command) is refused with :class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from data_pipeline.errors import InputError


class UnsafeCheckpointError(InputError):
    """A checkpoint file holds objects other than tensors and plain data: refused, nothing was run."""


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its checkpoints pickle (plain data: an enum, a dataclass, the loss scalers: static
    for bf16, dynamic for fp16 under ZeRO 1-3)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads(where: str | Path) -> Iterator[None]:
    """Force ``weights_only=True`` on every ``torch.load`` inside; ``where`` names the checkpoint in errors."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise UnsafeCheckpointError(
            f"{where}: a checkpoint file holds more than tensors and plain data, refused (loading it could run "
            f"code): {first}"
        ) from None
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
