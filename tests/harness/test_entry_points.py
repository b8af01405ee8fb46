"""What a new user runs first: --help and --cfg answer at once, without the training stack;
the package installed from a wheel (not editable) finds its configs."""

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.helpers.cli import QUICK

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "mlflow", "datasets")

# `python -m harness ARGS`, then the heavy modules that were imported, one a line on stderr.
PROBE = """
import runpy, sys
sys.argv = ["harness", *sys.argv[1:]]
try:
    runpy.run_module("harness", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
else:
    code = 0
print("imported:", *[m for m in {heavy!r} if m in sys.modules], file=sys.stderr)
sys.exit(code)
"""


def _probe(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, list[str], float]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    imported = proc.stderr.strip().splitlines()[-1].split()[1:]
    return proc, imported, seconds


@pytest.mark.parametrize("args, expected", [
    (["--help"], "+experiment=NAME"),
    (["--cfg", "job"], "reduce_loss: mean"),
    (["+experiment=all_modes", "--cfg", "job"], "max_steps: 150"),
])
def test_help_and_cfg_print_without_importing_the_training_stack(tmp_path, args, expected, record_property):
    proc, imported, seconds = _probe(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expected in proc.stdout
    assert imported == [], f"{' '.join(args)} imported {imported}"
    record_property("seconds", round(seconds, 2))
    print(f"python -m harness {' '.join(args)}: {seconds:.2f} s")
    assert list(tmp_path.iterdir()) == []  # printed only: no store, no output folder


def test_a_sweep_with_cfg_is_refused_in_one_line(tmp_path):
    proc, imported, _ = _probe(["-m", "+experiment=all_modes", "--cfg", "job"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == "error: --cfg prints one job's config and runs nothing; leave out -m"
    assert imported == []


def test_a_job_still_imports_the_stack_and_runs_the_checks_first(tmp_path):
    # a bad value fails in the pre-flight checks, which need the stack: proof they ran before Hydra
    proc, imported, _ = _probe(["trainer.lr=-1"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == "error: trainer.lr=-1 must be a number > 0"
    assert "torch" in imported
    assert list(tmp_path.iterdir()) == []


def _source_copy(dest: Path) -> Path:
    """The checkout as `git clone` would give it plus uncommitted edits, without build output."""
    junk = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                  "multirun", "outputs", "mlflow.db*", "mlartifacts", "checkpoints")
    shutil.copytree(REPO, dest, symlinks=True, ignore=junk)
    return dest


@pytest.mark.slow
def test_the_wheel_ships_its_configs_and_runs_outside_the_checkout(tmp_path):
    src = _source_copy(tmp_path / "src")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), "."], cwd=src, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "harness/conf/train.yaml" in names and "harness/conf/trainer/default.yaml" in names
    presets = sorted(p.name for p in (REPO / "experiments").glob("*.yaml"))
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("harness/conf/experiment/")) == presets
    assert not [n for n in names if "results" in n]  # the published study output stays out

    target = tmp_path / "installed"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy only, not this checkout

    def harness(*args):
        return subprocess.run([sys.executable, "-m", "harness", *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)

    where = subprocess.run([sys.executable, "-c", "import harness.config as c; print(c.CONF_DIR)"],
                           cwd=work, env=env, capture_output=True, text=True)
    assert where.stdout.strip() == str(target / "harness" / "conf"), where.stderr
    cfg = harness("--cfg", "job")
    assert cfg.returncode == 0 and "reduce_loss: mean" in cfg.stdout, cfg.stderr[-2000:]
    preset = harness("+experiment=all_modes", "--cfg", "job")
    assert preset.returncode == 0 and "max_steps: 150" in preset.stdout, preset.stderr[-2000:]
    run = harness(*QUICK)  # one short run: the training stack works from the installed package
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "mlflow.db").exists() and list((work / "outputs").glob("*/*/.hydra/config.yaml"))
