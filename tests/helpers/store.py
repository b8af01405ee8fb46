"""New SQLite MLflow stores for the tests, copied from one made once per process: MLflow migrates
a new store's schema on first use, 2-3 s each time. Tests of how the harness creates a store
(commands at the same time, README's commands) leave the store to it."""

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient


@functools.cache
def _template() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="mlflow-store-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()  # creates and migrates it
    return folder / "mlflow.db"


def new_store(path: Path) -> str:
    """An empty store at `path` unless one is there; its URI."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_template(), path)
    return f"sqlite:///{path}"
