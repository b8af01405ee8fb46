"""The real command line in a subprocess, and the runs it left in MLflow."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pandas as pd

QUICK = ["trainer.max_steps=6", "trainer.eval_every=3", "trainer.batch_size=8",
         "data.num_train=64", "data.num_val=24"]


def cli_command(args: list[str], prelude: str = "", module: str = "harness") -> list[str]:
    """`python -m <module> args`; with `prelude`, patch something first, then run the real
    entry point."""
    if prelude:
        code = (textwrap.dedent(prelude) + f"\nimport sys\nsys.argv = ['{module}'] + {args!r}\n"
                f"from {module}.__main__ import main\nsys.exit(main())\n")
        return [sys.executable, "-c", code]
    return [sys.executable, "-m", module, *args]


def run_cli(args: list[str], cwd: Path, prelude: str = "", module: str = "harness") -> subprocess.CompletedProcess:
    """`cli_command` in `cwd`, waiting for it."""
    return subprocess.run(cli_command(args, prelude, module), cwd=cwd, capture_output=True, text=True, timeout=600)


def entry_check(argv: list[str], cwd: Path, through_cli: bool, monkeypatch, capsys) -> tuple[int, str]:
    """(exit code, stderr) of the checks `python -m harness argv` makes before anything starts:
    through the real command line in a subprocess, or, seconds faster, its entry check
    (`main_or_exit`) in this process, for cases that differ only in what is checked."""
    if through_cli:
        proc = run_cli(argv, cwd)
        return proc.returncode, proc.stderr
    import datasets

    from harness.launch.preflight import main_or_exit
    from harness.runs.tracking import HTTP_DEFAULTS
    monkeypatch.chdir(cwd)
    for name in HTTP_DEFAULTS:  # main_or_exit sets them for the process; undone after the test
        monkeypatch.setenv(name, os.environ.get(name, HTTP_DEFAULTS[name]))
    bars = datasets.is_progress_bar_enabled()
    try:
        main_or_exit(argv)
    except SystemExit as e:
        return int(e.code), capsys.readouterr().err
    finally:
        (datasets.enable_progress_bars if bars else datasets.disable_progress_bars)()
    return 0, capsys.readouterr().err


def child_runs(cwd: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(parent runs, child runs) of the store `cwd/mlflow.db`."""
    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True)
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    return parents, children


def has_module(name: str) -> bool:
    """Whether `name` imports (False too when a parent package, e.g. hydra_plugins, is missing)."""
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
