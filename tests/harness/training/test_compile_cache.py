"""Compile pays once per sweep: a job after the first loads the compiled graphs from
`trainer.compile_cache_dir` (harness/training/compile_cache.py) instead of compiling them."""

import json
import os
import subprocess
import sys

import pytest

from harness.training.compile_cache import ENV, use_compile_cache

JOB = """
import json, sys, torch
from harness.training.compile_cache import cache_counters, start_counting, use_compile_cache
use_compile_cache(sys.argv[1])
start_counting()
step = torch.compile(lambda x, w: torch.nn.functional.gelu(x @ w).sum())
w = torch.randn(8, 16, requires_grad=True)
step(torch.randn(3, 8), w).backward()
print(json.dumps(cache_counters()))
"""


def test_the_cache_dir_is_set_for_inductor_and_null_leaves_torchs_default(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert use_compile_cache(None) is None and ENV not in os.environ
    folder = use_compile_cache(str(tmp_path / "cache"))
    assert folder == tmp_path / "cache" and folder.is_dir() and os.environ[ENV] == str(folder)


@pytest.mark.slow
def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    """Two processes (as two jobs of a sweep under the joblib launcher) compile the same model
    with one cache folder: the first misses the FX graph and AOTAutograd caches and fills them,
    the second hits them. About 40 s on 2 busy cores (the C++ compile of the first)."""
    def job() -> dict:
        out = subprocess.run([sys.executable, "-c", JOB, str(tmp_path / "cache")], capture_output=True, text=True,
                             timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])
    first, second = job(), job()
    assert first["compile/fxgraph_cache_miss"] > 0 and first["compile/fxgraph_cache_hit"] == 0
    assert second["compile/fxgraph_cache_hit"] > 0 and second["compile/fxgraph_cache_miss"] == 0
    assert second["compile/autograd_cache_hit"] > 0
    assert any((tmp_path / "cache").rglob("*"))
