"""``ldm-submit``: render an sbatch script from the same config ldm-train / ldm-precompute use, and submit it.

    ldm-submit train experiment=sd2_base_256 launcher.nodes=16 launcher.partition=gpu
    ldm-submit train experiment=sd2_base_256 launcher.nodes=16 --dry-run     # print the script, submit nothing
    ldm-submit precompute data.urls=... weights.autoencoder=... out=...
    ldm-submit pipeline experiment=...        # precompute -> train from the latents, chained with afterok

The config is composed exactly as the trainer would compose it, checked, resolved and written next to the run
(``<run_dir>/slurm/<job>.yaml``); the job runs that file, so what runs is what was checked. The script is
written beside it (``<job>.sbatch``) and can be resubmitted by hand.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from omegaconf import DictConfig, OmegaConf, open_dict

from .config import conf_dir
from .engine.guards import PREEMPTED_MARKER

TEMPLATES = Path(__file__).resolve().parents[1] / "slurm" / "templates"
MODULES = {"train": "trainer.train", "precompute": "trainer.precompute"}
SCHEMAS = {"train": "train_schema", "precompute": "precompute_schema"}


def compose_config(kind: str, overrides: list[str]) -> DictConfig:
    """The config ``ldm-train`` (kind=train) or ``ldm-precompute`` would run with these overrides."""
    import trainer.precompute
    import trainer.train  # noqa: F401  (registers train_schema)

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(config_name=kind, overrides=list(overrides))


def job_config_yaml(cfg: DictConfig, kind: str, run_dir: Path) -> str:
    """The resolved config as a Hydra primary config (schema first, per-rank Hydra output folders)."""
    body = OmegaConf.to_yaml(cfg, resolve=True)
    hydra = (
        f"hydra:\n  run:\n    dir: {run_dir}/hydra/rank${{oc.env:RANK,${{oc.env:SLURM_PROCID,0}}}}\n"
        "  output_subdir: null\n  job:\n    chdir: false\n"
    )
    return f"defaults:\n  - {SCHEMAS[kind]}\n  - _self_\n\n{body}\n{hydra}"


def launch_command(cfg: DictConfig, kind: str, config_dir: Path, name: str, tasks: int) -> str:
    launcher = cfg.launcher
    args = f"-m {MODULES[kind]} --config-path {shlex.quote(str(config_dir))} --config-name {name}"
    py = launcher.python
    if launcher.launch == "srun":
        return f"srun --kill-on-bad-exit=1 --ntasks-per-node={tasks} {py} {args}"
    if launcher.launch == "torchrun":
        per_node = max(1, launcher.gpus_per_node)
        return (
            f"srun --ntasks-per-node=1 {py} -m torch.distributed.run --nnodes=$SLURM_NNODES "
            f"--nproc_per_node={per_node} --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT "
            f"--rdzv_id=$SLURM_JOB_ID {args}"
        )
    raise ValueError(f"launcher.launch must be srun or torchrun, got {launcher.launch!r}")


def render(cfg: DictConfig, kind: str, name: str, folder: Path, write: bool = True) -> tuple[Path, str]:
    """The sbatch script for ``cfg``; with ``write``, also ``<folder>/<name>.yaml`` (the resolved config the job
    runs) and ``<folder>/<name>.sbatch``. Returns the script's path and text."""
    launcher = cfg.launcher
    run_dir = Path(cfg.run_dir if kind == "train" else cfg.out).resolve()
    config_file = folder / f"{name}.yaml"
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        config_file.write_text(job_config_yaml(cfg, kind, run_dir))
    if launcher.launch == "torchrun":
        tasks = 1
    else:
        tasks = launcher.tasks_per_node or max(1, launcher.gpus_per_node)
    export = ""
    if kind == "train" and launcher.export_at_end:
        export = (
            f"{launcher.python} -m trainer.export {shlex.quote(str(Path(cfg.checkpoint.dir).resolve()))} "
            f"--out {shlex.quote(str(run_dir / 'export'))}"
        )
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)), undefined=StrictUndefined, keep_trailing_newline=True
    )
    env.filters["q"] = lambda v: shlex.quote(str(v))
    # environment values are expanded by the job's shell on the cluster ($HOME, $SLURM_JOB_ID, ...)
    env.filters["dq"] = lambda v: (
        '"' + str(v).replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`") + '"'
    )
    script_path = folder / f"{name}.sbatch"
    what = {"train": f"ldm-train, stage={cfg.get('stage', '')}", "precompute": "ldm-precompute"}[kind]
    text = env.get_template(f"{kind}.sbatch.j2").render(
        description=f"{what}: {launcher.nodes} node(s) x {tasks} task(s)",
        L=launcher,
        tasks_per_node=tasks,
        config_file=config_file,
        script_path=script_path,
        log_dir=folder,
        workdir=launcher.workdir or os.getcwd(),
        run_name=cfg.run_name,
        launch_command=launch_command(cfg, kind, folder, name, tasks),
        stop_signal="TERM" if launcher.launch == "torchrun" else "USR1",
        preempted_marker=shlex.quote(str(run_dir / PREEMPTED_MARKER)),
        export_command=export,
    )
    if write:
        script_path.write_text(text)
        script_path.chmod(0o755)
    return script_path, text


def sbatch(script: Path, after: str | None = None) -> str:
    cmd = ["sbatch", "--parsable"]
    if after:
        cmd += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
    out = subprocess.run([*cmd, str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def pipeline_configs(overrides: list[str]) -> tuple[DictConfig, DictConfig]:
    """The precompute config derived from the training config, and the training config reading its output."""
    train = compose_config("train", overrides)
    out = str(Path(train.run_dir).resolve() / "latents")
    pre = compose_config("precompute", [f"out={out}", f"run_name={train.run_name}-precompute"])
    with open_dict(pre), open_dict(train):
        pre.data = OmegaConf.merge(train.data, {"kind": "images"})
        pre.autoencoder, pre.weights, pre.launcher = train.autoencoder, train.weights, train.launcher
        pre.launcher.job_name = f"{train.launcher.job_name}-precompute"
        train.data.kind, train.data.urls = "latents", out
    return pre, train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ldm-submit", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("job", choices=["train", "precompute", "pipeline"])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for ldm-train / ldm-precompute")
    p.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    p.add_argument("--name", default="", help="file name of the job files (default: <job>-<timestamp>)")
    args = p.parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.job == "pipeline":
        pre, train = pipeline_configs(args.overrides)
        jobs = [("precompute", pre), ("train", train)]
    else:
        jobs = [(args.job, compose_config(args.job, args.overrides))]
    previous = None
    for kind, cfg in jobs:
        if kind == "train":
            from .build import validate

            # a dry run may describe another machine's files; a pipeline's latents do not exist yet
            validate(
                cfg, check_files=not args.dry_run, check_data=not args.dry_run and args.job != "pipeline"
            )
        folder = Path(cfg.run_dir if kind == "train" else cfg.out).resolve() / "slurm"
        name = f"{args.name}-{kind}" if args.name and len(jobs) > 1 else args.name or f"{kind}-{stamp}"
        script, text = render(cfg, kind, name, folder, write=not args.dry_run)
        if args.dry_run:
            print(text)
            continue
        previous = sbatch(script, after=previous)
        print(f"submitted {kind} job {previous}: {script}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
