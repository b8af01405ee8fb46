"""The study presets (study_smollm2, study_gemma3 and their packed controls): the settings the study
needs, composed through the real command line, and study_gemma3 trained end to end at tiny settings
on a ShareGPT-format file and a tiny gemma3 GGUF the test writes."""

import math
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.config import CONF_DIR, CONFIG_NAME
from harness.launch.preflight import job_overrides
from tests.helpers.cli import child_runs, run_cli
from tests.helpers.sharegpt_files import CUT_RECORD, many_conversations, write_cut_off
from tests.helpers.store import new_store
from tests.helpers.tiny_gguf import write_tiny_gemma3_gguf

STUDIES = {"study_smollm2": "smollm2", "study_gemma3": "gemma3"}


def composed(name: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(CONFIG_NAME, overrides=[f"+experiment={name}"], return_hydra_config=True)


def printed(name: str) -> dict:
    """What `python -m harness +experiment=<name> --cfg all` prints, read back."""
    proc = subprocess.run([sys.executable, "-m", "harness", f"+experiment={name}", "--cfg", "all"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return yaml.safe_load(proc.stdout)


@pytest.mark.parametrize("name, kind", STUDIES.items())
def test_study_preset_has_what_the_study_needs(name, kind):
    job = printed(name)
    hydra = job.pop("hydra")
    params = hydra["sweeper"]["params"]
    m, d, t = job["model"], job["data"], job["trainer"]
    assert m["kind"] == kind and (kind != "gemma3" or m["chat_template"] == "gemma")
    assert d["kind"] == "sharegpt" and d["path"] is None and d["max_examples"] >= 10_000
    assert d["max_seq_len"] == 2048 and d["truncation"] == "drop"
    assert (t["batch_size"], t["grad_accum"]) == (32, 32)  # one sequence per micro-batch
    assert t["max_grad_norm"] is None and job["loss_scale"] == "auto"
    assert t["max_steps"] >= 200 and len(range(t["eval_every"], t["max_steps"] + 1, t["eval_every"])) >= 6
    assert t["scheduler"] == "cosine" and 0 < t["warmup_steps"] < t["max_steps"] // 4
    assert params["reduce_loss"].split(",") == ["mean", "sum", "token_mean"]  # seq_mean: mean's weights here
    lrs = [float(v) for v in params["trainer.lr"].split(",")]
    assert len(lrs) >= 4 and max(lrs) / min(lrs) >= 30
    assert str(params["seed"]).split(",") == ["0", "1", "2"]
    assert hydra["callbacks"]["sweep_tracking"]["analyse"] is True  # the tuned comparison, learning rates never pooled
    assert 0 < d["test_fraction"] and d["val_fraction"] + d["test_fraction"] < 0.5  # reported on a held-out test split
    assert len(job_overrides(["-m", f"+experiment={name}"])) == 3 * len(lrs) * 3


def test_the_studies_differ_only_in_the_model_and_the_controls_only_in_the_split():
    def settings(name):
        cfg = OmegaConf.to_container(composed(name), resolve=False)
        return cfg.pop("model"), cfg, cfg.pop("hydra")["sweeper"]["params"]
    smol_model, smol, smol_grid = settings("study_smollm2")
    gemma_model, gemma, gemma_grid = settings("study_gemma3")
    assert (smol, smol_grid) == (gemma, gemma_grid) and smol_model != gemma_model
    for name in STUDIES:
        model, packed, grid = settings(f"{name}_packed")
        _, accum, accum_grid = settings(name)
        assert packed["trainer"].pop("grad_accum") == 1 and accum["trainer"].pop("grad_accum") == 32
        assert (packed, grid) == (accum, accum_grid)


def test_the_packed_control_takes_the_chosen_rates_from_the_command_line():
    jobs = job_overrides(["-m", "+experiment=study_gemma3_packed", "trainer.lr=1.0e-4,3.0e-4"])
    assert len(jobs) == 3 * 2 * 3
    assert {float(o.split("=")[1]) for job in jobs for o in job if o.startswith("trainer.lr=")} == {1e-4, 3e-4}


@pytest.mark.slow
def test_study_gemma3_runs_paired_through_the_cli_at_tiny_settings(tmp_path):
    """About 40 s: the preset itself, shrunk on the command line, on a tiny gemma3 GGUF."""
    data = write_cut_off(tmp_path / "sharegpt.json", many_conversations(120), CUT_RECORD)
    gguf = write_tiny_gemma3_gguf(tmp_path / "tiny-gemma3.gguf")
    new_store(tmp_path / "mlflow.db")
    proc = run_cli(["-m", "+experiment=study_gemma3", f"data.path={data}", f"model.gguf_file={gguf}", "model.sha256=null",
                    f"data.cache_dir={tmp_path / 'cache'}", f"model.cache_dir={tmp_path / 'cache'}",
                    "data.max_examples=60", "data.max_seq_len=256", "data.num_proc=1", "reduce_loss=mean,sum",
                    "trainer.lr=1.0e-3", "seed=0", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.grad_accum=4",
                    "trainer.tokens_per_micro_batch=512", "trainer.warmup_steps=1", "trainer.eval_every=1",
                    "trainer.eval_batch_size=8", "trainer.precision=fp32", "trainer.device=cpu", "trainer.threads=1",
                    "hydra.callbacks.sweep_tracking.analyse=false"],  # ~6 validation examples: nothing to bucket
                   tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, children = child_runs(tmp_path)
    assert sorted(children["tags.reduce_loss"]) == ["mean", "sum"] and (children.status == "FINISHED").all()
    assert children["tags.pair_id"].nunique() == 1 and (children["params.model.kind"] == "gemma3").all()
    assert (children["params.model.chat_template"] == "gemma").all()
    assert all(math.isfinite(v) for v in children["metrics.val/token_loss"])
    assert not list(tmp_path.glob("multirun/*/*/analysis"))  # analyse=false on the command line
