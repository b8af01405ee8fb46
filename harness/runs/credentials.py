"""Credentials in URIs (http://user:password@host) are never stored: not in MLflow params or
tags, job folder names, logs, or the config files Hydra keeps in each job folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from harness.artifacts import USERINFO, redact


class RedactCredentials(logging.Filter):
    """A logging filter (conf/train.yaml puts it on Hydra's handlers) that redacts every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if USERINFO.search(message):
            record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


class RedactJobFiles(Callback):
    """Rewrite the config files Hydra saved for a job (.hydra/*.yaml, the sweep's multirun.yaml)
    without credentials. Hydra saves them just before it calls on_job_start."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra = HydraConfig.get()
        files = []
        if hydra.output_subdir is not None:
            files += sorted((Path(hydra.runtime.output_dir) / hydra.output_subdir).glob("*.yaml"))
        if hydra.mode == RunMode.MULTIRUN:
            files.append(Path(hydra.sweep.dir) / "multirun.yaml")
        for path in files:
            if path.is_file():
                text = path.read_text()
                if USERINFO.search(text):
                    path.write_text(redact(text))
