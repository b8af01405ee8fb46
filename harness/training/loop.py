"""The training loop: one run of one reduction, start to finish."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from transformers import get_scheduler

from harness import artifacts, distributed

from harness.runs import signals
from harness.artifacts import resolve_uri
from harness.data.batching import Example
from harness.runs.checkpoint import LoopState
from harness.config import pair_key, row_length, validate
from harness.runs.credentials import redact
from harness.data.data_order import training_order
from harness.training.compile_cache import cache_counters, start_counting, use_compile_cache
from harness.training.evaluate import evaluate_and_log, evaluate_test_and_log
from harness.runs.fingerprint import config_fingerprint, data_fingerprint, params_fingerprint
from harness.training.guard import StepGuard
from harness.runs.jobs import claim_job
from harness.training.losses import CausalLMLoss, supports_chunked_loss
from harness.model.loading import apply_liger_kernels, build_model, choose_attention, load_tokenizer
from harness.training.prefetch import ahead
from harness.training.reduction import auto_loss_scale
from harness.training.step import PLANNED_STEPS, RowChoice, Split, choose_rows, plan_step, run_step
from harness.data.tokenise import PreparedData, prepare_data
from harness.runs.tracking import RunLogger, flat_params, run_name, server_gone

log = logging.getLogger(__name__)


def pick_device(name: str, world: distributed.World) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is available")
    if world.size == 1:  # a sweep's job may have been given another GPU (harness/launch/gpu_slots.py)
        return torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


def set_threads(setting, device: torch.device, concurrent_jobs: int = 1) -> None:
    """torch's CPU threads. `auto`: torch's default (one per core), or the cores shared out when
    jobs run side by side on this machine's CPU: threads that outnumber the free cores wait for
    each other (the default sweep ran ~7x slower so; docs/performance.md has the measurements)."""
    if setting == "auto":
        setting = None
        if device.type == "cpu" and concurrent_jobs > 1:
            setting = max(1, available_cores() // concurrent_jobs)
    if setting is not None:
        torch.set_num_threads(setting)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (taskset, cgroups)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def concurrent_jobs() -> int:
    """Jobs of this sweep running side by side on this machine: joblib's n_jobs; every job of a
    sweep under submitit's local executor, which starts them all at once (counted as one per
    core); 1 for the basic launcher, a single run, or a job that has a node of its own."""
    if "SUBMITIT_LOCAL_JOB_ID" in os.environ:
        return available_cores()
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return 1
    n = int(HydraConfig.get().launcher.get("n_jobs") or 1)
    return n if n > 0 else max(1, available_cores() + 1 + n)  # joblib: -1 is every core, -2 all but one


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 autocast over the model's own (float32 by default) weights: asked for with
    `bf16-mixed`, or `auto` on CUDA. None: the forward pass runs in the weights' dtype."""
    if precision == "bf16-mixed" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@dataclass
class Setup:
    data: PreparedData
    model: torch.nn.Module  # on the device, in training mode
    step_model: torch.nn.Module  # the model and its loss, compiled and/or in DDP (harness/training/losses.py)
    chunk_tokens: int | None  # of the chunked loss; None: the plain path
    steps: list[list[int]]  # the training examples of every step
    pad_id: int
    loss_scale: float  # `sum`'s token weight, `auto` resolved
    identity: dict[str, str]  # run tags that prove a pair (harness/artifacts.py)
    split: Split  # semantic split and physical rows, `tokens_per_micro_batch=auto` resolved
    rows: RowChoice | None = None  # what `auto` chose


def set_up(cfg, world: distributed.World, device: torch.device) -> Setup:
    """Data, model and data order. Everything that must match within a pair depends on the
    seed and the config without `reduce_loss` only. Then the model moves to the device."""
    tokenizer = load_tokenizer(cfg.model)
    if not world.is_main:
        distributed.barrier(world)  # rank 0 tokenises (and caches) first; the others reuse it
    data = prepare_data(cfg.data, tokenizer)
    if world.is_main:
        distributed.barrier(world)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    steps = training_order(len(data.train), cfg.trainer.batch_size, cfg.trainer.max_steps, cfg.seed)
    loss_scale = cfg.loss_scale if cfg.loss_scale != "auto" else \
        auto_loss_scale([e.target_tokens for e in data.train], steps)
    identity = {
        artifacts.TAG_MODE: cfg.reduce_loss,
        artifacts.TAG_SEED: str(cfg.seed),
        artifacts.TAG_PAIR: config_fingerprint(pair_key(cfg)),
        artifacts.TAG_INIT: params_fingerprint(model),
        artifacts.TAG_DATA: data_fingerprint(data.train, [i for step in steps for i in step], data.val, data.test),
        artifacts.TAG_SCHEMA: artifacts.SCHEMA_VERSION,
        artifacts.TAG_CACHE: data.cache,
        artifacts.TAG_LOSS_SCALE: repr(float(loss_scale)),
        "precision": "bf16-mixed" if autocast_dtype(cfg.trainer.precision, device) else "fp32",
        "device": device.type,
        "world_size": str(world.size),
    }
    t = cfg.trainer
    split, rows = physical_split(cfg, data, world)
    log.info("training on %s (%s), world size %d", device,
             torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", world.size)
    model = model.to(device).train()
    if cfg.model.get("liger_kernels", False):
        apply_liger_kernels(model)
    choose_attention(model, cfg.model.attn_implementation, device, cfg.data.packing or t.tokens_per_micro_batch)
    chunk = loss_chunk_tokens(t.loss_chunk_tokens, model, device)
    step_model = wrap(CausalLMLoss(model, chunk), t.compile, world, device,
                      stable_shapes=split.tokens_per_micro_batch is not None,
                      shapes=len(split.row_lengths) if split.tokens_per_micro_batch else 1, cache_dir=t.compile_cache_dir,
                      scope=t.compile_scope)
    return Setup(data, model, step_model, chunk, steps, tokenizer.pad_token_id, float(loss_scale), identity, split, rows)


def physical_split(cfg, data: PreparedData, world: distributed.World) -> tuple[Split, RowChoice | None]:
    """The split of conf/trainer; `tokens_per_micro_batch=auto` resolved from the data
    (harness/training/step.py: choose_rows), planned on the order of seed 0's first steps whatever
    the run's seed and length: every job of a sweep over modes, seeds or learning rates gets the
    same rows, so the sweep compiles them once. The rows do not change the gradient; each run's
    own fill is measured as it trains (train/row_fill)."""
    t = cfg.trainer
    if t.tokens_per_micro_batch != "auto":
        return Split(t.grad_accum, t.world_size, t.tokens_per_micro_batch), None
    longest = max(e.seq_len for part in (data.train, data.val, data.test) for e in part)
    planned = training_order(len(data.train), t.batch_size, PLANNED_STEPS, seed=0)
    rows = choose_rows(data.train, planned, Split(t.grad_accum, t.world_size), world.size, longest=longest,
                       most=t.max_tokens_per_micro_batch, short_rows=t.auto_row_lengths - 1)
    log.info("tokens_per_micro_batch=auto: rows of %s tokens (%.1f%% real tokens over the planned steps; %s "
             "rows per step and rank)", ", ".join(map(str, rows.lengths)), 100 * rows.fill,
             "/".join(map(str, rows.rows_per_step)))
    return Split(t.grad_accum, t.world_size, rows.tokens, rows.lengths[:-1]), rows


def job_overrides() -> list[str]:
    """The command-line overrides of this job (empty outside a Hydra job)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def train(cfg, out_dir: Path, parent_run_id: str | None = None, overrides: list[str] | None = None) -> dict[str, float]:
    """Train one run as `cfg` says; write per-example results under `out_dir` and to MLflow.
    `overrides`: the job's command-line overrides (for the run name), where Hydra cannot say."""
    t = cfg.trainer
    clock = JobClock()
    world, device = start(cfg)
    run = set_up(cfg, world, device)
    optimizer = torch.optim.AdamW(run.model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
    plan = step_planner(cfg, run, world, device)
    step_args = dict(max_grad_norm=t.max_grad_norm, world=world, device=device,
                     autocast_dtype=autocast_dtype(t.precision, device))
    evaluate = evaluator(cfg, run, world, device, out_dir)

    job = claim_job(cfg, run.identity, world, parent_run_id)  # waits while another process trains it
    if job.finished is not None:
        job.release()
        log.info("job %s already FINISHED as MLflow run %s; nothing to train", job.key, job.run_id)
        return job.finished
    tracker = RunLogger(enabled=world.is_main)
    try:
        tally = Tally(len(run.data.train), t.max_steps, device)
        done = 0  # steps already trained
        if job.resume_from is not None:
            done = tally.restore(job.checkpoints.load(job.resume_from, run.model, optimizer, scheduler, device))
        start_run(cfg, run, job, tracker, out_dir, world, parent_run_id, overrides, done)
        meter, val_metrics = Throughput(), {}
        clock.training_starts(device)
        progress = tqdm(initial=done, total=t.max_steps, desc=f"{cfg.reduce_loss} seed {cfg.seed}",
                        disable=not world.is_main, dynamic_ncols=True)
        with signals.deferred(), progress:  # a stop signal ends the step and saves a checkpoint first
            for step, step_plan in ahead(plan, range(done + 1, t.max_steps + 1), background=device.type == "cuda"):
                record = run_step(run.step_model, optimizer, scheduler, step_plan, **step_args)
                clock.stepped(device)
                progress.update()
                tally.add(step, record)
                meter.add(record.tokens)
                logs = step % t.log_every == 0 or step == t.max_steps
                evaluates = step % t.eval_every == 0 or step == t.max_steps
                stop = signals.stop_requested(world, device)
                saves = stop or (t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps)
                if logs or evaluates or saves:
                    tally.guard.check()  # nothing of a step past a non-finite one is logged, evaluated or saved
                if logs:
                    log_step(record, scheduler, meter, step, tracker, progress)
                if evaluates:
                    with clock.aside("eval", device):
                        val_metrics = evaluate(step, tracker)
                    meter.restart()  # evaluation time is not training throughput
                if saves:
                    with clock.aside("checkpoint", device):
                        job.checkpoints.save(tally.state(step), run.model, optimizer, scheduler, tracker.run_id)
                if stop:
                    raise signals.Interrupted(stop, f" after step {step} (checkpoint saved)")
        clock.training_ends(device)
        tally.log(run.data.train, out_dir, tracker, world)
        compiled = getattr(run.step_model, "module", run.step_model).compiled
        tracker.metrics(clock.metrics() | (cache_counters() if compiled else {}), step=t.max_steps)
        log_final(cfg, val_metrics)
        tracker.end()
        job.checkpoints.remove_all()  # they only serve to resume; a finished run needs none
    except BaseException as error:
        tracker.end(error)
        raise
    finally:
        job.release()
    return val_metrics


def start(cfg) -> tuple[distributed.World, torch.device]:
    """Checks before any work, then this process's rank, device and CPU threads."""
    validate(cfg)
    gone = server_gone(resolve_uri(cfg.tracking.uri))  # since the sweep started: fail before any work
    if gone:
        raise ConnectionError(gone)
    world = distributed.world_from_env()
    device = pick_device(cfg.trainer.device, world)
    set_threads(cfg.trainer.threads, device, concurrent_jobs())
    distributed.init(world, device)
    return world, device


def step_planner(cfg, run: Setup, world: distributed.World, device: torch.device):
    """step -> its micro-batches and token weights (harness/training/step.py), pinned on CUDA."""
    t = cfg.trainer
    layout = dict(pad_id=run.pad_id, packing=cfg.data.packing, row_length=row_length(cfg.data))

    def plan(step: int):
        made = plan_step(run.data.train, run.steps[step - 1], mode=cfg.reduce_loss, loss_scale=run.loss_scale,
                         split=run.split, world=world, layout=layout)
        return made.pin() if device.type == "cuda" else made
    return plan


def evaluator(cfg, run: Setup, world: distributed.World, device: torch.device, out_dir: Path):
    """(step, tracker) -> the validation metrics, logged with the per-example losses; after the
    last step the test split too (once, after validation: nothing of the run depends on it)."""
    t = cfg.trainer
    layout = dict(pad_id=run.pad_id, packing=cfg.data.packing, row_length=row_length(cfg.data))
    shared = dict(batch_size=t.eval_batch_size, layout=layout, device=device, world=world,
                  chunk_tokens=run.chunk_tokens, tokens_per_row=run.split.tokens_per_micro_batch)

    def evaluate(step: int, tracker: RunLogger) -> dict[str, float]:
        metrics = evaluate_and_log(run.model, run.data.val, step, step == t.max_steps, out_dir, tracker, **shared)
        if step == t.max_steps:
            evaluate_test_and_log(run.model, run.data.test, step, out_dir, tracker, **shared)
        return metrics
    return evaluate


def start_run(cfg, run: Setup, job, tracker: RunLogger, out_dir: Path, world: distributed.World,
              parent_run_id: str | None, overrides: list[str] | None, done: int) -> None:
    """Open the job's MLflow run (resumed if it has one) and log its config."""
    if overrides is None:
        overrides = job_overrides()
    name = run_name(cfg.reduce_loss, cfg.seed, overrides, parent_run_id) if world.is_main else ""
    tracker.start(cfg.tracking, name, run.identity | {artifacts.TAG_JOB: job.key},
                  parent_run_id, resume_id=job.run_id, resume_step=done)
    log_config(cfg, run.data, out_dir, tracker, world)
    # MLflow's views round a metric to two decimals (a loss_scale of 0.00103 shows as 0.00); the
    # param beside the config's `loss_scale` (`auto`) shows the value used in full.
    tracker.params({"loss_scale_value": run.identity[artifacts.TAG_LOSS_SCALE]})
    tracker.metrics({artifacts.LOSS_SCALE_METRIC: run.loss_scale}, step=0)
    if run.split.tokens_per_micro_batch is not None:
        tracker.metrics({"train/row_tokens": run.split.tokens_per_micro_batch,
                         "train/row_lengths": len(run.split.row_lengths)}, step=0)


def record_failure_before_run(cfg, parent_run_id: str | None, error: BaseException) -> str:
    """A sweep's job that failed before its MLflow run started (its data or model did not load)
    still gets a run under the sweep's parent, FAILED, with its error and config: the MLflow UI
    and the analysis show every job. It has no job key, so running the same command again starts
    the job afresh. The run's id."""
    tracker = RunLogger(enabled=True)
    tags = {artifacts.TAG_MODE: str(cfg.reduce_loss), artifacts.TAG_SEED: str(cfg.seed)}
    tracker.start(cfg.tracking, run_name(cfg.reduce_loss, cfg.seed, job_overrides(), parent_run_id), tags,
                  parent_run_id)
    try:
        tracker.params(flat_params(cfg))
    finally:  # never left RUNNING, whatever logging the params does
        tracker.end(error)
    return tracker.run_id


def log_final(cfg, val_metrics: dict[str, float]) -> None:
    if val_metrics:
        log.info("%s seed %d: validation loss at step %d: %.4f per token (token-weighted), %.4f per example "
                 "(example-weighted)", cfg.reduce_loss, cfg.seed, cfg.trainer.max_steps, val_metrics["val/token_loss"],
                 val_metrics["val/seq_loss"])


class Tally:
    """What the loop adds up over a run's steps, on the device (no per-step sync), and keeps in
    its checkpoints: each training example's gradient weight, clipping, the non-finite guard."""

    def __init__(self, examples: int, max_steps: int, device: torch.device):
        self.max_steps = max_steps
        self.grad_weight = torch.zeros(examples, dtype=torch.float64, device=device)
        self.times_seen = torch.zeros(examples, dtype=torch.long, device=device)
        self.grad_norms = torch.zeros(max_steps, dtype=torch.float64, device=device)  # before clipping
        self.clipped_steps = torch.zeros((), dtype=torch.long, device=device)
        self.guard = StepGuard(max_steps, device)
        self.tokens = 0  # over all ranks
        self.real_tokens = self.row_tokens = 0  # this rank's, padding excluded and included

    def add(self, step: int, record) -> None:
        self.guard.update(step, record)
        self.grad_weight.index_add_(0, record.example_index, record.example_weight)
        self.times_seen.index_add_(0, record.example_index, torch.ones_like(record.example_index))
        self.grad_norms[step - 1] = record.grad_norm
        self.clipped_steps += record.clipped
        self.tokens += record.tokens
        self.real_tokens += record.real_tokens
        self.row_tokens += record.row_tokens

    def state(self, step: int) -> LoopState:
        kept = self.guard.state_dict() | {"grad_norms": self.grad_norms, "clipped_steps": self.clipped_steps,
                                          "rows": torch.tensor([self.real_tokens, self.row_tokens])}
        return LoopState(step, self.grad_weight, self.times_seen, self.tokens, kept)

    def restore(self, saved: LoopState) -> int:
        """Continue from a checkpoint; returns the steps it had trained."""
        self.grad_weight, self.times_seen, self.tokens = saved.grad_weight, saved.times_seen, saved.tokens_seen
        self.guard.load_state_dict(saved.guard)
        self.grad_norms, self.clipped_steps = saved.guard["grad_norms"], saved.guard["clipped_steps"]
        if "rows" in saved.guard:  # absent from checkpoints of older versions: the fill counts from here
            self.real_tokens, self.row_tokens = map(int, saved.guard["rows"].tolist())
        return saved.step

    def log(self, examples: list[Example], out_dir: Path, tracker: RunLogger, world: distributed.World) -> None:
        """End of run: gradient weights per example, clipping, tokens, flags."""
        log_grad_weights(examples, self.grad_weight, self.times_seen, out_dir, tracker, world)
        real, rows = distributed.all_reduce_sum([self.real_tokens, self.row_tokens], self.grad_weight.device)
        tracker.metrics({artifacts.CLIPPED_FRACTION_METRIC: float(self.clipped_steps) / self.max_steps,
                         "train/row_fill_mean": real / rows if rows else float("nan"),
                         artifacts.GRAD_NORM_MEDIAN_METRIC: float(self.grad_norms.quantile(0.5)),
                         "train/tokens_seen": self.tokens}, step=self.max_steps)
        flag_run(self.guard.flags(), tracker)


class JobClock:
    """Where a job's wall time goes (metrics `time/*`, logged at the end): set-up before the
    first step (config checks, data, model, MLflow), the first step (a compile, if any), the
    other steps, evaluation and checkpoints. On CUDA the device is synchronised at each boundary
    (a few times per run), so queued GPU work counts where it ran."""

    def __init__(self):
        self.start = time.perf_counter()
        self.spent = {"eval": 0.0, "checkpoint": 0.0}
        self.train_start = self.first_step = self.train_end = None

    @staticmethod
    def _now(device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def training_starts(self, device: torch.device) -> None:
        self.train_start = self._now(device)

    def stepped(self, device: torch.device) -> None:
        if self.first_step is None:
            self.first_step = self._now(device) - self.train_start

    def training_ends(self, device: torch.device) -> None:
        self.train_end = self._now(device)

    @contextmanager
    def aside(self, what: str, device: torch.device):
        tic = self._now(device)
        yield
        self.spent[what] += self._now(device) - tic

    def metrics(self) -> dict[str, float]:
        loop = self.train_end - self.train_start
        setup = self.train_start - self.start
        return {"time/setup_s": setup, "time/first_step_s": self.first_step or 0.0,
                "time/to_first_step_s": setup + (self.first_step or 0.0),
                "time/train_s": loop - sum(self.spent.values()), "time/eval_s": self.spent["eval"],
                "time/checkpoint_s": self.spent["checkpoint"], "time/wall_s": time.perf_counter() - self.start}


class Throughput:
    """Tokens per second over each logging interval (restarted after evaluations), and its
    exponential moving average for the progress bar (single intervals swing widely)."""

    def __init__(self, smoothing: float = 0.1):
        self.smoothing, self.smoothed = smoothing, None
        self.restart()

    def add(self, tokens: int) -> None:
        self.since += tokens

    def restart(self) -> None:
        self.tic, self.since = time.perf_counter(), 0

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.since / (now - self.tic)
        self.tic, self.since = now, 0  # the next interval starts where this one ended (not restart(): no gap)
        self.smoothed = rate if self.smoothed is None else self.smoothed + self.smoothing * (rate - self.smoothed)
        return rate


def loss_chunk_tokens(setting, model, device: torch.device) -> int | None:
    """Tokens per chunk of the chunked loss (harness/training/losses.py), or None for the plain path.
    `auto`: chunked on CUDA, with chunks whose float32 logits take about 1 GiB."""
    if setting == "auto":
        if device.type != "cuda" or not supports_chunked_loss(model):
            return None
        return max(256, (2**28 // model.config.vocab_size) // 256 * 256)
    if setting is not None and not supports_chunked_loss(model):
        raise ValueError("trainer.loss_chunk_tokens: this model's LM head has a bias or logit scaling; "
                         "set trainer.loss_chunk_tokens=null")
    return setting


def wrap(loss_model: CausalLMLoss, compile_setting, world: distributed.World, device: torch.device,
         stable_shapes: bool = True, shapes: int = 1, cache_dir: str | None = None, scope: str = "layers"):
    """torch.compile the model (`auto`: on CUDA, when micro-batches come in a few fixed shapes,
    `shapes` of them), then DDP across ranks."""
    # Padded micro-batches change shape from step to step, and each new shape recompiles: on an
    # H200 the default sweep's first 57 steps took 59 s compiled, a whole 120-step run 5 to 27 s eager.
    if compile_setting is True or (compile_setting == "auto" and device.type == "cuda" and stable_shapes):
        compile_settings(stable_shapes, shapes)
        use_compile_cache(cache_dir)
        start_counting()
        loss_model.compile_model(scope)
    if world.size > 1:
        return DistributedDataParallel(loss_model, device_ids=[device.index] if device.type == "cuda" else None)
    return loss_model


def compile_settings(stable_shapes: bool, shapes: int) -> None:
    """Fresh Dynamo state for this job (jobs of a sweep may share a process: the basic launcher),
    so its graphs are this model's; Inductor's caches on disk (harness/training/compile_cache.py)
    are kept. With a few fixed row lengths each gets a static graph (the default would make the
    second length a dynamic-shape graph for all); room for them, for validation's, and for models
    whose layers come in two kinds (Gemma 3's sliding-window and global attention)."""
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.config.automatic_dynamic_shapes = not stable_shapes  # torch's default for padded batches
    if stable_shapes:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * shapes + 8)


def log_config(cfg, data: PreparedData, out_dir: Path, tracker: RunLogger, world: distributed.World) -> None:
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "resolved_config.yaml").write_text(redact(OmegaConf.to_yaml(cfg, resolve=True)))
    tracker.params(flat_params(cfg))
    tracker.artifact(out_dir / "resolved_config.yaml")
    tracker.metrics({f"data/{k}": v for k, v in data.counts.items()} | {
        "data/train_examples": len(data.train), "data/val_examples": len(data.val),
        "data/test_examples": len(data.test)}, step=0)


def log_step(record, scheduler, meter: Throughput, step: int, tracker: RunLogger, progress) -> None:
    """The step's metrics, summed over ranks (this syncs with the device)."""
    nll_total, objective_total = distributed.all_reduce_float([record.nll_sum, record.objective])
    tokens_per_s = meter.rate()  # after the sync: the interval's work is done
    train_loss = nll_total / record.target_tokens
    tracker.metrics({
        artifacts.TRAIN_LOSS_METRIC: train_loss,  # token-mean NLL of the step: comparable across modes
        "train/objective": objective_total,  # what this mode minimises
        "train/grad_norm": float(record.grad_norm),  # before clipping
        "train/clipped": float(record.clipped),
        "train/lr": scheduler.get_last_lr()[0],
        "train/target_tokens": record.target_tokens,
        "train/tokens_per_s": tokens_per_s,
        "train/row_fill": record.real_tokens / record.row_tokens,  # this rank's real tokens / tokens run
    }, step=step)
    progress.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{meter.smoothed:,.0f}", refresh=False)


def flag_run(flags: dict[str, str], tracker: RunLogger) -> None:
    """Tag a run that finished but looks broken (the analysis refuses it unless told otherwise)."""
    if not flags:
        return
    log.warning("run flagged %s: %s", ",".join(flags), "; ".join(flags.values()))
    tracker.tags({artifacts.TAG_FLAG: ",".join(flags), artifacts.TAG_FLAG_REASON: "; ".join(flags.values())})


def log_grad_weights(examples: list[Example], grad_weight, times_seen, out_dir: Path, tracker: RunLogger,
                     world: distributed.World) -> None:
    """Per training example: how much of the objective's weight it carried over the run."""
    grad_weight = distributed.sum_tensor(grad_weight)
    times_seen = distributed.sum_tensor(times_seen)
    if not world.is_main:
        return
    df = pd.DataFrame({
        "example_id": [e.example_id for e in examples],
        "seq_len": [e.seq_len for e in examples],
        "target_tokens": [e.target_tokens for e in examples],
        "times_seen": times_seen.cpu().numpy(),
        "grad_weight": grad_weight.cpu().numpy(),
    })[artifacts.GRAD_WEIGHT_COLUMNS]
    path = out_dir / artifacts.GRAD_WEIGHT_FILE
    df.to_parquet(path)
    tracker.artifact(path, artifacts.TRAIN_DIR)
