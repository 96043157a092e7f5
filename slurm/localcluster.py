"""A real two-node Slurm cluster on one machine, for tests, CI and trying the sbatch scripts locally.

    sudo python -m slurm.localcluster up        # install (Debian, as root) + start; prints `export SLURM_CONF=...`
    python -m slurm.localcluster status         # "not installed", "down (...)" or each node's state
    sudo python -m slurm.localcluster down

Debian's slurmctld, slurmd, slurm-client and munge are installed when missing (root only). The daemons are
started by hand (no systemd): munged as user munge, slurmctld, then one slurmd per emulated node (Debian's
build has MULTIPLE_SLURMD: NodeName=n[1-2], one port per node, ``127.0.0.1 n1 n2`` in /etc/hosts). Known
pitfalls handled here: without DefMemPerCPU every job takes a whole node; requeued jobs are held for
``cred_expire`` seconds (set to 10); MinJobAge keeps finished jobs visible to ``scontrol show job``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

NODES = ("n1", "n2")
HOSTS_TAG = "# ldm-localcluster"
DEFAULT_DIR = Path(os.environ.get("LDM_SLURM_DIR", "/tmp/ldm-slurm"))
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
UP_COMMAND = "sudo python -m slurm.localcluster up"


class ClusterUnavailable(RuntimeError):
    """The local cluster cannot be installed or started here; the message names the command to run."""


def installed() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "sinfo", "munged"))


def install() -> None:
    """apt-get install Debian's Slurm and munge (seconds once man-db's trigger is off)."""
    if installed():
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(
            f"Slurm is not installed and installing it needs root: run `{UP_COMMAND}` "
            f"(or apt-get install {' '.join(PACKAGES)} and start the daemons)"
        )
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable(
            f"Slurm is not installed and this machine has no apt-get: install {' '.join(PACKAGES)} with its "
            f"package manager, then run `{UP_COMMAND}`"
        )
    Path("/var/lib/man-db/auto-update").unlink(missing_ok=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        check=True,
        env=env,
        capture_output=True,
    )


def node_resources() -> dict[str, str]:
    """CPUs, sockets, cores, threads and memory of this machine, as ``slurmd -C`` reports them."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return {k: fields[k] for k in keep if k in fields}


def slurm_conf(folder: Path, host: str) -> str:
    res = node_resources()
    mem = int(res.get("RealMemory", "4096"))
    cpus = int(res.get("CPUs", "2"))
    node = " ".join(f"{k}={v}" for k, v in res.items())
    return f"""# written by slurm/localcluster.py
ClusterName=ldm-local
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU={max(256, mem // (2 * cpus))}
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port=[17001-17002] {node} State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
"""


def _hosts(add: bool) -> None:
    lines = Path("/etc/hosts").read_text().splitlines()
    lines = [line for line in lines if HOSTS_TAG not in line]
    if add:
        lines.append(f"127.0.0.1 {' '.join(NODES)} {HOSTS_TAG}")
    Path("/etc/hosts").write_text("\n".join(lines) + "\n")


def _env(folder: Path) -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def status(folder: Path = DEFAULT_DIR) -> str:
    """Each node's state ("n1 idle\nn2 idle"), "down (<why>)", or "not installed"."""
    if shutil.which("sinfo") is None:
        return "not installed"
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=_env(folder)
    )
    return out.stdout.strip() if out.returncode == 0 else f"down ({out.stderr.strip()})"


def up(folder: Path = DEFAULT_DIR, timeout: float = 60) -> Path:
    """Install if needed, write slurm.conf, start the daemons; returns the slurm.conf path."""
    install()
    state = status(folder)
    if all(f"{n} idle" in state for n in NODES):
        return folder / "slurm.conf"
    if os.geteuid() != 0:
        raise ClusterUnavailable(
            f"the local Slurm cluster is {state} and starting it needs root: run `{UP_COMMAND}`"
        )
    down(folder)
    for sub in ("state", "spool/n1", "spool/n2"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    (folder / "slurm.conf").write_text(slurm_conf(folder, host))
    _hosts(add=True)
    _start_munge()
    env = _env(folder)
    subprocess.run(["slurmctld", "-f", str(folder / "slurm.conf")], check=True, env=env)
    for node in NODES:
        subprocess.run(["slurmd", "-f", str(folder / "slurm.conf"), "-N", node], check=True, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = status(folder)
        if all(f"{n} idle" in state for n in NODES):
            return folder / "slurm.conf"
        if any(f"{n} down" in state or f"{n} drain" in state for n in NODES):
            for n in NODES:
                subprocess.run(
                    ["scontrol", "update", f"NodeName={n}", "State=RESUME"], env=env, capture_output=True
                )
        time.sleep(0.3)
    raise RuntimeError(
        f"Slurm nodes not idle after {timeout}s: {status(folder)}\n"
        f"see {folder}/slurmctld.log and {folder}/slurmd-n1.log"
    )


def _start_munge() -> None:
    """munged, unless one already serves its socket. A munged left running while its package was purged (and
    /run/munge emptied) no longer answers: every Slurm command would fail authenticating, so it is replaced."""
    running = subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0
    if running and MUNGE_SOCKET.exists():
        return
    if running:
        subprocess.run(["pkill", "-x", "munged"], capture_output=True)
        deadline = time.time() + 10
        while subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            if time.time() > deadline:
                raise RuntimeError("a stale munged (its socket gone) did not stop within 10 s")
            time.sleep(0.1)
    MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)


def down(folder: Path = DEFAULT_DIR) -> None:
    """Stop slurmd, slurmctld (by their PID files) and remove the /etc/hosts entries."""
    pids = [_pid(folder / f"slurmd-{n}.pid") for n in NODES] + [_pid(folder / "slurmctld.pid")]
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 15
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    if os.geteuid() == 0 and Path("/etc/hosts").exists():
        _hosts(add=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = p.parse_args(argv)
    try:
        return _run(args)
    except ClusterUnavailable as exc:
        print(f"localcluster: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.action == "up":
        conf = up(args.dir)
        print(f"cluster up: {status(args.dir)!r}\nexport SLURM_CONF={conf}")
    elif args.action == "down":
        down(args.dir)
        print("cluster down")
    else:
        print(status(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
