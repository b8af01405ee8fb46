"""A sweep through `hydra/launcher=submitit_local` in the background, and the processes of its jobs.

Submitit's local executor starts one controller process per job (its pid is the job id, the
folder name under `<sweep dir>/.submitit/`); the controller starts the task process that trains
and writes its log to `<job id>_0_log.out` there. Linux only (reads /proc)."""

import re
import subprocess
import time
from pathlib import Path
from typing import Callable, TypeVar

from tests.helpers.cli import cli_command

T = TypeVar("T")
RUN_LINE = re.compile(r"MLflow run (\S+) \(([0-9a-f]{32})\)")


def start_sweep(args: list[str], cwd: Path) -> subprocess.Popen:
    """`python -m harness args` in the background; its output goes to `cwd/launch.out`, `launch.err`."""
    return subprocess.Popen(cli_command(args), cwd=cwd, stdout=open(cwd / "launch.out", "w"),
                            stderr=open(cwd / "launch.err", "w"), text=True)


def wait_for(what: str, probe: Callable[[], T | None], proc: subprocess.Popen, timeout_s: float = 300) -> T:
    """Poll `probe` until it returns something; fail if the sweep ends first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended (exit {proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"no {what} after {timeout_s} s")


def job_logs(sweep_dir: Path) -> list[Path]:
    return sorted(Path(sweep_dir, ".submitit").glob("*/*_0_log.out"))


def run_ids(sweep_dir: Path) -> dict[str, str]:
    """MLflow run name (e.g. `sum-seed0`) -> run id, as the jobs' logs name them so far."""
    found = {}
    for log in job_logs(sweep_dir):
        found.update(RUN_LINE.findall(log.read_text(errors="replace")))
    return found


def task_pid(sweep_dir: Path, run_id: str) -> int | None:
    """The pid of the task process training MLflow run `run_id`, or None while there is none."""
    for log in job_logs(sweep_dir):
        if run_id in log.read_text(errors="replace"):
            controller = int(log.parent.name)
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue  # the process ended meanwhile
                if int(fields[1]) == controller and fields[0] != "Z":
                    return int(stat.parent.name)
    return None
