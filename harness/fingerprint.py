"""Hashes that prove two runs started from the same weights and saw the same data."""

from __future__ import annotations

import hashlib
import json

import torch


def params_fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def order_fingerprint(example_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(example_ids).encode()).hexdigest()[:16]


def config_fingerprint(container: dict) -> str:
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:16]
