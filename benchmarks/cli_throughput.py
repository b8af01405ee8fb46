"""What `python -m harness` itself delivers: tokens/s and where each job's wall time goes, read
from the MLflow store the sweep wrote, beside the same steps timed in this process.

    python benchmarks/cli_throughput.py [--in-process] [--dir DIR] OVERRIDES...

OVERRIDES are the harness's own (`+experiment=sharegpt_smollm2 trainer.max_steps=150` ...); the
sweep runs with `-m` in DIR (default: a new temporary folder) with its own SQLite store, then
for every job this prints training tokens/s (median of `train/tokens_per_s` over the logged steps
after the first log interval, so the first step's compile is left out), MFU, the measured row
fill, and the job's `time/*` metrics (harness/training/loop.py: JobClock): set-up, first step
(compile), training, evaluation and the job's wall time over its training time. The whole
process's wall time is printed too (imports, Hydra, the sweep's analysis is switched off).

--write-model SHAPE:DIR writes a model folder for `model=hf model.name_or_path=DIR
model.init=random` and exits: the config of one of benchmarks/gpu_throughput.py's shapes
(qwen0.5b, smollm135m; random init, no download) with the embedded character tokenizer, so the
CLI trains the benchmark's model on the embedded data, as the benchmark does.

--in-process: the first job's config, composed with the same overrides (the first value of a
swept key), trains `--steps` steps here with the harness's own set-up and step (no MLflow, no
evaluation) after `--warmup` steps; its tokens/s is printed beside the CLI's, so the two cannot
drift apart unseen. MFU = 6 x (non-embedding parameters + vocabulary x hidden) x tokens/s / 989e12.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_throughput's model shapes

PEAK_FLOPS = 989e12


def run_cli(overrides: list[str], folder: Path) -> float:
    """Run the sweep; its wall time in seconds."""
    command = [sys.executable, "-m", "harness", "-m", *overrides, f"tracking.uri=sqlite:///{folder}/mlflow.db",
               f"hydra.sweep.dir={folder}/multirun", "hydra.callbacks.sweep_tracking.analyse=false"]
    print("$", " ".join(command), flush=True)
    tic = time.perf_counter()
    subprocess.run(command, check=True, cwd=folder)
    return time.perf_counter() - tic


def job_runs(folder: Path) -> list:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=10_000)
    jobs = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.start_time)
    return [(r, client.get_metric_history(r.info.run_id, "train/tokens_per_s")) for r in jobs]


def flops_per_token(folder: Path, run) -> float | None:
    """From the job's resolved config, its model built on the meta device (no weights)."""
    from omegaconf import OmegaConf
    found = list((folder / "multirun").rglob("resolved_config.yaml"))
    config = next((p for p in found if p.parent.name.split("-")[0] == run.data.params.get("hydra_job_num", "")), None)
    config = config or (found[0] if found else None)
    if config is None:
        return None
    import torch

    from harness.model.loading import build_model, load_tokenizer
    cfg = OmegaConf.load(config)
    if "init" in cfg.model:  # the architecture only: from_pretrained refuses the meta device
        cfg.model.init = "random"
    with torch.device("meta"):
        model = build_model(cfg.model, load_tokenizer(cfg.model), cfg.seed)
    embedding = model.get_input_embeddings().weight.numel()
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    return 6 * (non_embedding + model.config.vocab_size * model.config.hidden_size)


def in_process_rate(overrides: list[str], steps: int, warmup: int) -> float:
    """tokens/s of the first job's steps, trained here by the harness's set-up and step."""
    import torch
    from hydra import compose, initialize_config_dir

    from harness.config import CONF_DIR, CONFIG_NAME
    from harness.distributed import world_from_env
    from harness.training.loop import autocast_dtype, pick_device, set_up, step_planner
    from harness.training.step import run_step
    first = [o.split(",")[0] if "=" in o and not o.startswith("hydra") else o for o in overrides]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(CONFIG_NAME, first)
    world = world_from_env()
    device = pick_device(cfg.trainer.device, world)
    run = set_up(cfg, world, device)
    optimizer = torch.optim.AdamW(run.model.parameters(), lr=cfg.trainer.lr, fused=device.type == "cuda")
    plan = step_planner(cfg, run, world, device)
    args = dict(max_grad_norm=cfg.trainer.max_grad_norm, world=world, device=device,
                autocast_dtype=autocast_dtype(cfg.trainer.precision, device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tokens, tic = 0, None
    for k in range(1, min(warmup + steps, len(run.steps)) + 1):
        if k == warmup + 1:
            sync()
            tic = time.perf_counter()
        record = run_step(run.step_model, optimizer, None, plan(k), **args)
        if tic is not None:
            tokens += record.tokens
    sync()
    return tokens / (time.perf_counter() - tic) if tic is not None else float("nan")


def write_model(spec: str) -> None:
    shape, folder = spec.split(":", 1)
    from gpu_throughput import MODELS

    from harness.model.chat_tokenizer import build_char_tokenizer
    tokenizer = build_char_tokenizer()
    import torch
    with torch.device("meta"):
        config = MODELS[shape]().config
    config.pad_token_id, config.eos_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, None
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"wrote {folder}: the {shape} shape (vocabulary {config.vocab_size}) and the character tokenizer; "
          f"train it with model=hf model.name_or_path={folder} model.init=random")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, help="where the sweep runs (default: a new temporary folder)")
    p.add_argument("--in-process", action="store_true", help="also time the first job's steps in this process")
    p.add_argument("--steps", type=int, default=20, help="in-process: steps timed")
    p.add_argument("--warmup", type=int, default=3, help="in-process: steps before the timing (compile)")
    p.add_argument("--write-model", metavar="SHAPE:DIR", help="write a model folder (see above) and exit")
    p.add_argument("overrides", nargs="*", help="the harness's overrides (after -- if one starts with -)")
    args = p.parse_args()
    if args.write_model:
        return write_model(args.write_model)
    folder = (args.dir or Path(tempfile.mkdtemp(prefix="cli_throughput-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    process_s = run_cli(args.overrides, folder)
    runs = job_runs(folder)
    if not runs:
        sys.exit(f"error: the sweep in {folder} left no job runs")
    fpt = flops_per_token(folder, runs[0][0])
    print(f"\n{len(runs)} jobs in {process_s:.1f} s of process wall time ({folder})")
    print(f"  {'run':<22}{'tokens/s':>12}{'MFU':>7}{'row fill':>9}{'setup s':>9}{'1st step s':>11}{'train s':>9}"
          f"{'eval s':>8}{'wall s':>8}{'wall/train':>11}")
    cli_rates = []
    for run, history in runs:
        m = run.data.metrics
        logged = sorted(history, key=lambda h: h.step)[1:] or history  # the first interval holds the compile
        rate = statistics.median(h.value for h in logged) if logged else float("nan")
        cli_rates.append(rate)
        mfu = f"{rate * fpt / PEAK_FLOPS:.3f}" if fpt else "-"
        train_s = m.get("time/train_s", float("nan"))
        print(f"  {run.info.run_name:<22}{rate:>12,.0f}{mfu:>7}{m.get('train/row_fill_mean', float('nan')):>9.3f}"
              f"{m.get('time/setup_s', float('nan')):>9.1f}{m.get('time/first_step_s', float('nan')):>11.1f}"
              f"{train_s:>9.1f}{m.get('time/eval_s', float('nan')):>8.1f}{m.get('time/wall_s', float('nan')):>8.1f}"
              f"{m.get('time/wall_s', float('nan')) / train_s:>11.2f}")
    tokens = sum(run.data.metrics.get("train/tokens_seen", 0) for run, _ in runs)
    print(f"  aggregate: {tokens:,.0f} training tokens over the process's {process_s:.1f} s: "
          f"{tokens / process_s:,.0f} tokens/s (jobs side by side count together)")
    if args.in_process:
        rate = in_process_rate(args.overrides, args.steps, args.warmup)
        cli = statistics.median(cli_rates)
        print(f"\nin process, the first job's config, {args.steps} steps after {args.warmup}: {rate:,.0f} tokens/s"
              + (f", MFU {rate * fpt / PEAK_FLOPS:.3f}" if fpt else "")
              + f"; the CLI's median job: {cli:,.0f} tokens/s ({cli / rate:.3f} of in-process)")


if __name__ == "__main__":
    main()
