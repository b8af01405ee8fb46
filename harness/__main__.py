"""`python -m harness [overrides]`: train one run, or a sweep with -m.

torch and the training stack are imported when a job runs, not above: --help and --cfg only
print, and return in about a second."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from harness.runs import signals
from harness.artifacts import parent_run_id
from harness.config import CONF_DIR, CONFIG_NAME, ranks_need_a_launcher_without_submitit
from harness.launch.preflight import main_or_exit, prints_only

log = logging.getLogger("harness")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=CONFIG_NAME)
@signals.requeue_on_preemption  # in a submitit job, where main() does not run
def app(cfg: DictConfig):
    import torch

    from harness.distributed import world_from_env
    from harness.launch.gpu_slots import claim_gpus, visible_ids
    from harness.launch.job_ranks import as_slurm_task, run_ranks
    from harness.training.loop import available_cores, concurrent_jobs, train

    started_ms = int(time.time() * 1000)
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    out_dir = Path(hc.runtime.output_dir)
    ranks = cfg.trainer.ranks_per_job
    if not multirun and ranks == 1:
        return train(cfg, out_dir)
    gpus, slots, parent = [], [], None
    try:
        parent = parent_run_id(Path(hc.sweep.dir)) if multirun else None
        if ranks > 1 and signals.submitit_preemption_signal() is not None:
            if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
                raise ranks_need_a_launcher_without_submitit(ranks, "submitit_local")
            as_slurm_task(ranks)  # SLURM started the job's ranks as its tasks; this is one of them
            return train(cfg, out_dir, parent)
        if cfg.trainer.device != "cpu" and torch.cuda.is_available() and world_from_env().size == 1:
            # jobs running side by side get GPUs of their own
            gpus, slots = claim_gpus(Path(hc.sweep.dir if multirun else out_dir), ranks,
                                      jobs_per_gpu=cfg.trainer.jobs_per_gpu)
            log.info("job %s runs on %s", hc.job.num, ", ".join(f"cuda:{i}" for i in gpus))
        if ranks > 1:
            threads = None
            if not gpus and cfg.trainer.threads == "auto":  # the job's share of the cores, divided among its ranks
                threads = max(1, available_cores() // (concurrent_jobs() * ranks))
            return run_ranks(cfg, out_dir, parent, visible_ids(gpus) if gpus else None, threads)
        if gpus:
            torch.cuda.set_device(gpus[0])
        return train(cfg, out_dir, parent)
    except Exception as e:  # the run is marked FAILED in MLflow; the sweep goes on
        if not multirun:
            raise
        log.exception("job %s failed", hc.job.num)
        from harness.launch.sweep_callback import run_started, write_job_error
        failed = f"{type(e).__name__}: {e}"
        write_job_error(out_dir, failed)  # read by the launching process when the job ran elsewhere
        if parent is not None and not run_started(out_dir, started_ms) and world_from_env().is_main:
            from harness.training.loop import record_failure_before_run
            try:
                record_failure_before_run(cfg, parent, e)
            except Exception as tracking_error:  # the store itself may be what failed
                log.warning("job %s: no FAILED run recorded (%s)", hc.job.num, tracking_error)
        return {"failed": failed}
    finally:
        for slot in slots:
            slot.release()


def main() -> None:
    main_or_exit(sys.argv[1:])
    if prints_only(sys.argv[1:]):
        return app()  # Hydra prints help or the config; no job, no MLflow run
    from harness.launch.sweep_callback import end_open_parent

    signals.install()
    try:
        app()
    except signals.Interrupted as stop:
        end_open_parent("KILLED")
        print(f"error: {stop}; the runs are marked KILLED and the same command resumes them", file=sys.stderr)
        sys.exit(128 + stop.signum)
    finally:
        end_open_parent("FAILED")  # left open only if the sweep ended in an error


if __name__ == "__main__":
    main()
