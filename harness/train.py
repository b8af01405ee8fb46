"""The training loop: one run of one reduction, start to finish."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from transformers import get_scheduler

from harness import distributed
from harness.batching import MicroBatch, collate, to_device
from harness.config import pair_key, validate
from harness.data import prepare_data
from harness.evaluate import evaluate, summary
from harness.fingerprint import config_fingerprint, order_fingerprint, params_fingerprint
from harness.losses import per_example_sums, token_nll
from harness.model import build_model, load_tokenizer
from harness.reduction import StepCounts, micro_batch_loss, token_weights
from harness.schedule import split_step, training_order
from harness.tracking import RunLogger, flat_params

log = logging.getLogger(__name__)


def pick_device(name: str, world: distributed.World) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is available")
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


def step_counts(batches: list[MicroBatch], world: distributed.World, device) -> StepCounts:
    """N and B over the whole step: this rank's micro-batches, summed over all ranks."""
    local_tokens = sum(e.target_tokens for b in batches for e in b.examples)
    local_seqs = sum(len(b.examples) for b in batches)
    tokens, seqs = distributed.all_reduce_sum([local_tokens, local_seqs], device)
    return StepCounts(tokens, seqs, len(batches), world.size)


def accumulate_gradients(model, batches: list[MicroBatch], counts: StepCounts, mode: str, loss_scale: float,
                         autocast_dtype: torch.dtype | None = None):
    """Forward and backward over this rank's micro-batches of one optimizer step.

    Leaves in `.grad` the gradient of the step's objective (after DDP's all-reduce on the
    last micro-batch). Returns the summed NLL and this rank's share of the objective (both
    0-d tensors), and each micro-batch's per-example sum of token weights.
    """
    ddp = isinstance(model, DistributedDataParallel)
    device = batches[0].input_ids.device
    nll_sum = torch.zeros((), device=device, dtype=torch.float64)
    objective = torch.zeros((), device=device, dtype=torch.float64)
    example_weights = []
    for k, batch in enumerate(batches):
        last = k == len(batches) - 1
        with model.no_sync() if ddp and not last else nullcontext():
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                nll = token_nll(model, batch)
            weights = token_weights(mode, batch.target_mask, batch.seq_target_tokens, counts, loss_scale)
            loss = micro_batch_loss(nll, weights, counts.world_size)
            loss.backward()
        nll_sum += nll.detach().sum()
        objective += loss.detach() / counts.world_size
        example_weights.append(per_example_sums(weights, batch))
    return nll_sum, objective, example_weights


def train(cfg, out_dir: Path, parent_run_id: str | None = None) -> dict[str, float]:
    """Train one run as `cfg` says; write per-example results under `out_dir` and to MLflow."""
    validate(cfg)
    t = cfg.trainer
    world = distributed.world_from_env()
    device = pick_device(t.device, world)
    distributed.init(world, device)

    # Everything that must match within a pair depends on the seed and data config only.
    tokenizer = load_tokenizer(cfg.model)
    if not world.is_main:
        distributed.barrier(world)  # rank 0 tokenises (and caches) first; the others reuse it
    data = prepare_data(cfg.data, tokenizer)
    if world.is_main:
        distributed.barrier(world)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    steps = training_order(len(data.train), t.batch_size, t.max_steps, cfg.seed)
    identity = {
        "reduce_loss": cfg.reduce_loss,
        "seed": str(cfg.seed),
        "pair_id": config_fingerprint(pair_key(cfg)),
        "init_fingerprint": params_fingerprint(model),
        "data_fingerprint": order_fingerprint([data.train[i].example_id for step in steps for i in step]),
        "tokenisation_cache": "reused" if data.cache_reused else "built",
        "device": device.type,
        "world_size": str(world.size),
    }

    log.info("training on %s (%s), world size %d", device,
             torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", world.size)
    model.to(device).train()
    ddp = model
    if world.size > 1:
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
    pad_id = tokenizer.pad_token_id
    autocast_dtype = torch.bfloat16 if t.precision == "bf16-mixed" else None
    layout = dict(pad_id=pad_id, packing=cfg.data.packing, row_length=cfg.data.pack_length or cfg.data.max_seq_len)

    tracker = RunLogger(enabled=world.is_main)
    tracker.start(cfg.tracking, f"{cfg.reduce_loss}-seed{cfg.seed}", identity, parent_run_id)
    try:
        if world.is_main:
            (out_dir / "eval").mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, out_dir / "resolved_config.yaml", resolve=True)
        tracker.params(flat_params(cfg))
        tracker.artifact(out_dir / "resolved_config.yaml")
        tracker.metrics({f"data/{k}": v for k, v in data.counts.items()} | {
            "data/train_examples": len(data.train), "data/val_examples": len(data.val)}, step=0)

        def run_eval(step: int) -> dict[str, float]:
            df = evaluate(model, data.val, batch_size=t.eval_batch_size, device=device, world=world, **layout)
            if df is None:
                return {}
            names = [f"step_{step:08d}.parquet"] + (["final.parquet"] if step == t.max_steps else [])
            for name in names:
                df.to_parquet(out_dir / "eval" / name)
                tracker.artifact(out_dir / "eval" / name, "eval")
            metrics = summary(df)
            tracker.metrics(metrics, step=step)
            return metrics

        # Gradient weight each training example received over the run (summed over its tokens).
        grad_weight = torch.zeros(len(data.train), dtype=torch.float64, device=device)
        times_seen = torch.zeros(len(data.train), dtype=torch.long)
        progress = tqdm(range(1, t.max_steps + 1), desc=f"{cfg.reduce_loss} seed {cfg.seed}",
                        disable=not world.is_main, dynamic_ncols=True)
        val_metrics: dict[str, float] = {}
        tokens_seen = 0
        tic, tokens_since_log = time.perf_counter(), 0  # throughput over each logging interval
        for step in progress:
            micro = split_step(steps[step - 1], world.size, t.grad_accum, world.rank)
            batches = [collate([data.train[i] for i in idx], **layout).to(device) for idx in micro]
            counts = step_counts(batches, world, device)
            nll_sum, objective, example_weights = accumulate_gradients(
                ddp, batches, counts, cfg.reduce_loss, cfg.loss_scale, autocast_dtype)
            for idx, weights in zip(micro, example_weights):
                grad_weight.index_add_(0, to_device(torch.tensor(idx), device), weights)
                times_seen[idx] += 1

            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step_tokens = sum(data.train[i].seq_len for idx in micro for i in idx) * world.size
            tokens_seen += step_tokens
            tokens_since_log += step_tokens
            if step % t.log_every == 0 or step == t.max_steps:
                nll_total, objective_total = distributed.all_reduce_float([nll_sum, objective])  # syncs
                tokens_per_s = tokens_since_log / (time.perf_counter() - tic)
                train_loss = nll_total / counts.tokens
                tracker.metrics({
                    "train/loss": train_loss,  # token-mean NLL of the step: comparable across modes
                    "train/objective": objective_total,  # what this mode minimises
                    "train/grad_norm": float(grad_norm),
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/target_tokens": counts.tokens,
                    "train/tokens_per_s": tokens_per_s,
                }, step=step)
                progress.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            evaluated = step % t.eval_every == 0 or step == t.max_steps
            if evaluated:
                val_metrics = run_eval(step)
            if step % t.log_every == 0 or evaluated:  # evaluation time is not training throughput
                tic, tokens_since_log = time.perf_counter(), 0

        _log_grad_weights(data.train, grad_weight, times_seen, out_dir, tracker, world)
        tracker.metrics({"train/tokens_seen": tokens_seen}, step=t.max_steps)
    except BaseException as error:
        tracker.end(error)
        raise
    tracker.end()
    return val_metrics


def _log_grad_weights(examples, grad_weight, times_seen, out_dir, tracker, world) -> None:
    """Per training example: how much of the objective's weight it carried over the run."""
    grad_weight = distributed.sum_tensor(grad_weight)
    times_seen = distributed.sum_tensor(times_seen.to(grad_weight.device))
    if not world.is_main:
        return
    df = pd.DataFrame({
        "example_id": [e.example_id for e in examples],
        "seq_len": [e.seq_len for e in examples],
        "target_tokens": [e.target_tokens for e in examples],
        "times_seen": times_seen.cpu().numpy(),
        "grad_weight": grad_weight.cpu().numpy(),
    })
    path = out_dir / "train_grad_weight.parquet"
    df.to_parquet(path)
    tracker.artifact(path, "train")
