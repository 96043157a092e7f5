"""Loading a ZeRO checkpoint on another number of ranks, through DeepSpeed's universal checkpoint.

ZeRO-1/2/3 (and the bf16 optimizer) save each rank's partition of the fp32 weights and optimizer states, cut
for the world size of the run that wrote them. When a job comes back on a different number of ranks, rank 0
converts the engine's shards once with DeepSpeed's ``ds_to_universal`` (per parameter: fp32 weights,
``exp_avg``, ``exp_avg_sq``, ``step``; every file read with ``weights_only=True``), into a hidden folder of
this run's checkpoint directory; every rank then loads it with ``load_universal`` and DeepSpeed cuts the
partitions anew. The first checkpoint written after that is a native one at the new size, and the converted
copy is deleted. Why DeepSpeed's format rather than our own resharding: it already knows every optimizer's
partition layout (padding, alignment, ZeRO-3's flat groups) and is kept in step with them upstream; ours would
re-derive the same offsets and break silently with the next DeepSpeed release.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
from pathlib import Path

from data_pipeline.atomic import fsync_dir

from . import distributed as dist_env
from .safe_load import weights_only_loads

UNIVERSAL_INFO = "universal_checkpoint_info"


def mark_universal(module) -> None:
    """Have DeepSpeed record what the universal conversion needs in every checkpoint of ``module``."""
    if getattr(module, UNIVERSAL_INFO, None) is None:
        setattr(module, UNIVERSAL_INFO, {})


def partitioned(folder: Path) -> bool:
    """Whether an engine's checkpoint folder holds per-rank ZeRO / bf16 optimizer partitions."""
    return any(folder.glob("*zero_pp_rank_*_optim_states.pt"))


def convert(engine_folder: Path, out: Path) -> None:
    """``ds_to_universal`` of one engine's folder into ``out`` (written aside, then renamed into place)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(engine_folder), output_folder=str(work), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # fmt: skip
    chatter = io.StringIO()  # its per-parameter progress bars; shown only when it fails
    try:
        with (
            weights_only_loads(engine_folder),
            contextlib.redirect_stdout(chatter),
            contextlib.redirect_stderr(chatter),
        ):
            ds_to_universal(args)
    except Exception:
        print(chatter.getvalue()[-4000:], file=sys.stderr)
        raise
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    fsync_dir(out.parent)


def load_resharded(engine, folder: Path, name: str, scratch: Path, rank: int) -> None:
    """Load engine ``name`` of checkpoint ``folder`` (written at another world size) into ``engine``."""
    target = scratch / folder.name / name
    if rank == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        convert(folder / name, target)
    dist_env.barrier()
    engine._config.load_universal_checkpoint = True  # DeepSpeed reads the switch from its config at load time
    try:
        with weights_only_loads(target):
            path, _ = engine.load_checkpoint(str(target.parent), tag=name, load_optimizer_states=True,
                                             load_lr_scheduler_states=False, load_module_strict=True)  # fmt: skip
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise RuntimeError(f"{target}: DeepSpeed loaded nothing from the universal checkpoint")
