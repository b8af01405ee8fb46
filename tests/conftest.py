import os

import pytest
import torch


def pytest_configure(config):
    # Under pytest-xdist (pyproject.toml runs two workers), each worker and every process its tests
    # start get cores of their own: torch's threads outnumbering free cores wait for each other
    # (README: "Busy cores").
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker is None or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // workers
    if share >= 1:
        index = int(worker.removeprefix("gw")) % workers  # a worker that replaces a crashed one counts on
        os.sched_setaffinity(0, cores[index * share:(index + 1) * share])
        torch.set_num_threads(share)  # torch sized its pool when it was imported, before this


def pytest_collection_modifyitems(config, items):
    # The slow tests first: with two workers, a long test started near the end would run alone.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "gpu" in item.keywords and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "multigpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA devices"))
