"""One GPU per job when a sweep's jobs run at the same time on one node (conf/hydra/launcher/gpus.yaml).

A job claims the first free GPU with a file lock under the sweep folder and holds it until it
ends, so it works whatever order the launcher starts jobs in. Locks are kept apart per host and
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


def claim_gpu(sweep_dir: Path, poll_s: float = 1.0) -> tuple[int, FileLock]:
    """(device index, its held lock); waits while every visible GPU is taken."""
    folder = slots_folder(sweep_dir)
    folder.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index in range(torch.cuda.device_count()):
            lock = FileLock(folder / f"{index}.lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            return index, lock
        if not waited:
            log.info("every GPU is taken by another job of this sweep; waiting for one")
            waited = True
        time.sleep(poll_s)
