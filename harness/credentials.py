"""Credentials in URIs (http://user:password@host) are never stored: not in MLflow params or
tags, job folder names, logs, or the config files Hydra keeps in each job folder."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

# scheme://user:password@ (Hydra writes the colons of an override as \:)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*\\?://)[^/@\s'\"]+@")
HIDDEN = "***"


def redact(text: str) -> str:
    """`text` with the user and password of every URI in it replaced by ***."""
    return _USERINFO.sub(rf"\g<scheme>{HIDDEN}@", text)


class RedactCredentials(logging.Filter):
    """A logging filter (conf/train.yaml puts it on Hydra's handlers) that redacts every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _USERINFO.search(message):
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
                if _USERINFO.search(text):
                    path.write_text(redact(text))
