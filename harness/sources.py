"""Where conversations come from: the embedded synthetic set (`data=synthetic`) or anything
`datasets.load_dataset` reads (`data=hf`: a Hub name, or json/parquet/csv files).

A source gives train and validation splits whose rows are `(example_id, messages, row)`:
a stable id, the conversation as it is in the data, and its row in the source split (for
error messages). Tokenisation (harness/tokenise.py) is the same for every source.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import datasets
from omegaconf import OmegaConf

from harness import synthetic_chat

ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


class DataError(ValueError):
    """Bad data input (says what and where)."""


@dataclass
class Source:
    train: datasets.Dataset  # columns: example_id, messages, row
    val: datasets.Dataset
    name: str  # what error messages call it
    splits: dict[str, str]  # "train"/"validation" -> the source split its rows come from
    column: str  # the data's conversation column
    role_names: dict[str, str]  # our role -> the data's name for it
    cacheable: bool  # tokenised rows are cached on disk (not worth it for generated data)


def load_source(cfg) -> Source:
    """The conversations of the data config `cfg` (the `data` group)."""
    if cfg.kind == "synthetic":
        return _synthetic(cfg)
    return _hf(cfg)


def _synthetic(cfg) -> Source:
    rows = synthetic_chat.generate(cfg.num_train + cfg.num_val, cfg.seed)
    ds = datasets.Dataset.from_list([{"example_id": r["example_id"], "messages": r["messages"],
                                      "row": i if i < cfg.num_train else i - cfg.num_train}
                                     for i, r in enumerate(rows)])
    return Source(ds.select(range(cfg.num_train)), ds.select(range(cfg.num_train, len(ds))), "synthetic data",
                  {"train": "train", "validation": "validation"}, "messages", ROLES, cacheable=False)


def file_list(data_files) -> list[str]:
    """Every path in a `data_files` value: a string, a list, or a dict of split -> either."""
    if not data_files:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in file_list(v)]
    return [f for v in data_files for f in file_list(v)]


def data_files(cfg):
    files = cfg.data_files
    return OmegaConf.to_container(files) if OmegaConf.is_config(files) else files


def describe(cfg) -> str:
    files = data_files(cfg)
    return f"{cfg.path} {files}" if files else cfg.path


def _hf(cfg) -> Source:
    files = data_files(cfg)
    for f in file_list(files):
        if "://" not in f and not glob.glob(os.path.expanduser(f)):
            raise DataError(f"data.data_files: no such file {f!r}")
    try:
        ds = datasets.load_dataset(cfg.path, name=cfg.name, data_files=files)
    except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError,
            datasets.exceptions.DatasetGenerationError) as e:  # ConnectionError: no network, or offline and not cached
        cause = e.__cause__ or e
        raise DataError(f"data.path={cfg.path!r} ({describe(cfg)}): {str(cause).splitlines()[0][:300]}") from e
    if cfg.split not in ds:
        raise DataError(f"data.split={cfg.split!r} not found; splits: {', '.join(ds)}")
    train = ds[cfg.split]
    column, id_column = cfg.messages_column, cfg.id_column
    if column not in train.column_names:
        raise DataError(
            f"data.messages_column={column!r} not found in {cfg.path}; columns: {', '.join(train.column_names)}"
        )
    if id_column and id_column not in train.column_names:
        raise DataError(f"data.id_column={id_column!r} not found; columns: {', '.join(train.column_names)}")

    def with_ids(split: datasets.Dataset, split_name: str) -> datasets.Dataset:
        """Keep the conversation, its source row and a stable id; drop the other columns."""
        rows = list(range(len(split)))
        ids = [str(x) for x in split[id_column]] if id_column else [f"{split_name}-{i:08d}" for i in rows]
        if len(set(ids)) != len(ids):
            dup = next(x for x in ids if ids.count(x) > 1)
            raise DataError(f"data.id_column={id_column!r}: ids in split {split_name!r} are not unique (e.g. {dup!r})")
        split = split.remove_columns([c for c in split.column_names if c != column])
        split = split.add_column("example_id", ids).add_column("row", rows)
        return split.rename_column(column, "messages") if column != "messages" else split

    if cfg.max_examples:
        train = train.select(range(min(cfg.max_examples, len(train))))
    train = with_ids(train, cfg.split)
    if cfg.val_split:
        if cfg.val_split not in ds:
            raise DataError(f"data.val_split={cfg.val_split!r} not found; splits: {', '.join(ds)}")
        val = with_ids(ds[cfg.val_split], cfg.val_split)
    else:  # a held-out fraction of `split`
        parts = train.train_test_split(test_size=cfg.val_fraction, seed=cfg.seed, shuffle=True)
        train, val = parts["train"], parts["test"]
    role_names = dict(cfg.role_names)
    return Source(train, val, describe(cfg), {"train": cfg.split, "validation": cfg.val_split or cfg.split},
                  column, role_names, cacheable=True)
