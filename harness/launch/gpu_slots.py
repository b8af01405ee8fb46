"""GPUs for each job when a sweep's jobs run at the same time on one node (conf/hydra/launcher/gpus.yaml).

A job claims the first free GPUs (one, or `trainer.ranks_per_job`) with a file lock each under
the sweep folder and holds them until it ends, so it works whatever order the launcher starts
jobs in. Locks are kept apart per host and
per CUDA_VISIBLE_DEVICES, so jobs on other nodes, or with their own allocation from a scheduler,
never wait for each other."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from pathlib import Path

import torch
from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


def slots_folder(sweep_dir: Path) -> Path:
    where = f"{socket.gethostname()}|{os.environ.get('CUDA_VISIBLE_DEVICES', '')}"
    return Path(sweep_dir) / ".gpu_slots" / hashlib.sha256(where.encode()).hexdigest()[:12]


def claim_gpus(sweep_dir: Path, count: int = 1, poll_s: float = 1.0) -> tuple[list[int], list[FileLock]]:
    """(device indices, their held locks): `count` GPUs at once; waits while fewer are free.
    A job never holds some GPUs while it waits for more, so jobs cannot block each other."""
    if count > torch.cuda.device_count():  # waiting could never end
        raise RuntimeError(f"trainer.ranks_per_job={count} needs {count} GPUs; this job sees "
                           f"{torch.cuda.device_count()} (a scheduler's job may need more GPUs per node)")
    folder = slots_folder(sweep_dir)
    folder.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        held: list[tuple[int, FileLock]] = []
        for index in range(torch.cuda.device_count()):
            lock = FileLock(folder / f"{index}.lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            held.append((index, lock))
            if len(held) == count:
                return [i for i, _ in held], [lock for _, lock in held]
        for _, lock in held:
            lock.release()
        if not waited:
            log.info("fewer than %d GPUs are free (other jobs of this sweep hold them); waiting", count)
            waited = True
        time.sleep(poll_s)


def visible_ids(indices: list[int]) -> str:
    """CUDA_VISIBLE_DEVICES for processes that should see only these devices of this one's."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return ",".join(ids[i].strip() for i in indices)
