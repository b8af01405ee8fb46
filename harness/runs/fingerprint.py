"""Hashes that prove two runs started from the same weights and saw the same data."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch


def params_fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def data_fingerprint(train: list, order: list[int], validation: list, test: list = ()) -> str:
    """The data of a run: every training example (harness.data.batching.Example: id, tokens, targets),
    the order it is trained in (indices into `train`), the validation and the test examples. An
    edited data file, another tokenizer or length policy, or another order changes it; the
    learning rate and the other optimiser settings do not."""
    total = hashlib.sha256()
    for example in train:
        total.update(_example_digest(example))
    total.update(np.asarray(order, dtype=np.int64).tobytes())
    for example in validation:
        total.update(_example_digest(example))
    if test:
        total.update(b"test\0")
        for example in test:
            total.update(_example_digest(example))
    return total.hexdigest()[:16]


def _example_digest(example) -> bytes:
    h = hashlib.sha256(example.example_id.encode() + b"\0")
    h.update(np.asarray(example.input_ids, dtype=np.int64).tobytes())
    h.update(np.asarray(example.targets, dtype=np.int64).tobytes())
    return h.digest()


def config_fingerprint(container: dict) -> str:
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:16]
