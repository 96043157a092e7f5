"""Who am I in the job: rank, world size, local rank and the rendezvous address, from torchrun's variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
SLURM_JOB_NODELIST), then torch.distributed via DeepSpeed (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compact node list ("gpu[01-03,07],login1") as host names, in order."""
    hosts, depth, token = [], 0, ""
    parts = []
    for ch in hostlist:  # split on commas outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(token)
            token = ""
        else:
            token += ch
    parts.append(token)
    for part in filter(None, parts):
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def slurm_master_addr(nodelist: str) -> str:
    """The first host of the job (``scontrol show hostnames`` when available)."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    return expand_hostlist(nodelist)[0]


def free_port() -> int:
    """A TCP port nothing listens on now (rendezvous for a lone process, benches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables (torchrun first, then Slurm); a lone process is rank 0 of 1."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
            "torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = int(env.get("SLURM_JOB_ID", "0"))
        addr = env.get("MASTER_ADDR") or slurm_master_addr(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = int(env.get("MASTER_PORT") or 10000 + job % 20000)
        return DistEnv(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            addr,
            port,
            "slurm",
        )
    return DistEnv(0, 1, 0, "127.0.0.1", free_port(), "single")


def init(env: DistEnv, device: torch.device) -> None:
    """Start torch.distributed through DeepSpeed (which then finds RANK etc. in the environment)."""
    import deepspeed

    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if env.world_size == 1:
            _skip_shm_comm_op(deepspeed)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    global _control
    _control = dist.new_group(backend="gloo") if device.type == "cuda" else None


def _skip_shm_comm_op(deepspeed) -> None:
    """DeepSpeed's CPU backend JIT-builds its shared-memory all-reduce op on first use (~50 s of g++ on a fresh
    machine: the whole first minute of a one-process demo) although one process has no peer to share memory
    with. Marked incompatible, the backend runs without it (gloo, as it does wherever the op cannot build)."""
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


_control = None  # a gloo group for control flags on GPU runs (the default group when it is gloo already)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank: an all-reduce of one int on the CPU (gloo), so asking every step
    costs one small message and never waits for the GPU's queue to drain."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return bool(t[0])


def pick_device(requested: str, env: DistEnv) -> torch.device:
    """``device=cpu|cuda|auto`` -> this process's device (see :func:`gpu_index` for which GPU)."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda but CUDA is not available")
    return torch.device("cuda", gpu_index(env.local_rank, torch.cuda.device_count(), os.environ))


def gpu_index(local_rank: int, visible: int, environ) -> int:
    """Which of the ``visible`` GPUs this process drives.

    One visible GPU: that one, whatever the local rank (Slurm's ``--gpus-per-task=1`` or a launcher that sets
    ``CUDA_VISIBLE_DEVICES`` per process). Otherwise every process of the node sees every GPU and takes
    ``local_rank``; a local rank beyond the visible GPUs is a launch mistake, named with the variables."""
    if visible < 1:
        raise RuntimeError("CUDA reports no visible GPU (CUDA_VISIBLE_DEVICES="
                           f"{environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})")  # fmt: skip
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    names = (
        "CUDA_VISIBLE_DEVICES",
        "LOCAL_RANK",
        "SLURM_LOCALID",
        "SLURM_NTASKS_PER_NODE",
        "SLURM_GPUS_PER_TASK",
    )
    seen = ", ".join(f"{n}={environ[n]!r}" for n in names if n in environ)
    raise RuntimeError(
        f"local rank {local_rank} but this process sees {visible} GPUs ({seen or 'no launcher variables'}): "
        "start one task per GPU (--ntasks-per-node = GPUs per node) or bind one GPU per task "
        "(--gpus-per-task=1)"
    )


def all_reduce_max(value: float, device: torch.device) -> float:
    """The largest ``value`` over ranks (flags: any rank raised it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
