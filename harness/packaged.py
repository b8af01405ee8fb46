"""Files that real-data packages ship (the `real` extra), found without importing the packages."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


def packaged_file(package: str, file: str, needed_by: str, install: str, error: type[Exception]) -> Path:
    """`file` inside the installed distribution `package`; `error` in one line if it is missing."""
    try:
        path = Path(importlib.metadata.distribution(package).locate_file(file))
    except importlib.metadata.PackageNotFoundError:
        raise error(f"{needed_by} needs the {package} package: {install}") from None
    if not path.is_file():
        raise error(f"the {package} package is installed but has no {file}; reinstall it")
    return path
