"""Slurm launch (``ldm-submit``): render an sbatch script from the same config ldm-train / ldm-precompute use,
and submit it.

    ldm-submit train experiment=sd2_base_256 launcher.nodes=16 launcher.partition=gpu
    ldm-submit train experiment=sd2_base_256 launcher.nodes=16 --dry-run     # print the script, submit nothing
    ldm-submit precompute data.urls=... weights.autoencoder=... out=...
    ldm-submit pipeline experiment=...        # precompute -> train from the latents, chained with afterok

The config is composed exactly as the trainer would compose it, checked, resolved and written next to the run
(``<run_dir>/slurm/<job>.yaml``); the job runs that file, so what runs is what was checked. The script is
written beside it (``<job>.sbatch``) and can be resubmitted by hand. It runs the interpreter that rendered it
(or ``launcher.python``), so an installed package works from any directory.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from omegaconf import DictConfig, OmegaConf, open_dict

from data_pipeline.atomic import atomic_write
from trainer.config import ConfigError, compose
from trainer.engine.guards import PREEMPTED_MARKER

TEMPLATES = Path(__file__).resolve().parent / "templates"
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FILE_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Job:
    """A kind of job ``ldm-submit`` renders."""

    module: str  # the entry point the job runs (python -m ...)
    schema: str  # its Hydra schema (the job config's first default)
    template: str
    describe: Callable[[DictConfig], str]
    output: Callable[[DictConfig], str]  # the run folder (logs and job files go to <it>/slurm)
    # (config, whether its files must exist now) -> None; raises ConfigError
    check: Callable[[DictConfig, bool], object]
    exports: bool  # the script exports the final checkpoint (launcher.export_at_end)
    resume_note: str  # what a requeued job does


def _check_train(cfg: DictConfig, check_files: bool) -> None:
    from trainer.train import prepare

    prepare(cfg, load_models=False, check_files=check_files)


JOBS = {
    "train": Job("trainer.cli.train", "train_schema", "train.sbatch.j2",
                 lambda c: f"ldm-train, task={c.task._target_.rsplit('.', 1)[-1]}", lambda c: c.run_dir,
                 _check_train, exports=True, resume_note="it resumes from the checkpoint"),
    "precompute": Job("trainer.cli.precompute", "precompute_schema", "precompute.sbatch.j2",
                      lambda c: "ldm-precompute", lambda c: c.out, lambda c, d: None, exports=False,
                      resume_note="finished shards are kept"),
}  # fmt: skip


@dataclass(frozen=True)
class Launch:
    """How one job step starts the ranks (``launcher.launch``)."""

    stop_signal: str  # what the batch script forwards on preemption
    tasks: Callable[[DictConfig], int]  # Slurm tasks per node
    command: Callable[[DictConfig, str, str, int], str]  # (launcher, python, module args, tasks) -> command


def _srun(launcher, py: str, args: str, tasks: int) -> str:
    return f"srun --kill-on-bad-exit=1 --ntasks-per-node={tasks} {py} {args}"


def _torchrun(launcher, py: str, args: str, tasks: int) -> str:
    return (
        f"srun --ntasks-per-node=1 {py} -m torch.distributed.run --nnodes=$SLURM_NNODES "
        f"--nproc_per_node={max(1, launcher.gpus_per_node)} --rdzv_backend=c10d "
        f"--rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT --rdzv_id=$SLURM_JOB_ID {args}"
    )


LAUNCHES = {
    "srun": Launch("USR1", lambda L: L.tasks_per_node or max(1, L.gpus_per_node), _srun),  # one task per GPU
    "torchrun": Launch("TERM", lambda L: 1, _torchrun),  # one torchrun per node, which signals its ranks
}


def env_value(value) -> str:
    """A double-quoted shell word: ``$VAR`` / ``${VAR}`` expand on the cluster ($HOME, $SLURM_JOB_ID), but
    command substitution, backticks and quotes are literal."""
    escaped = re.sub(r'(["\\`])', r"\\\1", str(value)).replace("$(", "\\$(")
    return f'"{escaped}"'


def sbatch_value(value) -> str:
    """An ``#SBATCH`` directive's value, double-quoted only when it needs to be (sbatch reads the quotes, never a
    shell): ``gpu`` stays ``gpu``, ``a b`` becomes ``"a b"``."""
    text = str(value)
    if '"' in text:
        raise ConfigError(f"{text!r}: a double quote cannot go into an #SBATCH directive")
    return text if re.fullmatch(r"[\w.,:/%=+@-]+", text) else f'"{text}"'


def compose_config(kind: str, overrides: list[str]) -> DictConfig:
    """The config ``ldm-train`` (kind=train) or ``ldm-precompute`` would run with these overrides."""
    return compose(kind, overrides)


def python_of(launcher) -> str:
    """The interpreter the job runs: ``launcher.python``, or the one rendering the script."""
    return launcher.python or sys.executable


def check_values(cfg: DictConfig, job: Job, name: str) -> None:
    """Refuse values that cannot be rendered safely into a script: newlines or control characters anywhere
    (they would end a comment or an #SBATCH line and start a command), bad variable or file names."""
    launcher = cfg.launcher
    values = {f"launcher.{k}": v for k, v in OmegaConf.to_container(launcher, resolve=True).items()}
    values |= {"run_name": cfg.run_name, "the run folder": str(job.output(cfg))}
    if "checkpoint" in cfg:
        values["checkpoint.dir"] = cfg.checkpoint.dir
    for key, value in values.items():
        items = (
            value.items()
            if isinstance(value, dict)
            else enumerate(value)
            if isinstance(value, list)
            else [("", value)]
        )
        for sub, v in items:
            if isinstance(v, str) and _CONTROL.search(v):
                where = f"{key}.{sub}" if sub != "" else key
                raise ConfigError(
                    f"{where}={v!r}: newlines and control characters cannot go into an sbatch script"
                )
    for k in launcher.env:
        if not _ENV_KEY.fullmatch(str(k)):
            raise ConfigError(f"launcher.env: {k!r} is not a valid environment variable name")
    if launcher.launch not in LAUNCHES:
        raise ConfigError(f"launcher.launch must be one of {sorted(LAUNCHES)}, got {launcher.launch!r}")
    if not _FILE_NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r}: job file names are letters, digits, '.', '_' and '-'")


def job_config_yaml(cfg: DictConfig, job: Job, run_dir: Path) -> str:
    """The resolved config as a Hydra primary config (schema first, per-rank Hydra output folders)."""
    body = OmegaConf.to_yaml(cfg, resolve=True)
    hydra = {"hydra": {"run": {"dir": f"{run_dir}/hydra/rank${{oc.env:RANK,${{oc.env:SLURM_PROCID,0}}}}"},
                       "output_subdir": None, "job": {"chdir": False}}}  # fmt: skip
    return f"defaults:\n  - {job.schema}\n  - _self_\n\n{body}\n{OmegaConf.to_yaml(OmegaConf.create(hydra))}"


def render(
    cfg: DictConfig, kind: str, name: str, folder: Path, write: bool = True, points: list[DictConfig] = ()
) -> tuple[Path, str]:
    """The sbatch script for ``cfg``; with ``write``, also ``<folder>/<name>.yaml`` (the resolved config the job
    runs) and ``<folder>/<name>.sbatch``. Returns the script's path and text.

    With ``points`` (a sweep, trainer/sweep.py) the script is a job array: task ``i`` runs ``<name>_<i>.yaml``,
    the config of ``points[i]``, in that point's run folder, and is requeued and resumed on its own."""
    job, launcher = JOBS[kind], cfg.launcher
    for c in (cfg, *points):
        check_values(c, job, name)
    shape = {**OmegaConf.to_container(launcher, resolve=True), "job_name": ""}
    for i, c in enumerate(points):  # the array's job name is the sweep's (launcher.job_name of the base)
        if {**OmegaConf.to_container(c.launcher, resolve=True), "job_name": ""} != shape:
            raise ConfigError(
                f"sweep point {i} ({c.run_name}) changes launcher.*: one job array has one shape"
            )
    launch = LAUNCHES[launcher.launch]
    runs = [(f"{name}_{i}" if points else name, c) for i, c in enumerate(points or [cfg])]
    run_dirs = [Path(job.output(c)).resolve() for _, c in runs]
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        for (config_name, c), run_dir in zip(runs, run_dirs, strict=True):
            atomic_write(folder / f"{config_name}.yaml", job_config_yaml(c, job, run_dir))
    q = shlex.quote
    py = q(python_of(launcher))
    tasks = launch.tasks(launcher)
    if points:  # the task's files come from bash arrays indexed by SLURM_ARRAY_TASK_ID
        config_name, run_dir, ckpts = f"{q(name)}_$TASK", '"$RUN_DIR"', '"$CKPT_DIR"'
    else:
        config_name, run_dir = q(name), q(str(run_dirs[0]))
        ckpts = q(str(Path(cfg.checkpoint.dir).resolve())) if "checkpoint" in cfg else ""
    args = f"-m {job.module} --config-path {q(str(folder))} --config-name {config_name}"
    export = ""
    if job.exports and launcher.export_at_end:
        export = f"{py} -m trainer.cli.export {ckpts} --out {run_dir}/export"
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)), undefined=StrictUndefined, keep_trailing_newline=True
    )
    env.filters["q"] = lambda v: q(str(v))
    env.filters["sq"] = (
        sbatch_value  # an #SBATCH directive's value (sbatch reads double quotes, not the shell)
    )
    # environment values are expanded by the job's shell on the cluster ($HOME, $SLURM_JOB_ID, ...)
    env.filters["dq"] = env_value
    script_path = folder / f"{name}.sbatch"
    what = f"{job.describe(cfg)}: {launcher.nodes} node(s) x {tasks} task(s)"
    text = env.get_template(job.template).render(
        description=f"{what}, an array of {len(points)} sweep points" if points else what,
        L=launcher,
        tasks_per_node=tasks,
        config_file=folder / f"{name}_<task>.yaml" if points else folder / f"{name}.yaml",
        script_path=script_path,
        log_dir=folder,
        workdir=launcher.workdir or os.getcwd(),
        run_name=cfg.run_name,
        array=[
            (str(d), str(Path(c.checkpoint.dir).resolve())) for d, (_, c) in zip(run_dirs, runs, strict=True)
        ]
        if points
        else [],
        launch_command=launch.command(launcher, py, args, tasks),
        stop_signal=launch.stop_signal,
        preempted_marker=f"{run_dir}/{PREEMPTED_MARKER}",
        export_command=export,
        resume_note=job.resume_note,
    )
    if write:
        atomic_write(script_path, text)
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
    from data_pipeline.latents import LatentShardsConfig

    train = compose_config("train", overrides)
    out = str(Path(train.run_dir).resolve() / "latents")
    pre = compose_config("precompute", [f"out={out}", f"run_name={train.run_name}-precompute"])
    with open_dict(pre), open_dict(train):
        pre.data = OmegaConf.merge(pre.data, train.data)
        pre.autoencoder, pre.weights, pre.launcher = train.autoencoder, train.weights, train.launcher
        pre.launcher.job_name = f"{train.launcher.job_name}-precompute"
        shared = set(LatentShardsConfig.__dataclass_fields__) - {"_target_", "urls"}
        train.data = {"_target_": LatentShardsConfig._target_, "urls": out,
                      **{k: v for k, v in train.data.items() if k in shared}}  # fmt: skip
    return pre, train


def sweep_configs(kind: str, overrides: list[str]) -> tuple[str, DictConfig, list[DictConfig]]:
    """(kind, the sweep's base config, one config per point) for ``ldm-submit <kind> -m``: the points as
    ``ldm-train -m`` would run them, each in ``<run_dir>/<swept values>`` (trainer/sweep.py)."""
    from trainer.sweep import at_point, expand, point_tag, swept_keys

    if kind != "train":
        raise ConfigError(
            f"ldm-submit {kind} -m: only training sweeps (precompute the latents once, then sweep)"
        )
    keys = swept_keys(overrides)
    if not keys:
        raise ConfigError("ldm-submit -m: no override sweeps a value (a sweep looks like optim.lr=1e-4,3e-4)")
    points = expand(overrides)
    base = compose_config(kind, points[0])
    tags = [point_tag(p, keys) for p in points]
    if len(set(tags)) != len(tags):
        raise ConfigError(f"ldm-submit -m: two sweep points would share a run folder: {tags}")
    return kind, base, [at_point(compose_config(kind, p), t) for p, t in zip(points, tags, strict=True)]
