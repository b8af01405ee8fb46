"""Set-up and precision of a training run, in process."""

import logging

import pytest
import torch
from hydra import compose, initialize_config_dir

from harness import artifacts
from harness.config import CONF_DIR, CONFIG_NAME, pair_key
from harness.distributed import World
from harness.model.loading import build_model
from harness.model.chat_tokenizer import build_char_tokenizer
from harness.training.step import Split, train_step
from harness.training.losses import CausalLMLoss
from harness.training.loop import Throughput, autocast_dtype, set_up, wrap
from tests.helpers.cli import QUICK
from tests.helpers.gradients import UNEQUAL
from tests.helpers.models import make_examples, tiny_model


def config(overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(CONFIG_NAME, overrides=overrides)


def test_auto_loss_scale_is_computed_from_the_training_order_and_shared_by_the_pair():
    cfgs = {mode: config([f"reduce_loss={mode}", "loss_scale=auto", *QUICK]) for mode in ("mean", "sum")}
    assert pair_key(cfgs["mean"]) == pair_key(cfgs["sum"])
    runs = {mode: set_up(cfg, World(), torch.device("cpu")) for mode, cfg in cfgs.items()}
    mean, summed = runs["mean"], runs["sum"]
    tokens_per_step = [sum(summed.data.train[i].target_tokens for i in step) for step in summed.steps]
    assert len(tokens_per_step) == 6 and len(set(tokens_per_step)) > 1
    assert summed.loss_scale == pytest.approx(len(tokens_per_step) / sum(tokens_per_step))
    assert mean.loss_scale == summed.loss_scale
    for tag in (artifacts.TAG_PAIR, artifacts.TAG_LOSS_SCALE, artifacts.TAG_INIT, artifacts.TAG_DATA):
        assert mean.identity[tag] == summed.identity[tag], tag
    assert float(summed.identity[artifacts.TAG_LOSS_SCALE]) == summed.loss_scale


def test_a_number_is_used_as_given():
    run = set_up(config(["reduce_loss=sum", "loss_scale=0.25", *QUICK]), World(), torch.device("cpu"))
    assert run.loss_scale == 0.25 and run.identity[artifacts.TAG_LOSS_SCALE] == "0.25"


@pytest.mark.parametrize("precision, device, expected", [
    ("auto", "cpu", None), ("auto", "cuda", torch.bfloat16), ("fp32", "cuda", None),
    ("bf16-mixed", "cpu", torch.bfloat16), ("bf16-mixed", "cuda", torch.bfloat16)])
def test_precision_auto_is_bf16_autocast_on_cuda_only(precision, device, expected):
    assert autocast_dtype(precision, torch.device(device)) is expected


def test_defaults_keep_float32_weights():
    cfg = config(["model=hf", "model.name_or_path=any"])
    assert cfg.model.dtype == "float32" and cfg.trainer.precision == "auto"
    assert config([]).model.dtype == "float32"


def adamw_step_changes(dtype, lr=1e-5, device="cpu") -> float:
    """Share of the weights with a gradient that one AdamW step at `lr` changes."""
    model = tiny_model(dtype=dtype).to(device)
    before = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    ids = torch.randint(1, 50, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    model(input_ids=ids).logits.float().square().mean().backward()
    has_grad = torch.cat([p.grad.flatten() != 0 for p in model.parameters()])
    torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0).step()
    after = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    return float((after != before)[has_grad].float().mean())


def test_bf16_weights_round_away_small_updates_that_float32_weights_keep():
    """The first AdamW step moves every weight by about lr; in bfloat16 most such updates are
    below half a unit in the last place of the weight and are lost."""
    assert adamw_step_changes(torch.float32) > 0.99
    assert adamw_step_changes(torch.bfloat16) < 0.3


def test_half_precision_weights_are_warned_about(caplog):
    cfg = config(["model.dtype=bfloat16"]).model
    with caplog.at_level(logging.WARNING, logger="harness.model.loading"):
        build_model(cfg, build_char_tokenizer(), seed=0)
    assert "model.dtype=bfloat16: the weights and AdamW's updates are kept in bfloat16" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="harness.model.loading"):
        build_model(config([]).model, build_char_tokenizer(), seed=0)
    assert caplog.text == ""


@pytest.mark.gpu
def test_cuda_default_precision_trains_float32_weights_under_bf16_autocast():
    """trainer.precision=auto on CUDA: the forward pass in bfloat16, the weights and AdamW's
    updates in float32, so an update of about lr = 1e-5 reaches every weight with a gradient."""
    device = torch.device("cuda")
    model = tiny_model(dtype=torch.float32).to(device)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    train_step(CausalLMLoss(model), optimizer, None, make_examples(UNEQUAL), list(range(len(UNEQUAL))), mode="token_mean",
               loss_scale=1.0, split=Split(2), max_grad_norm=None, world=World(), device=device,
               layout=dict(pad_id=0, packing=False, row_length=128), autocast_dtype=autocast_dtype("auto", device))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    has_grad = torch.cat([p.grad.flatten() != 0 for p in model.parameters()])
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert has_grad.float().mean() > 0.5 and (after != before)[has_grad].float().mean() > 0.99


def test_threads_auto_shares_the_cores_among_concurrent_jobs_and_null_leaves_torchs_choice(monkeypatch):
    import torch

    import harness.training.loop
    from harness.training.loop import set_threads

    monkeypatch.setattr(harness.training.loop, "available_cores", lambda: 4)
    before = torch.get_num_threads()
    try:
        for setting, jobs, device, expected in [
            (None, 1, "cpu", 3),
            ("auto", 1, "cpu", 3),  # the basic launcher: torch's default
            ("auto", 2, "cpu", 2),  # joblib with n_jobs=2: half the cores each
            ("auto", 8, "cpu", 1),
            ("auto", 2, "cuda", 3),  # a GPU job keeps torch's default for its CPU work
            (5, 2, "cpu", 5),
        ]:
            torch.set_num_threads(3)
            set_threads(setting, torch.device(device), jobs)
            set_threads(setting, torch.device(device), jobs)  # the next job in the same worker: the same
            assert torch.get_num_threads() == expected, (setting, jobs, device)
    finally:
        torch.set_num_threads(before)


def test_concurrent_jobs_counts_joblibs_workers_and_submitits_local_jobs(monkeypatch):
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    import harness.training.loop
    from harness.training.loop import concurrent_jobs

    monkeypatch.setattr(harness.training.loop, "available_cores", lambda: 4)
    monkeypatch.delenv("SUBMITIT_LOCAL_JOB_ID", raising=False)
    assert concurrent_jobs() == 1  # no Hydra job
    multi, single = RunMode.MULTIRUN, RunMode.RUN
    for mode, n_jobs, expected in [(multi, 2, 2), (multi, -1, 4), (multi, -2, 3), (multi, None, 1), (single, 2, 1)]:
        hydra_cfg = OmegaConf.create({"mode": mode, "launcher": {"n_jobs": n_jobs}})
        monkeypatch.setattr(harness.training.loop.HydraConfig, "initialized", staticmethod(lambda: True))
        monkeypatch.setattr(harness.training.loop.HydraConfig, "get", staticmethod(lambda: hydra_cfg))
        assert concurrent_jobs() == expected, (mode, n_jobs)
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "123")
    assert concurrent_jobs() == 4  # every job at once: one thread each


def test_throughput_logs_each_interval_and_shows_a_smoothed_rate(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 3.0])
    monkeypatch.setattr("harness.training.loop.time.perf_counter", lambda: next(clock))
    meter = Throughput(smoothing=0.5)
    rates = []
    for tokens in (100, 300, 100):
        meter.add(tokens)
        rates.append(meter.rate())
    assert rates == [100, 300, 100]
    assert meter.smoothed == 100 + 0.5 * (300 - 100) + 0.5 * (100 - 200)  # 100, then 200, then 150


@pytest.mark.parametrize("setting, device, stable, compiled", [
    ("auto", "cuda", True, True), ("auto", "cuda", False, False), ("auto", "cpu", True, False),
    (True, "cpu", False, True), (False, "cuda", True, False)])
def test_compile_auto_needs_cuda_and_micro_batches_of_one_shape(setting, device, stable, compiled):
    loss_model = CausalLMLoss(tiny_model())
    wrap(loss_model, setting, World(), torch.device(device), stable_shapes=stable)  # compiling is lazy: nothing runs
    assert loss_model.compiled is compiled
