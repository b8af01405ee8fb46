"""Checkpoints of one training run: everything the loop needs to continue as if never stopped.

    <job folder>/step_<8 digits>/
        model.safetensors   the weights (safetensors: no pickle)
        optimizer.pt        optimizer and scheduler state (read with weights_only=True)
        rank<r>.pt          each rank's RNG states and gradient-weight accounting (weights_only=True)
        meta.json           step, MLflow run id, time

A checkpoint is written into a temporary folder and renamed into place, so a `step_*` folder is
always complete. The newest `keep` are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from harness import distributed
from harness.distributed import World

STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
MODEL_FILE, OPTIMIZER_FILE, META_FILE = "model.safetensors", "optimizer.pt", "meta.json"


@dataclass
class LoopState:
    """What the training loop carries from step to step besides model, optimizer and scheduler."""

    step: int  # the last completed step
    grad_weight: torch.Tensor  # this rank's share, one float64 per training example
    times_seen: torch.Tensor  # this rank's share, one int64 per training example
    tokens_seen: int  # over all ranks
    guard: dict  # harness.training.guard.StepGuard.state_dict()


def rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def step_of(path: Path) -> int | None:
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def read_meta(path: Path) -> dict:
    return json.loads((path / META_FILE).read_text())


class Checkpoints:
    """The checkpoints of one job, in `folder`. Collective under DDP: every rank calls save and
    load; rank 0 writes the shared files, each rank its own."""

    def __init__(self, folder: Path, keep: int, world: World):
        self.folder, self.keep, self.world = Path(folder), keep, world

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if p.is_dir() and step_of(p) is not None]
        return sorted(found, key=step_of)

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, state: LoopState, model, optimizer, scheduler, run_id: str | None) -> Path:
        final = self.folder / f"step_{state.step:08d}"
        tmp = self.folder / f"{TMP_PREFIX}{final.name}"
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed while saving
            tmp.mkdir(parents=True)
        distributed.barrier(self.world)
        device = state.grad_weight.device
        torch.save({"rng": rng_state(device), "grad_weight": state.grad_weight, "times_seen": state.times_seen,
                    "tokens_seen": state.tokens_seen, "step": state.step, "guard": state.guard},
                   tmp / f"rank{self.world.rank}.pt")
        if self.world.is_main:
            save_model(model, str(tmp / MODEL_FILE))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER_FILE)
            meta = {"step": state.step, "run_id": run_id, "world_size": self.world.size, "saved": time.time()}
            (tmp / META_FILE).write_text(json.dumps(meta))
        distributed.barrier(self.world)
        if self.world.is_main:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.all()[:-self.keep]:
                shutil.rmtree(old)
        distributed.barrier(self.world)
        return final

    def load(self, path: Path, model, optimizer, scheduler, device: torch.device) -> LoopState:
        """Restore model, optimizer, scheduler and RNG states in place; return the loop's state."""
        load_model(model, str(path / MODEL_FILE), strict=True, device=str(device))
        shared = torch.load(path / OPTIMIZER_FILE, map_location=device, weights_only=True)
        optimizer.load_state_dict(shared["optimizer"])
        scheduler.load_state_dict(shared["scheduler"])
        mine = torch.load(path / f"rank{self.world.rank}.pt", map_location="cpu", weights_only=True)
        set_rng_state(mine["rng"], device)
        guard = {k: v.to(device) for k, v in mine["guard"].items()}
        return LoopState(mine["step"], mine["grad_weight"].to(device), mine["times_seen"].to(device),
                         mine["tokens_seen"], guard)

    def remove_all(self) -> None:
        """Delete this job's checkpoints (and any half-written one); nothing else in the folder."""
        if not self.world.is_main or not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if path.is_dir() and (step_of(path) is not None or path.name.startswith(TMP_PREFIX)):
                shutil.rmtree(path)
