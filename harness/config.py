"""Checks on a composed config, each failing with one line that names the bad value."""

from __future__ import annotations

import hashlib
import re
import secrets
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from harness.artifacts import MODES, redact, resolve_uri

CONFIG_NAME = "train"
# The checkout's conf/ (edited in place, also under `pip install -e`); an installed wheel carries
# a copy as harness/conf/ (setup.py).
_CHECKOUT_CONF = Path(__file__).resolve().parent.parent / "conf"
CONF_DIR = _CHECKOUT_CONF if (_CHECKOUT_CONF / f"{CONFIG_NAME}.yaml").is_file() else Path(__file__).resolve().parent / "conf"

# `${uid:}` in conf/train.yaml: a short random id, resolved once per process (use_cache, which
# Hydra copies into every job's config), so folders of sweeps started in the same second differ.
OmegaConf.register_new_resolver("uid", lambda: secrets.token_hex(3), use_cache=True, replace=True)


class ConfigError(ValueError):
    pass


GGUF_KINDS = ("smollm2", "gemma3")  # model kinds read from a GGUF file (harness/model/gguf_convert.py)


def no_chat_template(kind: str) -> str:
    """What a model config whose `chat_template` is required (`???`) and not given says."""
    return (f"model.chat_template is not set, and model={kind}'s tokenizer has no chat template of its own; "
            "give one: model.chat_template=gemma (Gemma's turn format), =chatml, or a Jinja template string")


def _choice(key: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")


def _int(key: str, value, minimum: int | None = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={value!r} is not an integer")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum}")


def _positive(key: str, value, alternative: str | None = None) -> None:
    if alternative is not None and value == alternative:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{key}={value!r} must be a number > 0" + (f" or {alternative}" if alternative else ""))


def _fraction(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"{key}={value!r} must be a number between 0 and 1")


def validate(cfg: DictConfig) -> None:
    # imported here, not above: --help and --cfg load this module and need no torch or transformers
    from transformers import SchedulerType

    from harness.distributed import launched_by_torchrun, started_by_harness, world_from_env

    _choice("reduce_loss", cfg.reduce_loss, MODES)
    _int("seed", cfg.seed, minimum=None)
    _positive("loss_scale", cfg.loss_scale, alternative="auto")

    t = cfg.trainer
    for key in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batch_size", "log_every"):
        _int(f"trainer.{key}", t[key])
    _int("trainer.warmup_steps", t.warmup_steps, minimum=0)
    _int("trainer.checkpoint_every", t.checkpoint_every, minimum=0)
    _int("trainer.keep_checkpoints", t.keep_checkpoints)
    if not isinstance(t.checkpoint_dir, str) or not t.checkpoint_dir:
        raise ConfigError(f"trainer.checkpoint_dir={t.checkpoint_dir!r} must be a folder name")
    _positive("trainer.lr", t.lr)
    if t.max_grad_norm is not None:  # null: no clipping (the norm is still measured and logged)
        _positive("trainer.max_grad_norm", t.max_grad_norm)
    _choice("trainer.device", t.device, ("auto", "cpu", "cuda"))
    _choice("trainer.precision", t.precision, ("auto", "fp32", "bf16-mixed"))
    _choice("trainer.scheduler", t.scheduler, [s.value for s in SchedulerType])
    _choice("trainer.compile", t.compile, ("auto", True, False))
    _choice("trainer.compile_scope", t.compile_scope, ("layers", "model"))
    if t.threads not in ("auto", None):
        _int("trainer.threads", t.threads)
    if t.loss_chunk_tokens not in ("auto", None):
        _int("trainer.loss_chunk_tokens", t.loss_chunk_tokens)
    _int("trainer.ranks_per_job", t.ranks_per_job)
    if t.ranks_per_job > 1 and launched_by_torchrun() and not started_by_harness():
        raise ConfigError(f"trainer.ranks_per_job={t.ranks_per_job} starts a job's ranks itself; under torchrun leave it at 1")
    if t.ranks_per_job > 1 and t.device != "cpu" and cuda_count() and t.ranks_per_job > cuda_count():
        raise ConfigError(f"trainer.ranks_per_job={t.ranks_per_job} needs as many GPUs; {cuda_count()} visible")
    running = world_from_env().size if launched_by_torchrun() else t.ranks_per_job
    if t.world_size is not None:
        _int("trainer.world_size", t.world_size)
    world = t.world_size or running
    chunks = t.grad_accum * world
    if t.batch_size < chunks:
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} leaves a rank without data: it must be at least "
            f"grad_accum*world_size={t.grad_accum}*{world}={chunks}"
        )
    if t.batch_size % chunks:
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} must be a multiple of grad_accum*world_size={chunks}"
        )
    if chunks % running:
        raise ConfigError(
            f"grad_accum*world_size={chunks} micro-batches cannot be shared evenly by the {running} ranks running"
        )
    rows = t.tokens_per_micro_batch
    if rows == "auto":
        _int("trainer.auto_row_lengths", t.auto_row_lengths)
        rows = t.max_tokens_per_micro_batch
        _int("trainer.max_tokens_per_micro_batch", rows)
        if rows < cfg.data.max_seq_len:
            raise ConfigError(
                f"trainer.max_tokens_per_micro_batch={rows} is shorter than data.max_seq_len={cfg.data.max_seq_len}; "
                "trainer.tokens_per_micro_batch=auto needs rows that hold the longest example"
            )
    elif rows is not None:
        _int("trainer.tokens_per_micro_batch", rows)
        if rows < cfg.data.max_seq_len:
            raise ConfigError(
                f"trainer.tokens_per_micro_batch={rows} is shorter than "
                f"data.max_seq_len={cfg.data.max_seq_len}; a micro-batch must hold the longest example"
            )
    _int("trainer.jobs_per_gpu", t.jobs_per_gpu)
    if t.compile_cache_dir is not None and (not isinstance(t.compile_cache_dir, str) or not t.compile_cache_dir):
        raise ConfigError(f"trainer.compile_cache_dir={t.compile_cache_dir!r} must be a folder or null")

    d = cfg.data
    _int("data.max_seq_len", d.max_seq_len)
    _choice("data.truncation", d.truncation, ("truncate", "drop"))
    if d.packing and d.pack_length is not None:  # null: rows of max_seq_len tokens
        _int("data.pack_length", d.pack_length)
        if d.pack_length < d.max_seq_len:
            raise ConfigError(
                f"data.pack_length={d.pack_length} is shorter than data.max_seq_len={d.max_seq_len}; "
                "a packed row must hold the longest example"
            )
    if d.kind == "synthetic" and "num_test" in d:
        _int("data.num_test", d.num_test)
    if d.kind in ("sharegpt", "hf") and d.get("test_fraction") is not None and not d.get("test_split"):
        _fraction("data.test_fraction", d.test_fraction)
    if d.kind == "sharegpt":
        _fraction("data.val_fraction", d.val_fraction)
        if d.get("test_fraction") is not None and d.val_fraction + d.test_fraction >= 1:
            raise ConfigError(f"data.val_fraction={d.val_fraction} + data.test_fraction={d.test_fraction} "
                              "leave nothing to train on; their sum must be below 1")
        if d.max_examples is not None:
            _int("data.max_examples", d.max_examples)
        if not isinstance(d.single_turn, bool):
            raise ConfigError(f"data.single_turn={d.single_turn!r} must be true or false")
    if d.kind == "hf" and (OmegaConf.is_missing(d, "path") or d.path is None):
        raise ConfigError("data.path is not set; give a Hub name or json/parquet/csv with data.data_files")

    if cfg.get("tracking") is not None:
        _sqlite_folder(cfg.tracking.uri)

    m = cfg.model
    _choice("model.dtype", m.dtype, ("float32", "bfloat16", "float16", "float64"))
    if m.get("liger_kernels", False) is not False:
        _liger(m.liger_kernels, t.device)
    if m.kind in ("hf", *GGUF_KINDS):
        _choice("model.init", m.init, ("pretrained", "random"))
        if OmegaConf.is_missing(m, "chat_template"):
            raise ConfigError(no_chat_template(m.kind))
    if m.kind in GGUF_KINDS and m.get("sha256") is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", str(m.sha256)):
        raise ConfigError(f"model.sha256={m.sha256!r} is not a SHA-256 (64 hex digits); null checks nothing")
    if m.kind == "hf":
        if OmegaConf.is_missing(m, "name_or_path"):
            raise ConfigError("model.name_or_path is not set; give a Hub id or a local folder")


def _liger(setting, device: str) -> None:
    import importlib.util
    if setting is not True:
        raise ConfigError(f"model.liger_kernels={setting!r} must be true or false")
    if device == "cpu" or not cuda_count():
        raise ConfigError("model.liger_kernels=true runs Liger's Triton kernels, which need a CUDA GPU; "
                          "set model.liger_kernels=false here")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("model.liger_kernels=true needs liger-kernel: pip install liger-kernel==0.8.5")


def _sqlite_folder(uri: str) -> None:
    """A SQLite store may be created, but not its folder: a typo must not make folders."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        folder = Path(resolve_uri(uri)[len(prefix):]).parent
        if not folder.is_dir():
            raise ConfigError(f"tracking.uri={redact(uri)}: the folder {folder} does not exist; create it first")


MAX_JOB_DIRNAME = 100


def job_dirname(num, overrides: str) -> str:
    """A job's folder in its sweep: the job number and its overrides, made safe as one folder
    name (no '/', no '..', no credentials, at most MAX_JOB_DIRNAME characters)."""
    name = re.sub(r"\.{2,}|[^A-Za-z0-9_.,=+-]", "_", redact(str(overrides)))
    name = re.sub(r"_{2,}", "_", name).strip("._")
    if len(name) > MAX_JOB_DIRNAME:
        digest = hashlib.sha256(str(overrides).encode()).hexdigest()[:8]  # keeps names of long overrides apart
        name = f"{name[:MAX_JOB_DIRNAME - 9].rstrip('_.,=+-')}-{digest}"
    return f"{num}-{name}" if name else str(num)


OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)  # conf/train.yaml hydra.sweep.subdir


def ranks_need_a_launcher_without_submitit(ranks: int, launcher: str) -> ConfigError:
    """trainer.ranks_per_job > 1 under submitit's local launcher: refused in the pre-flight check
    (launcher from the command line) and again in the job (launcher from anywhere). Under
    hydra/launcher=slurm SLURM starts the ranks as the job's tasks (harness/launch/job_ranks.py)."""
    return ConfigError(f"trainer.ranks_per_job={ranks} runs under the basic, joblib and slurm launchers, not "
                       f"{launcher} (its preemption signal would reach the ranks unhandled)")


def cuda_count() -> int:
    """Visible CUDA devices (0 without CUDA)."""
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_jobs(ranks_per_job=1, jobs_per_gpu=1) -> int:
    """Jobs that run side by side on the visible GPUs, at least 1 (conf/hydra/launcher/gpus.yaml):
    one per `ranks_per_job` GPUs, times `jobs_per_gpu` jobs sharing each."""
    return max(1, cuda_count() // max(1, int(ranks_per_job))) * max(1, int(jobs_per_gpu))


OmegaConf.register_new_resolver("gpu_jobs", gpu_jobs, replace=True)


def row_length(data_cfg) -> int:
    """Tokens per packed row."""
    return data_cfg.pack_length or data_cfg.max_seq_len


def pair_key(cfg: DictConfig) -> dict:
    """The resolved config without `reduce_loss`: runs with equal keys form a pair."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("reduce_loss")
    return container
