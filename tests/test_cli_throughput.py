"""benchmarks/cli_throughput.py on the CPU with the tiny model: it runs the CLI, reads the store it
wrote, and prints the CLI's tokens/s and each job's time beside the in-process figure."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cli_throughput.py"


@pytest.mark.slow
def test_cli_throughput_prints_the_cli_beside_the_in_process_figure(tmp_path):
    """About 60 s on 2 busy cores."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--dir", str(tmp_path), "--in-process", "--steps", "3",
                          "--warmup", "1", "reduce_loss=mean,sum", "trainer.max_steps=4", "trainer.eval_every=2",
                          "data.num_train=64", "data.num_val=8", "trainer.tokens_per_micro_batch=auto"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    rows = [line for line in lines if re.match(r"\s+(mean|sum)-seed0\s", line)]
    assert len(rows) == 2, out.stdout
    for row in rows:
        rate, _mfu, fill, *times = row.split()[1:]
        assert float(rate.replace(",", "")) > 0 and 0 < float(fill) <= 1
        assert all(float(t) >= 0 for t in times)
    assert any(re.search(r"in process.*: [\d,]+ tokens/s.*the CLI's median job: [\d,]+ tokens/s", line) for line in lines)
