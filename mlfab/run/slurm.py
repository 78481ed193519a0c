"""Slurm: submit a run as a batch job, and requeue it when Slurm warns that its time is nearly up.

`launch(..., launcher="slurm")` on a login node writes `<exp_dir>/slurm/job.sbatch` and submits it. The job
runs the same command (as `fit` arguments) under `srun`, with `--model.config.exp_dir=<exp_dir>` appended, so
every task and every requeue of the job uses the same run directory; a `launch` that does not read the command
line (given `argv=[...]`, or mlfab 0.2's `use_cli=False`) reads it from `MLFAB_SLURM_EXP_DIR`, which the batch
script exports (`job_arguments`). Slurm sends SIGUSR1 `signal_seconds` before the time limit; mlfab saves a
checkpoint at the next step boundary, calls `scontrol requeue` and stops; the requeued job resumes from that
checkpoint.
"""

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from mlfab.cli.args import SUBCOMMANDS
from mlfab.config import SlurmConfig
from mlfab.errors import SlurmError

log = logging.getLogger(__name__)

# Slurm job names with which Lightning treats the allocation as interactive, not as a job to run in.
INTERACTIVE_JOB_NAMES = ("bash", "interactive")
# The run directory a job was submitted for, exported by its batch script.
JOB_EXP_DIR_ENV = "MLFAB_SLURM_EXP_DIR"


# ---------------------------------------------------------------------------------------------------------------------
# Where this process runs.


def _lightning_sees_slurm() -> bool:
    """What Lightning's `SLURMEnvironment.detect()` checks (without its warning): started by `srun`, not in an
    interactive allocation."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in INTERACTIVE_JOB_NAMES


def in_slurm_job() -> bool:
    """Whether this process is a task of a Slurm job (started by `srun` in a batch job, not an interactive shell)."""
    return "SLURM_JOB_ID" in os.environ and _lightning_sees_slurm()


def job_id() -> str | None:
    """The id `scontrol requeue` takes: `<array job id>_<task id>` for a task of a job array, else the job id."""
    array_id, task_id = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_id and task_id:
        return f"{array_id}_{task_id}"
    return os.environ.get("SLURM_JOB_ID") or None


def job_arguments(argv: list[str], launcher: Any) -> list[str]:
    """`argv`, the arguments a script gives `launch` (instead of the command line), with the run directory of the
    job it runs in: such a launch never reads the job's command line, whose `--model.config.exp_dir` would be lost,
    and the job would train in a new run directory, and each requeue in yet another, from step 0. Unchanged outside
    a job that `launcher="slurm"` submitted."""
    exp_dir = os.environ.get(JOB_EXP_DIR_ENV)
    if launcher != "slurm" or not exp_dir or not in_slurm_job():
        return argv
    key = "--model.config.exp_dir" if argv and argv[0] in SUBCOMMANDS else "exp_dir"  # The short form's: key=value.
    return [*argv, f"{key}={exp_dir}"]


def hardware() -> dict[str, int] | None:
    """Trainer `devices` and `num_nodes` matching the tasks `srun` started, or None outside a Slurm job."""
    if not in_slurm_job():
        return None
    nodes = int(os.environ.get("SLURM_NNODES", "1"))
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "")
    devices = int(per_node) if per_node.isdigit() else max(int(os.environ["SLURM_NTASKS"]) // nodes, 1)
    return {"devices": devices, "num_nodes": nodes}


def shape_mismatch(devices: Any, num_nodes: int, per_node: int, nodes: int) -> tuple[list[str], list[str]]:
    """Where `devices` / `num_nodes`, when set (not auto / 1), disagree with a job (Slurm's, torchrun's) of `per_node`
    tasks on each of `nodes` nodes: each such `key=value`, and the `slurm.*` settings that would give that shape."""
    given, wanted, text = [], [], str(devices)
    count = int(text) if text.isdigit() else len([i for i in text.split(",") if i.strip()])  # "0,1": two GPUs.
    if text != "auto" and count != per_node:
        given.append(f"devices={devices}")
        wanted.append(f"slurm.gpus_per_node={count}")
    if num_nodes != 1 and num_nodes != nodes:
        given.append(f"num_nodes={num_nodes}")
        wanted.append(f"slurm.nodes={num_nodes}")
    return given, wanted


def check_shape(config: SlurmConfig, devices: Any, num_nodes: int) -> None:
    """A SlurmError when the config's `devices` / `num_nodes` ask for another shape than the job `slurm.*` submits:
    inside the job, the processes are the ones `srun` starts, so they would be dropped."""
    per_node = max(config.gpus_per_node, 1)
    given, wanted = shape_mismatch(devices, num_nodes, per_node, config.nodes)
    if given:
        why = "a CPU job: one task per node" if config.gpus_per_node == 0 else "one task per GPU"
        verb = "disagree" if len(given) > 1 else "disagrees"
        raise SlurmError(
            f"{' and '.join(given)} {verb} with the Slurm job, which starts {per_node} task(s) per node, from "
            f"slurm.gpus_per_node={config.gpus_per_node} ({why}), on slurm.nodes={config.nodes} node(s). A Slurm "
            f"job's shape comes from slurm.*: set {' and '.join(wanted)}, or leave "
            f"{' and '.join(g.split('=')[0] for g in given)} out."
        )


def time_limit_s(text: str) -> int | None:
    """The seconds of an sbatch `--time` value (minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]); None when unlimited."""
    if text.lower() in ("unlimited", "infinite"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        hours, minutes, seconds = (*parts, 0, 0)[:3]
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    return sum(p * k for p, k in zip(parts, {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(parts)], strict=True))


def check_time(config: SlurmConfig) -> None:
    """A SlurmError when the time limit leaves no training before Slurm's SIGUSR1 warning (`signal_seconds` before
    the end), after which the job checkpoints and requeues itself: it would requeue forever."""
    limit = None if config.time is None else time_limit_s(str(config.time))
    if limit is not None and limit <= config.signal_seconds:
        raise SlurmError(
            f"slurm.time={config.time} ({limit} s) is not longer than slurm.signal_seconds={config.signal_seconds}, "
            "the warning before the time limit at which the job checkpoints and requeues itself: it would train "
            "nothing. Set a longer slurm.time, or a smaller slurm.signal_seconds."
        )


def cluster_environment() -> Any:
    """The Trainer plugin for a Slurm job: Lightning's `SLURMEnvironment` without its own SIGUSR1 handler (which
    saves a checkpoint from inside the handler and requeues); mlfab's `GracefulStop` does both at a step boundary.
    None where Lightning would not pick `SLURMEnvironment` (torchrun inside Slurm keeps its own environment)."""
    if not _lightning_sees_slurm() or TorchElasticEnvironment.detect():
        return None
    return SLURMEnvironment(auto_requeue=False)


# ---------------------------------------------------------------------------------------------------------------------
# Submitting.


def _sbatch_value(value: object) -> str:
    text = str(value)
    if "\n" in text or '"' in text:
        raise SlurmError(f"Slurm option value {text!r} contains a newline or a double quote; sbatch cannot read it.")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def sbatch_script(config: SlurmConfig, *, exp_dir: Path, command: Sequence[str], workdir: Path) -> str:
    """The batch script of a run: resources, the requeue signal, then
    `srun <python> <command> --model.config.exp_dir=<exp_dir>` with `MLFAB_SLURM_EXP_DIR=<exp_dir>` exported, for a
    `launch` that does not read the command line (`job_arguments`)."""
    exp_dir, logs = Path(exp_dir), Path(exp_dir) / "slurm"
    if config.nodes < 1 or config.gpus_per_node < 0 or config.cpus_per_task < 1:
        raise SlurmError(
            f"slurm.nodes ({config.nodes}) and slurm.cpus_per_task ({config.cpus_per_task}) must be at "
            f"least 1, and slurm.gpus_per_node ({config.gpus_per_node}) at least 0."
        )
    options: list[tuple[str, object]] = [
        ("job-name", f"{exp_dir.parent.name}-{exp_dir.name}".strip("-") or "mlfab"),
        ("output", logs / "%j.out"),
        ("error", logs / "%j.err"),
        ("nodes", config.nodes),
        ("ntasks-per-node", max(config.gpus_per_node, 1)),
        ("gpus-per-node", config.gpus_per_node or None),
        ("cpus-per-task", config.cpus_per_task),
        ("mem", config.mem),
        ("time", config.time),
        ("partition", config.partition),
        ("account", config.account),
        ("signal", f"SIGUSR1@{config.signal_seconds}"),
    ]
    lines = [
        "#!/bin/bash",
        f"# Written by mlfab for the run in {exp_dir}; submit again with: sbatch {exp_dir}/slurm/job.sbatch",
    ]
    lines += [f"#SBATCH --{name}={_sbatch_value(value)}" for name, value in options if value is not None]
    lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]
    for line in config.extra_sbatch_lines:
        if "\n" in line:
            raise SlurmError(f"slurm.extra_sbatch_lines entry {line!r} holds a newline: give one option per entry.")
    # sbatch reads `#SBATCH` lines only up to the first command: every option first, then the verbatim lines.
    options_given = [line for line in config.extra_sbatch_lines if line.startswith(("-", "#SBATCH"))]
    lines += [line if line.startswith("#") else f"#SBATCH {line}" for line in options_given]
    lines += [line for line in config.extra_sbatch_lines if line not in options_given]
    python = config.python or sys.executable
    srun = ["srun", python, *command, f"--model.config.exp_dir={exp_dir}"]
    lines += [
        "",
        "set -e",
        'echo "mlfab: Slurm job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname) at $(date)"',
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))",
        "export PYTHONUNBUFFERED=1",
        "unset MLFAB_EXP_DIR  # Set by the submitting process for its own ranks; the job uses exp_dir below.",
        f"export {JOB_EXP_DIR_ENV}={shlex.quote(str(exp_dir))}  # For a launch given its arguments (argv, use_cli).",
        f"cd {shlex.quote(str(workdir))}",
        shlex.join(srun),
        "",
    ]
    return "\n".join(lines)


def submit(
    config: SlurmConfig,
    *,
    exp_dir: Path,
    command: Sequence[str],
    workdir: Path,
    devices: Any = "auto",
    num_nodes: int = 1,
) -> str:
    """Writes `<exp_dir>/slurm/job.sbatch`, submits it with `sbatch` and returns the job id. `devices` and `num_nodes`
    (the config's) must match the job's shape when they are set (`check_shape`)."""
    check_shape(config, devices, num_nodes)
    check_time(config)
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmError(
            "sbatch not found: launcher='slurm' needs a Slurm login node (a machine where `sbatch` "
            "is on PATH). Run there, or leave out launcher='slurm' to train on this machine."
        )
    slurm_dir = Path(exp_dir) / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    script = slurm_dir / "job.sbatch"
    script.write_text(sbatch_script(config, exp_dir=Path(exp_dir), command=command, workdir=Path(workdir)))
    try:
        proc = subprocess.run(
            [sbatch, "--parsable", str(script)], capture_output=True, text=True, cwd=workdir, timeout=300
        )
    except subprocess.TimeoutExpired as e:
        raise SlurmError(
            f"sbatch did not answer within {e.timeout:.0f} s (is the Slurm controller down?). "
            f"The script is {script}; submit it later with `sbatch {script}`."
        ) from e
    if proc.returncode != 0:
        raise SlurmError(
            f"sbatch refused the job (exit status {proc.returncode}):\n{proc.stderr.strip()}\n"
            f"The script is {script}: fix the slurm.* settings it came from (e.g. slurm.partition, "
            "slurm.account, slurm.time) and launch again."
        )
    found = re.match(r"\s*(\d+)", proc.stdout)  # --parsable prints `<id>` or `<id>;<cluster>`.
    if found is None:
        raise SlurmError(f"sbatch accepted {script} but printed no job id: {proc.stdout.strip()!r}")
    jid = found.group(1)
    with (slurm_dir / "jobs.txt").open("a") as f:
        f.write(jid + "\n")
    print(
        f"Submitted Slurm job {jid} for run directory {exp_dir}. Logs: {slurm_dir / (jid + '.out')} and "
        f"{slurm_dir / (jid + '.err')}; cancel with `scancel {jid}`.",
        flush=True,
    )
    return jid


# ---------------------------------------------------------------------------------------------------------------------
# Requeueing.


def requeue(global_rank: int = 0) -> bool:
    """Asks Slurm to requeue this job (`scontrol requeue <job id>`), on global rank zero only. Returns whether the
    job was requeued (False on other ranks). A failure is logged, not raised: training must not crash over it."""
    if global_rank != 0:
        return False
    jid = job_id()
    if jid is None or not re.fullmatch(r"[0-9_]+", jid):
        log.warning("Cannot requeue: SLURM_JOB_ID is %r, not a Slurm job id.", jid)
        return False
    print(f"Requeueing Slurm job {jid}: it resumes from the checkpoint just saved.", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(["scontrol", "requeue", jid], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        failure = f" ({e})"
    else:
        if proc.returncode == 0:
            return True
        failure = f": `scontrol requeue {jid}` exited with status {proc.returncode}: {proc.stderr.strip()}"
    log.warning(
        "Requeueing Slurm job %s failed%s; training goes on. Relaunch with the same exp_dir to resume from the last "
        "checkpoint.",
        jid,
        failure,
    )
    return False


def after_signal_checkpoint(global_rank: int) -> bool:
    """Called by every rank after the SIGUSR1 checkpoint was saved at a step boundary. In a Slurm job, rank zero
    requeues the job; returns True when training should stop so that the requeued job takes over. Other ranks
    cannot know whether the requeue worked: with several processes, use rank zero's answer (broadcast it)."""
    if not in_slurm_job():
        return False
    return requeue(global_rank) if global_rank == 0 else True
