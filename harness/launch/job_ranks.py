"""A run of several DDP ranks started by the job itself (`trainer.ranks_per_job`), so that a
sweep's job can take two or more GPUs. torch.distributed's elastic launcher, the engine behind
torchrun, starts the ranks on this machine; each rank runs `train` as under torchrun.

Signals: the ranks leave the job's process group, so a Ctrl-C reaches the job alone; the
launcher passes it on to every rank once, and they stop as a torchrun run does (the step
finishes, a checkpoint is saved, the run ends KILLED)."""

from __future__ import annotations

import logging
import logging.config
import os
import signal
import sys
import uuid
from pathlib import Path
from unittest import mock

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from harness import artifacts

from harness.runs import signals
from harness.distributed import JOB_RANKS_ENV

log = logging.getLogger(__name__)


def as_slurm_task(ranks: int) -> None:
    """Make this process one of the `ranks` DDP ranks of a SLURM job (hydra/launcher=slurm with
    tasks_per_node=ranks): SLURM started every rank as a task of the job, submitit runs the job
    in each, and torch.distributed finds the others through the variables set here from SLURM's
    (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK), as under torchrun. SLURM's signals
    (--signal, scancel, scontrol requeue) reach every rank once, directly; the ranks agree on the
    step to stop at, and rank 0 requeues the job."""
    from harness.config import ConfigError

    tasks, nodes = int(os.environ.get("SLURM_NTASKS", "1")), int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
    if tasks != ranks or nodes != 1:
        raise ConfigError(f"trainer.ranks_per_job={ranks} under hydra/launcher=slurm trains one rank per SLURM task "
                          f"on one node, but the job has {tasks} task(s) on {nodes} node(s): set "
                          f"hydra.launcher.tasks_per_node={ranks} and hydra.launcher.nodes=1")
    from submitit.helpers import TorchDistributedEnvironment  # an optional dependency, present in its jobs

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    os.environ[JOB_RANKS_ENV] = str(ranks)
    if int(os.environ["RANK"]) > 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 speaks for the job, as in run_ranks


def run_ranks(cfg, out_dir: Path, parent_run_id: str | None, gpus: str | None, cpu_threads: int | None) -> dict:
    """Train `cfg` on `cfg.trainer.ranks_per_job` ranks; rank 0's result. `gpus`: the
    CUDA_VISIBLE_DEVICES of the ranks (None on the CPU); `cpu_threads`: torch threads per rank
    where `trainer.threads=auto` should not give every rank every core."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from harness.training.loop import job_overrides

    ranks = cfg.trainer.ranks_per_job
    plain = OmegaConf.to_container(cfg, resolve=True)
    logging_cfg = OmegaConf.to_container(HydraConfig.get().job_logging, resolve=True) \
        if HydraConfig.initialized() else None
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=ranks, run_id=f"harness-{uuid.uuid4().hex[:12]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
                          start_method="spawn", signals_to_handle=",".join(s.name for s in signals.STOP_SIGNALS))
    env = {JOB_RANKS_ENV: str(ranks)} | ({"CUDA_VISIBLE_DEVICES": gpus} if gpus is not None else {})
    saved_handlers = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}  # the launcher replaces them
    failure = None
    try:
        # the ranks inherit `env`; the job's environment is as before afterwards (the launcher adds to it too)
        with mock.patch.dict(os.environ, env):
            results = elastic_launch(launch, _rank)(plain, str(out_dir), parent_run_id, job_overrides(), logging_cfg,
                                                    cpu_threads)
    except SignalException as e:
        raise signals.Interrupted(int(e.sigval)) from None
    except ChildFailedError as e:  # ranks that a stop signal reached directly (`kill` of their pids) stopped cleanly
        stopped = {f.exitcode - 128 for f in e.failures.values()}
        if stopped <= {int(s) for s in signals.STOP_SIGNALS}:
            raise signals.Interrupted(stopped.pop()) from None
        failure = e
    finally:
        for s, handler in saved_handlers.items():
            signal.signal(s, handler)
    if failure is not None:
        _end_runs_of_dead_ranks(cfg)
        raise failure
    return results[0]


def _end_runs_of_dead_ranks(cfg) -> None:
    """A rank that died hard (killed for memory, a crash in a kernel) ended nothing: rank 0's run
    would stay RUNNING until the next command. Its lock is free now; end the run at once."""
    from harness.artifacts import resolve_uri
    from harness.runs.credentials import redact
    from harness.runs.jobs import end_orphans, job_lock_path
    from harness.runs.tracking import server_gone

    if server_gone(resolve_uri(cfg.tracking.uri)):
        return  # the server cannot be told; the next sweep against it ends the run
    try:
        end_orphans(cfg.tracking, artifacts.TAG_JOB, lambda key: job_lock_path(Path(cfg.trainer.checkpoint_dir), key),
                    own_key="")
    except Exception as e:  # the ranks' failure is what the job reports
        log.warning("could not end the run of the ranks that died: %s: %s", type(e).__name__, redact(str(e)))


def _rank(cfg: dict, out_dir: str, parent_run_id: str | None, overrides: list[str], logging_cfg: dict | None,
          cpu_threads: int | None):
    import torch
    from torch.distributed.elastic.multiprocessing.errors import record

    from harness.training.loop import train

    os.setsid()  # out of the terminal's process group: a stop signal arrives once, from the launcher
    if logging_cfg:
        logging.config.dictConfig(logging_cfg)  # the job's console and log file, as Hydra set them up
    if int(os.environ["RANK"]) > 0:
        logging.getLogger().setLevel(logging.WARNING)
    signals.install()
    if cpu_threads is not None:  # set here, not in the config: the job's identity must not depend on the machine
        torch.set_num_threads(cpu_threads)
    try:
        return record(train)(OmegaConf.create(cfg), Path(out_dir), parent_run_id, overrides=overrides)
    except signals.Interrupted as stop:  # the run is KILLED with its checkpoint; the job says so once
        sys.exit(128 + stop.signum)
