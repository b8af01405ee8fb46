"""Where torch.compile keeps what it compiled, so that a sweep pays the compile once.

Inductor's FX graph cache and AOTAutograd cache (both on by default in torch 2.13) store the
compiled graphs, and Triton its kernels, under TORCHINDUCTOR_CACHE_DIR. torch's default is
/tmp/torchinductor_<user>, which a fresh machine or a cleaned /tmp loses; `trainer.compile_cache_dir`
(default ~/.cache/reduce-loss-harness/torch_compile) keeps them across jobs, processes and sweeps.
A later job still traces the model with Dynamo, but loads the compiled code instead of compiling
it. Cache keys include the graph, the torch version and the device, so a stale entry is never used.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "TORCHINDUCTOR_CACHE_DIR"


def use_compile_cache(setting: str | None) -> Path | None:
    """Point Inductor's caches at `setting` (before anything compiles); None: torch's default."""
    if setting is None:
        return None
    folder = Path(setting).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(folder)
    return folder


_COUNTED = (("inductor", ("fxgraph_cache_hit", "fxgraph_cache_miss")),
            ("aot_autograd", ("autograd_cache_hit", "autograd_cache_miss")),
            ("stats", ("unique_graphs",)))  # Dynamo's graphs: a count that grows with the steps means recompiles
_at_start: dict[str, int] = {}


def _counters() -> dict[str, int]:
    from torch._dynamo.utils import counters
    return {f"compile/{name}": int(counters[group][name]) for group, names in _COUNTED for name in names}


def start_counting() -> None:
    """From here on `cache_counters` counts (a process may run several jobs of a sweep)."""
    _at_start.clear()
    _at_start.update(_counters())


def cache_counters() -> dict[str, int]:
    """Hits and misses of the FX graph and AOTAutograd caches, and the graphs Dynamo made, since
    `start_counting`."""
    return {k: v - _at_start.get(k, 0) for k, v in _counters().items()}
