"""The contract between a training run and the analysis: every name a run writes and the
analysis reads. Torch-free, so the analysis imports it without the training stack.

A run is an MLflow child run of its sweep's parent run, tagged with `RUN_TAGS`, holding
- `eval/step_<8 digits>.parquet` at every evaluation and `eval/final.parquet` (EVAL_COLUMNS;
  also as `eval/final.csv`, for reading in MLflow's UI),
- `eval/test.parquet` (EVAL_COLUMNS): the test split, evaluated once at the end (schema 2 on),
- `train/train_grad_weight.parquet` (GRAD_WEIGHT_COLUMNS),
- the metric `train/loss` (token-mean NLL of each step), and at every evaluation the validation
  losses overall and per length bucket (VAL_BUCKET_METRICS),
- at the end, the metrics `train/clipped_fraction` (share of all steps whose gradient was
  clipped) and `train/grad_norm_median` (median pre-clip gradient norm over all steps),
- the tag `loss_scale` and metric `train/loss_scale`: `sum`'s token weight (`auto` resolved).
Runs of a schema outside `READABLE_SCHEMAS` are refused by the analysis. Schema 1 runs have no
test split: a comparison tuned on them is selected and reported on the validation split.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

SCHEMA_VERSION = "2"  # bump when a name or column below changes meaning
READABLE_SCHEMAS = ("1", "2")  # what the analysis reads: 1 is 2 without the test split
SCHEMAS_WITHOUT_TEST = ("1",)

# The reductions (harness/training/reduction.py defines them); a run's tag reduce_loss is one of these.
MODES = ("mean", "sum", "token_mean", "seq_mean")

# Tags of every training run.
TAG_MODE = "reduce_loss"
TAG_SEED = "seed"
TAG_PAIR = "pair_id"  # equal for runs whose resolved configs differ only in reduce_loss
TAG_INIT = "init_fingerprint"  # hash of the initial parameters
TAG_DATA = "data_fingerprint"  # hash of the tokenised training, validation and test examples and the training order
TAG_SCHEMA = "schema_version"
TAG_JOB = "job_key"  # the job a run belongs to (harness/runs/jobs.py); runs of one job are duplicates
TAG_LOSS_SCALE = "loss_scale"  # the resolved loss_scale (the param holds `auto` when asked for)
RUN_TAGS = [TAG_MODE, TAG_SEED, TAG_PAIR, TAG_INIT, TAG_DATA, TAG_SCHEMA]
FINGERPRINT_TAGS = [TAG_INIT, TAG_DATA]

# Tags of some runs. A run that FINISHED but looks broken is flagged; the analysis refuses
# flagged runs, and runs that did not finish, unless told to include them.
TAG_FLAG = "flag"  # comma-separated FLAGS
TAG_FLAG_REASON = "flag_reason"  # the figures behind the flags, one sentence each
FLAG_LOSS_ROSE = "loss_rose"  # token-mean training loss of the last steps above that of the first
FLAG_GRAD_ZERO = "grad_norm_zero"  # the gradient was exactly zero at some step
FLAGS = [FLAG_LOSS_ROSE, FLAG_GRAD_ZERO]
TAG_ERROR = "error"  # why a FAILED run failed
TAG_CACHE = "tokenisation_cache"  # built (by this command), reused (from an earlier one), none (not cached)

# On a sweep's parent run: the config keys whose value differs between its jobs (comma-separated).
TAG_SWEPT_KEYS = "swept_keys"

# The sweep folder holds the parent run's id, so jobs and the analysis can find it.
PARENT_ID_FILE = "mlflow_parent_run_id"

# Per-example validation losses, one row per validation example.
EVAL_DIR = "eval"
FINAL_EVAL = "final.parquet"
TEST_EVAL = "test.parquet"  # the test split's per-example losses after the last step, in EVAL_DIR
TEST_METRIC_PREFIX = "test/"  # test/token_loss, test/seq_loss at the last step
FINAL_EVAL_CSV = "final.csv"  # the same rows as CSV, which MLflow's artifact view shows as a table
EVAL_COLUMNS = ["example_id", "seq_len", "target_tokens", "loss_sum", "loss_mean"]
_STEP_FILE = re.compile(r"^step_(\d{8})\.parquet$")

# Per training example: times seen and the gradient weight it carried over the run.
TRAIN_DIR = "train"
GRAD_WEIGHT_FILE = "train_grad_weight.parquet"
GRAD_WEIGHT_COLUMNS = ["example_id", "seq_len", "target_tokens", "times_seen", "grad_weight"]

TRAIN_LOSS_METRIC = "train/loss"
CLIPPED_FRACTION_METRIC = "train/clipped_fraction"
GRAD_NORM_MEDIAN_METRIC = "train/grad_norm_median"
LOSS_SCALE_METRIC = "train/loss_scale"


# Length buckets: the analysis's default, which a run also uses for its per-bucket validation
# metrics (VAL_BUCKET_METRICS), so both cut the validation set at the same edges.
BUCKET_BY = "seq_len"  # the example column bucketed by default (or target_tokens)
BUCKETS = 6  # equal-count quantile buckets of the validation set
# Per evaluation and bucket: token-weighted and example-weighted mean NLL, e.g. val/token_loss/b1_69-73.
VAL_BUCKET_METRICS = {"token_loss": "val/token_loss/{bucket}", "example_loss": "val/seq_loss/{bucket}"}


class BucketError(ValueError):
    """The asked-for buckets of a set of lengths would leave some bucket empty (the message: the edges)."""


def bucket_edges(values, buckets: int = BUCKETS, inner: list[float] | None = None) -> np.ndarray:
    """Bucket edges [lo, e1, ..., hi] of `values` (the validation examples' lengths, one per
    example): `buckets` equal-count quantile buckets, or the fixed `inner` edges (those outside
    the values' range are left out). The top edge lies above the maximum. Raises BucketError when
    a bucket would be empty."""
    values = np.asarray(values, dtype=float)
    if inner:
        asked = np.unique(np.asarray(inner, dtype=float))
        kept = asked[(asked > values.min()) & (asked <= values.max())]  # edges outside the data make empty buckets
        edges = np.concatenate([[values.min()], kept, [values.max() + 1]])
    else:
        edges = np.quantile(values, np.linspace(0, 1, buckets + 1))
        edges[-1] += 1  # the top bucket includes the maximum
    counts = np.bincount(assign_buckets(values, edges), minlength=len(edges) - 1)
    if (np.diff(edges) <= 0).any() or (counts == 0).any():
        raise BucketError(f"edges {np.round(edges, 1).tolist()}")
    return edges


def assign_buckets(values, edges: np.ndarray) -> np.ndarray:
    """The bucket (0, 1, ...) of each value."""
    return np.clip(np.searchsorted(edges, np.asarray(values, dtype=float), side="right") - 1, 0, len(edges) - 2)


def bucket_labels(edges: np.ndarray) -> list[str]:
    """`69-73`: the lengths a bucket holds, both ends included."""
    return [f"{int(np.ceil(lo))}-{int(np.ceil(hi)) - 1}" for lo, hi in zip(edges[:-1], edges[1:])]


def bucket_keys(labels: list[str]) -> list[str]:
    """Names that sort as the buckets do, for MLflow's metric names: `b1_69-73`, ..., `b6_242-427`
    (zero-padded from ten buckets on: `b01_`)."""
    width = len(str(len(labels)))
    return [f"b{i + 1:0{width}d}_{label}" for i, label in enumerate(labels)]


def eval_file(step: int) -> str:
    return f"step_{step:08d}.parquet"


def step_of(file_name: str) -> int | None:
    """The step of an `eval/step_<8 digits>.parquet` file name; None for any other name."""
    match = _STEP_FILE.match(Path(file_name).name)
    return int(match.group(1)) if match else None


def parent_run_id(sweep_dir: Path) -> str | None:
    f = Path(sweep_dir) / PARENT_ID_FILE
    return f.read_text().strip() if f.exists() else None


# scheme://user:password@ (Hydra writes the colons of an override as \:)
USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*\\?://)[^/@\s'\"]+@")
HIDDEN = "***"


def redact(text: str) -> str:
    """`text` with the user and password of every URI in it replaced by ***: what is stored or
    shown of a tracking URI (harness/runs/credentials.py keeps them out of logs and job files)."""
    return USERINFO.sub(rf"\g<scheme>{HIDDEN}@", text)


def resolve_uri(uri: str) -> str:
    """`sqlite:///mlflow.db` means a file in the launch directory; make it absolute."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri
