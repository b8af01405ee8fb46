"""GPUs for each job when a sweep's jobs run at the same time on one node (conf/hydra/launcher/gpus.yaml).

A job claims the first free GPUs (one, or `trainer.ranks_per_job`) with a file lock each under
the sweep folder and holds them until it ends, so it works whatever order the launcher starts
jobs in. With `trainer.jobs_per_gpu=N` each GPU has N such slots: N jobs share it. Locks are kept
apart per host and per CUDA_VISIBLE_DEVICES, so jobs on other nodes, or with their own allocation from a scheduler,
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


def slot_lock(folder: Path, index: int, slot: int) -> FileLock:
    """The lock of slot `slot` of GPU `index` (slot 0 keeps the name of one job per GPU)."""
    return FileLock(folder / (f"{index}.lock" if slot == 0 else f"{index}.{slot}.lock"))


def claim_gpus(sweep_dir: Path, count: int = 1, poll_s: float = 1.0,
               jobs_per_gpu: int = 1) -> tuple[list[int], list[FileLock]]:
    """(device indices, their held locks): `count` different GPUs at once, each with one of its
    `jobs_per_gpu` slots free; waits while fewer are free. Slots are taken GPU by GPU, first
    slots first, so jobs spread over the GPUs before they share one. A job never holds some
    GPUs while it waits for more, so jobs cannot block each other."""
    if count > torch.cuda.device_count():  # waiting could never end
        raise RuntimeError(f"trainer.ranks_per_job={count} needs {count} GPUs; this job sees "
                           f"{torch.cuda.device_count()} (a scheduler's job may need more GPUs per node)")
    folder = slots_folder(sweep_dir)
    folder.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        held: dict[int, FileLock] = {}
        for slot in range(jobs_per_gpu):
            for index in range(torch.cuda.device_count()):
                if index in held:
                    continue
                lock = slot_lock(folder, index, slot)
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    continue
                held[index] = lock
                if len(held) == count:
                    return list(held), list(held.values())
        for lock in held.values():
            lock.release()
        if not waited:
            log.info("fewer than %d GPUs have a free slot (other jobs of this sweep hold them); waiting", count)
            waited = True
        time.sleep(poll_s)


def visible_ids(indices: list[int]) -> str:
    """CUDA_VISIBLE_DEVICES for processes that should see only these devices of this one's."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return ",".join(ids[i].strip() for i in indices)
