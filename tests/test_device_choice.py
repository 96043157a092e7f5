"""Issue 16: which GPU a process drives, from what the launcher gives it (no GPU needed: a pure function)."""

from __future__ import annotations

import pytest

from trainer.engine.distributed import detect, gpu_index


@pytest.mark.parametrize(
    "local_rank,visible,environ,want",
    [
        (0, 8, {"LOCAL_RANK": "0"}, 0),  # torchrun, every process sees the node's 8 GPUs
        (5, 8, {"LOCAL_RANK": "5"}, 5),
        (
            5,
            1,
            {"SLURM_LOCALID": "5", "CUDA_VISIBLE_DEVICES": "5", "SLURM_GPUS_PER_TASK": "1"},
            0,
        ),  # one per task
        (3, 1, {"CUDA_VISIBLE_DEVICES": "GPU-3f2a"}, 0),  # a UUID from the scheduler
        (1, 2, {"CUDA_VISIBLE_DEVICES": "4,5"}, 1),  # a node share of two GPUs, two tasks
    ],
)
def test_gpu_index_follows_what_the_launcher_made_visible(local_rank, visible, environ, want):
    assert gpu_index(local_rank, visible, environ) == want


def test_a_local_rank_beyond_the_visible_gpus_is_a_named_launch_error():
    with pytest.raises(
        RuntimeError, match=r"local rank 5 but this process sees 2 GPUs \(CUDA_VISIBLE_DEVICES='0,1'"
    ):
        gpu_index(5, 2, {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_LOCALID": "5"})
    with pytest.raises(RuntimeError, match="no visible GPU"):
        gpu_index(0, 0, {"CUDA_VISIBLE_DEVICES": ""})


def test_slurm_tasks_find_their_local_rank_and_master():
    env = detect({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "77",
                  "SLURM_JOB_NODELIST": "gpu[003-004]"})  # fmt: skip
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (9, 16, 1, "slurm")
    assert env.master_addr == "gpu003"
    torchrun = detect(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    )
    assert (torchrun.rank, torchrun.local_rank, torchrun.launcher) == (
        3,
        1,
        "torchrun",
    )  # torchrun inside srun
