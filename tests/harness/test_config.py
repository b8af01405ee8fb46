"""Config composition and every documented bad input, in process (fast): the same check the
command line runs before Hydra starts (harness/launch/preflight.py)."""

import logging
from pathlib import Path

import pytest

from omegaconf import OmegaConf

from harness.config import CONF_DIR, MAX_JOB_DIRNAME, job_dirname
from harness.runs.credentials import RedactCredentials, redact
from harness.launch.preflight import InputError, check_command_line, job_overrides
from harness.runs.tracking import flat_params

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
OFFLINE = {"tulu_qwen_0p5b"}  # opens a Hub model: composed and validated here, not opened
# open the packaged SmolLM2 and ShareGPT (a minute's conversion): composed and validated here,
# run through the CLI in test_sharegpt_smollm2.py and test_study_presets.py
PACKAGED = {"sharegpt_smollm2", "sharegpt_smollm2_cpu", "study_smollm2", "study_smollm2_packed", "study_gemma3",
            "study_gemma3_packed"}


def test_experiments_folder_is_what_the_config_group_links_to():
    assert (CONF_DIR / "experiment").resolve() == (CONF_DIR.parent / "experiments").resolve()
    assert EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_preset_composes_and_validates(name, monkeypatch):
    from hydra import compose, initialize_config_dir

    from harness.config import CONFIG_NAME, validate

    jobs = job_overrides(["-m", f"+experiment={name}"])
    # jobs that differ only in their seed compose alike: one of each is enough
    for overrides in {tuple(o for o in job if not o.startswith("seed=")): job for job in jobs}.values():
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose(CONFIG_NAME, overrides=overrides)
        if cfg.loss_scale == "auto" and not _accepts_auto_loss_scale(cfg):
            pytest.skip("loss_scale=auto is not supported by this version of harness/config.py")
        validate(cfg)
        assert cfg.reduce_loss in ("mean", "sum", "token_mean", "seq_mean")
    if name not in OFFLINE | PACKAGED:
        check_command_line(["-m", f"+experiment={name}"])


def _accepts_auto_loss_scale(cfg) -> bool:
    from harness.config import ConfigError, validate

    try:
        validate(cfg)
    except ConfigError as e:
        return "loss_scale='auto'" not in str(e)
    return True


def test_a_preset_sweep_expands_into_its_jobs():
    jobs = job_overrides(["-m", "+experiment=all_modes"])
    assert len(jobs) == 12  # four modes x three seeds


def test_help_like_flags_compose_nothing():
    for flag in ("--help", "--hydra-help", "--info"):
        assert job_overrides([flag]) is None


def test_packing_with_null_pack_length_means_rows_of_max_seq_len():
    check_command_line(["data.packing=true"])


def test_cfg_opens_nothing():
    assert job_overrides(["--cfg", "job", "+experiment=tulu_qwen_0p5b"]) is None
    assert job_overrides(["-m", "--cfg", "all", "model=hf", "model.name_or_path=/no/such/model"]) is None


@pytest.mark.parametrize("argv", [["trainer.max_grad_norm=null"], ["loss_scale=auto"], ["loss_scale=0.01"],
                                  ["trainer.precision=auto"], ["trainer.precision=fp32"],
                                  ["trainer.tokens_per_micro_batch=auto"], ["trainer.jobs_per_gpu=4"],
                                  ["trainer.compile_cache_dir=null"], ["trainer.compile_scope=model"]])
def test_valid_settings_pass(argv):
    check_command_line(argv)


@pytest.mark.parametrize("argv, expected", [
    (["reduce_loss=median"], "reduce_loss='median' is not valid; choose one of: mean, sum, token_mean, seq_mean"),
    (["model=nope"], "model=nope is not a known option; choose one of: gemma3, hf, smollm2, tiny_llama"),
    (["data=nope"], "data=nope is not a known option; choose one of: hf, sharegpt, synthetic"),
    (["seed=abc"], "seed='abc' is not an integer"),
    (["trainer.batch_size=1"], "trainer.batch_size=1 leaves a rank without data"),
    (["trainer.batch_size=6", "trainer.grad_accum=4"], "trainer.batch_size=6 must be a multiple of grad_accum"),
    (["trainer.ranks_per_job=0"], "trainer.ranks_per_job=0 must be >= 1"),
    (["trainer.ranks_per_job=3", "trainer.device=cpu"], "trainer.batch_size=16 must be a multiple of grad_accum*world_size=6"),
    (["trainer.ranks_per_job=2", "trainer.device=cpu", "hydra/launcher=submitit_local"],
     "trainer.ranks_per_job=2 runs under the basic, joblib and slurm launchers, not hydra/launcher=submitit_local"),
    (["trainer.lr=0"], "trainer.lr=0 must be a number > 0"),
    (["trainer.tokens_per_micro_batch=many"], "trainer.tokens_per_micro_batch='many' is not an integer"),
    (["trainer.tokens_per_micro_batch=auto", "trainer.max_tokens_per_micro_batch=256"],
     "trainer.max_tokens_per_micro_batch=256 is shorter than data.max_seq_len=512"),
    (["trainer.jobs_per_gpu=0"], "trainer.jobs_per_gpu=0 must be >= 1"),
    (["trainer.compile_scope=block"], "trainer.compile_scope='block' is not valid; choose one of: layers, model"),
    (["trainer.tokens_per_micro_batch=auto", "trainer.auto_row_lengths=0"], "trainer.auto_row_lengths=0 must be >= 1"),
    (["model.liger_kernels=true", "trainer.device=cpu"], "model.liger_kernels=true runs Liger's Triton kernels, which "
                                                        "need a CUDA GPU"),
    (["model.liger_kernels=yes"], "model.liger_kernels='yes' must be true or false"),
    (["trainer.device=tpu"], "trainer.device='tpu' is not valid"),
    (["trainer.scheduler=nope"], "trainer.scheduler='nope' is not valid"),
    (["loss_scale=0"], "loss_scale=0 must be a number > 0 or auto"),
    (["loss_scale=automatic"], "loss_scale='automatic' must be a number > 0 or auto"),
    (["trainer.max_grad_norm=0"], "trainer.max_grad_norm=0 must be a number > 0"),
    (["trainer.precision=fp16"], "trainer.precision='fp16' is not valid; choose one of: auto, fp32, bf16-mixed"),
    (["trainer.checkpoint_every=-1"], "trainer.checkpoint_every=-1 must be >= 0"),
    (["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints=0 must be >= 1"),
    (["data.packing=true", "data.pack_length=abc"], "data.pack_length='abc' is not an integer"),
    (["data.packing=true", "data.pack_length=100"], "data.pack_length=100 is shorter than data.max_seq_len=512"),
    (["data.truncation=cut"], "data.truncation='cut' is not valid"),
    (["reduce_loss=mean,sum"], "reduce_loss=mean,sum is a sweep; add -m"),
    (["model=hf"], "model.name_or_path is not set"),
    (["data=hf"], "data.path is not set"),
    (["model=hf", "model.name_or_path=/no/such/model"], "model.name_or_path='/no/such/model': no such folder"),
    (["data=hf", "data.path=json", "data.data_files=/no/such.jsonl"], "data.data_files: no such file '/no/such.jsonl'"),
    (["tracking.uri=sqlite:///no/such/x.db"], "tracking.uri=sqlite:///no/such/x.db: the folder "),
    (["tracking.uri=sqlite:////no/such/dir/x.db"], "tracking.uri=sqlite:////no/such/dir/x.db: the folder /no/such/dir "
                                                   "does not exist"),
])
def test_bad_input_is_one_clear_line(argv, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as e:
        check_command_line(["-m", *argv] if "," not in " ".join(argv) else argv)
    message = str(e.value)
    assert expected in message and "\n" not in message, message
    assert list(Path(tmp_path).iterdir()) == []  # nothing written


def test_a_sqlite_store_may_be_new_but_its_folder_must_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_command_line(["tracking.uri=sqlite:///new.db"])
    (tmp_path / "stores").mkdir()
    check_command_line([f"tracking.uri=sqlite:///{tmp_path}/stores/new.db"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stores"]  # checked, not created


@pytest.mark.parametrize("overrides, expected", [
    ("reduce_loss=mean,seed=1", "7-reduce_loss=mean,seed=1"),
    ("", "7"),
    ("data.data_files=../../x.jsonl", "7-data.data_files=_x.jsonl"),
    ("data.data_files=/a/b/../c.jsonl", "7-data.data_files=_a_b_c.jsonl"),
    ("tracking.uri=http://bob:pw@host:5000", "7-tracking.uri=http_host_5000"),
    ("tracking.uri=http\\://bob\\:pw@host\\:5000", "7-tracking.uri=http_host_5000"),
])
def test_job_folder_names_are_one_safe_component(overrides, expected):
    assert job_dirname(7, overrides) == expected


def test_long_job_folder_names_are_cut_and_kept_apart():
    a, b = "data.path=" + "a" * 300 + ",seed=1", "data.path=" + "a" * 300 + ",seed=2"
    names = job_dirname(0, a), job_dirname(0, b)
    assert names[0] != names[1] and all(len(n) <= MAX_JOB_DIRNAME + 2 for n in names)
    assert names[0].startswith("0-data.path=aaa")


def test_credentials_are_redacted_from_text_params_and_logs(caplog):
    assert redact("uri http://bob:pw@host:5000/x and https://token@h") == "uri http://***@host:5000/x and https://***@h"
    assert redact("sqlite:////data/a@b.db git@github.com:x http://host/p@q") == (
        "sqlite:////data/a@b.db git@github.com:x http://host/p@q")  # no user info: unchanged
    params = flat_params(OmegaConf.create({"tracking": {"uri": "http://bob:pw@host"}, "seed": 1}))
    assert params == {"tracking.uri": "http://***@host", "seed": "1"}
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "store %s", ("http://bob:pw@host",), None)
    assert RedactCredentials().filter(record) and record.getMessage() == "store http://***@host"


@pytest.mark.parametrize("value, accepted", [("auto", True), ("null", True), ("2", True), ("0", False), ("abc", False)])
def test_trainer_threads_is_auto_null_or_a_positive_count(value, accepted):
    if accepted:
        check_command_line([f"trainer.threads={value}"])
    else:
        with pytest.raises(InputError, match="trainer.threads="):
            check_command_line([f"trainer.threads={value}"])


def test_ranks_per_job_counts_gpus_and_refuses_torchrun(monkeypatch):
    import harness.config as config
    monkeypatch.setattr(config, "cuda_count", lambda: 4)
    assert [config.gpu_jobs(r) for r in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]  # conf/hydra/launcher/gpus.yaml
    with pytest.raises(InputError, match="trainer.ranks_per_job=8 needs as many GPUs; 4 visible"):
        check_command_line(["trainer.ranks_per_job=8", "trainer.batch_size=32"])
    check_command_line(["trainer.ranks_per_job=8", "trainer.batch_size=32", "trainer.device=cpu"])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="starts a job's ranks itself; under torchrun leave it at 1"):
        check_command_line(["trainer.ranks_per_job=2"])
    monkeypatch.setenv("HARNESS_JOB_RANKS", "2")  # a rank that such a job started
    check_command_line(["trainer.ranks_per_job=2"])
