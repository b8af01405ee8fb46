"""Where conversations come from: the embedded synthetic set (`data=synthetic`), anything
`datasets.load_dataset` reads (`data=hf`: a Hub name, or json/parquet/csv files), or ShareGPT
(`data=sharegpt`, harness/data/sharegpt.py).

A source gives train, validation and test splits whose rows are `(example_id, messages, row)`:
a stable id, the conversation as it is in the data, and its row in the source split (for
error messages). Tokenisation (harness/data/tokenise.py) is the same for every source.
Validation serves the curves and any selection (of a learning rate, say); the test split is
evaluated once, at the end, for reporting on examples no choice has seen.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from omegaconf import OmegaConf

from harness.data import sharegpt

from harness.data import synthetic_chat

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
    content: str = ""  # identifies the data's content (cacheable sources): part of the cache key
    counts: dict[str, int] = field(default_factory=dict)  # what the source read and left out, and why
    test: datasets.Dataset | None = None  # held out from training and validation; evaluated once, at the end


def load_source(cfg) -> Source:
    """The conversations of the data config `cfg` (the `data` group)."""
    if cfg.kind == "synthetic":
        return _synthetic(cfg)
    if cfg.kind == "sharegpt":
        return _sharegpt(cfg)
    return _hf(cfg)


def _synthetic(cfg) -> Source:
    # The test conversations are generated after the others, so train and validation stay as they
    # were before there was a test split.
    n_train, n_val, n_test = cfg.num_train, cfg.num_val, cfg.get("num_test", 0)
    rows = synthetic_chat.generate(n_train + n_val + n_test, cfg.seed)
    start_of_split = [0] * n_train + [n_train] * n_val + [n_train + n_val] * n_test
    ds = datasets.Dataset.from_list([{"example_id": r["example_id"], "messages": r["messages"],
                                      "row": i - start_of_split[i]} for i, r in enumerate(rows)])
    return Source(ds.select(range(n_train)), ds.select(range(n_train, n_train + n_val)), "synthetic data",
                  {"train": "train", "validation": "validation", "test": "test"}, "messages", ROLES, cacheable=False,
                  test=ds.select(range(n_train + n_val, len(ds)) if n_test else []))


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


def local_files(cfg) -> list[str] | None:
    """The local files `data.data_files` names, globs expanded; None if it names none, or a URL."""
    return _local_paths(file_list(data_files(cfg)) if cfg.get("data_files") else [])


def _local_paths(names: list[str]) -> list[str] | None:
    if not names or any("://" in f for f in names):
        return None
    return [path for f in names for path in sorted(glob.glob(os.path.expanduser(f)))]


_DIGESTS: dict[tuple, str] = {}  # one read per file per process (the pre-flight check and each job)


def file_digest(path: str) -> str:
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _DIGESTS[key]


def content_id(cfg, ds: datasets.DatasetDict) -> str:
    """Local files: a hash of their bytes, so an edited file is new data. Otherwise (the Hub,
    URLs) the fingerprints `datasets` gives what it loaded, which follow the data's revision."""
    files = local_files(cfg)
    if files:
        return "sha256:" + hashlib.sha256("".join(file_digest(f) for f in files).encode()).hexdigest()
    return "datasets:" + ",".join(f"{name}={ds[name]._fingerprint}" for name in sorted(ds))


def _hf(cfg) -> Source:
    files = data_files(cfg)
    for f in file_list(files):
        if "://" not in f and not glob.glob(os.path.expanduser(f)):
            raise DataError(f"data.data_files: no such file {f!r}")
    try:
        ds = datasets.load_dataset(cfg.path, name=cfg.name, data_files=files)
    except Exception as e:
        cause = e.__cause__ or e
        found = bad_file(cfg, cause)
        if found:
            raise DataError(found) from e
        if not isinstance(e, (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError,
                              datasets.exceptions.DatasetGenerationError)):  # ConnectionError: offline, not cached
            raise
        lines = str(cause).strip().splitlines() or [type(cause).__name__]
        said = lines[0][:300] + (f" ... {lines[-1][:200]}" if len(lines) > 1 else "")  # pyarrow: why is last
        raise DataError(f"data.path={cfg.path!r} ({describe(cfg)}): {said}") from e
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
    test_split, test_fraction = cfg.get("test_split"), cfg.get("test_fraction")
    if test_split:
        if test_split not in ds:
            raise DataError(f"data.test_split={test_split!r} not found; splits: {', '.join(ds)}")
        test = with_ids(ds[test_split], test_split)
    elif test_fraction:  # a further held-out fraction of what is left for training, drawn with `seed`
        parts = train.train_test_split(test_size=test_fraction, seed=cfg.seed, shuffle=True)
        train, test = parts["train"], parts["test"]
    else:
        test = None
    role_names = dict(cfg.role_names)
    return Source(train, val, describe(cfg), {"train": cfg.split, "validation": cfg.val_split or cfg.split,
                                              "test": test_split or cfg.split},
                  column, role_names, cacheable=True, content=content_id(cfg, ds), test=test)


# Why a data file could not be read, said in one line. Only asked after reading failed.
TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt")
_TYPE_CHANGE = re.compile(r"Column\((?P<path>[^)]*)\) changed from (?P<was>\w+) to (?P<now>\w+) in row \d+")
_JSON_TYPES = {str: "string", bool: "boolean", int: "number", float: "number", list: "array", dict: "object",
               type(None): "null"}


def bad_file(cfg, error: BaseException) -> str | None:
    """Name the local data file (and line) behind `error`: an empty file, bytes that are not
    UTF-8, or a JSON Lines row whose value has another type than the rows before it (pyarrow
    counts those rows within a block, so its own row number is not the file's)."""
    files = local_files(cfg) or []
    change = _TYPE_CHANGE.search(str(error))
    for path in files:
        text = path.endswith(TEXT_SUFFIXES)
        if os.path.getsize(path) == 0 or (text and not _has_text(path)):
            return f"data.data_files: {path} is empty"
        if text:
            found = _not_utf8(path)
            if found:
                return found
    if change:
        for path in files:
            found = _type_change(path, change["path"], change["was"], change["now"])
            if found:
                return found
    return None


def row_line(cfg, split: str, row: int) -> str | None:
    """Where row `row` of source split `split` is in a local JSON Lines file: "row 13 is line 14
    of FILE" (rows count from 0, lines from 1, blank lines hold no row); None if not such a file."""
    files = data_files(cfg) if cfg.get("data_files") else None
    if isinstance(files, dict):
        files = files.get(split)
    elif split != "train":  # a plain file list is datasets' split "train"
        files = None
    paths = _local_paths(file_list(files))
    if not paths or not all(path.endswith((".jsonl", ".json")) for path in paths):
        return None
    left = row
    for path in paths:
        with open(path, "rb") as f:
            first = f.read(1024).lstrip()[:1]
            if first != b"{":  # a JSON array, not one row per line
                return None
            f.seek(0)
            for number, line in enumerate(f, 1):
                if line.strip():
                    if left == 0:
                        return f"row {row} is line {number} of {path}"
                    left -= 1
    return None


def _has_text(path: str) -> bool:
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def _not_utf8(path: str) -> str | None:
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return (f"data.data_files: {path} line {number} is not UTF-8 text (byte {line[e.start]:#04x} at "
                        f"column {e.start + 1}); save the file as UTF-8")
    return None


def _type_change(path: str, where: str, was: str, now: str) -> str | None:
    """The first row of a JSON Lines file whose value at `where` (pyarrow's /a/[]/b) is a `now`."""
    keys = [k for k in where.split("/") if k]
    row = -1
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row += 1
            try:
                values = _values_at(json.loads(line), keys)
            except ValueError:
                return None
            if any(_JSON_TYPES.get(type(v)) == now for v in values):
                return (f"data.data_files: {path} row {row} (line {number}): {where} is a {now} where earlier "
                        f"rows have a {was}")
    return None


def _values_at(node, keys: list[str]) -> list:
    if not keys:
        return [node]
    key, rest = keys[0], keys[1:]
    if key == "[]":
        return [v for item in node for v in _values_at(item, rest)] if isinstance(node, list) else []
    return _values_at(node[key], rest) if isinstance(node, dict) and key in node else []


def _sharegpt(cfg) -> Source:
    try:
        if cfg.path:
            path = Path(os.path.expanduser(cfg.path))
            if not path.is_file():
                raise sharegpt.ShareGPTError(f"data.path={cfg.path!r}: no such file")
        else:
            path = sharegpt.packaged_file()
        conversations = sharegpt.cached_conversations(path, cfg.cache_dir)
    except sharegpt.ShareGPTError as e:
        raise DataError(str(e)) from None
    train, val, test, counts = sharegpt.select(conversations, single_turn=cfg.single_turn,
                                               max_examples=cfg.max_examples, val_fraction=cfg.val_fraction,
                                               seed=cfg.seed, test_fraction=cfg.get("test_fraction") or 0.0)
    if not len(train) or not len(val):
        left_out = ", ".join(f"{k}={v}" for k, v in counts.items() if v)
        raise DataError(f"data=sharegpt: no {'training' if not len(train) else 'validation'} conversation left "
                        f"after filtering {path.name} ({left_out})")
    return Source(train, val, f"ShareGPT {path}",
                  {"train": "train", "validation": "validation", "test": "test"}, "conversations", ROLES,
                  cacheable=True, content=f"sharegpt:{conversations.key}", counts=counts, test=test)
