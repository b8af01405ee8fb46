"""`python -m harness [overrides]`: train one run, or a sweep with -m.

torch and the training stack are imported when a job runs, not above: --help and --cfg only
print, and return in about a second."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from harness import signals
from harness.artifacts import parent_run_id
from harness.config import CONF_DIR, CONFIG_NAME
from harness.preflight import main_or_exit, prints_only

log = logging.getLogger("harness")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=CONFIG_NAME)
@signals.requeue_on_preemption  # in a submitit job, where main() does not run
def app(cfg: DictConfig):
    import torch

    from harness.distributed import world_from_env
    from harness.gpu_slots import claim_gpu
    from harness.train import train

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return train(cfg, Path(hc.runtime.output_dir))
    slot = None
    if cfg.trainer.device != "cpu" and torch.cuda.is_available() and world_from_env().size == 1:
        index, slot = claim_gpu(Path(hc.sweep.dir))  # jobs running side by side get a GPU each
        torch.cuda.set_device(index)
        log.info("job %s runs on cuda:%d", hc.job.num, index)
    try:
        return train(cfg, Path(hc.runtime.output_dir), parent_run_id(Path(hc.sweep.dir)))
    except Exception as e:  # the run is marked FAILED in MLflow; the sweep goes on
        log.exception("job %s failed", hc.job.num)
        return {"failed": f"{type(e).__name__}: {e}"}
    finally:
        if slot is not None:
            slot.release()


def main() -> None:
    main_or_exit(sys.argv[1:])
    if prints_only(sys.argv[1:]):
        return app()  # Hydra prints help or the config; no job, no MLflow run
    from harness.sweep_callback import end_open_parent

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
