"""Load a chat data set, apply the chat template, and keep loss only on assistant tokens.

Two sources: the embedded synthetic set (`data.kind=synthetic`) and anything
`datasets.load_dataset` reads (`data.kind=hf`: a Hub name, or json/parquet/csv files).
Both go through the same tokenisation, which `datasets` caches for file and Hub sources.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property

import datasets
import torch
from omegaconf import OmegaConf

from harness import synthetic_chat
from harness.chat_format import IGNORE, ConversationError, encode_truncated, normalize_messages

log = logging.getLogger(__name__)
TOKENISATION_VERSION = "1"  # bump when encode() changes, to invalidate caches


class DataError(ValueError):
    """Bad data input (says what and where)."""


@dataclass
class Example:
    example_id: str
    input_ids: list[int]
    targets: list[int]  # targets[t] is the label of token t+1; IGNORE where no loss

    @property
    def seq_len(self) -> int:
        return len(self.input_ids)

    @cached_property
    def target_tokens(self) -> int:
        return sum(t != IGNORE for t in self.targets)

    @cached_property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, targets) as tensors, made once and reused by every batch."""
        return torch.tensor(self.input_ids), torch.tensor(self.targets)


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example]
    counts: dict[str, int] = field(default_factory=dict)  # truncated / dropped, per reason
    cache_reused: bool = False


def _to_example(example_id: str, input_ids: list[int], labels: list[int]) -> Example:
    return Example(example_id, list(input_ids), list(labels[1:]) + [IGNORE])


def _role_names(cfg) -> dict[str, str]:
    return dict(cfg.get("role_names") or {"system": "system", "user": "user", "assistant": "assistant"})


def _load_raw(cfg) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The raw train and validation conversations, each row with `example_id` and `messages`."""
    if cfg.kind == "synthetic":
        rows = synthetic_chat.generate(cfg.num_train + cfg.num_val, cfg.seed)
        ds = datasets.Dataset.from_list(rows)
        return ds.select(range(cfg.num_train)), ds.select(range(cfg.num_train, len(ds)))
    return _load_hf(cfg)


def _file_list(data_files) -> list[str]:
    """Every path in a `data_files` value: a string, a list, or a dict of split -> either."""
    if not data_files:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in _file_list(v)]
    return [f for v in data_files for f in _file_list(v)]


def _data_files(cfg):
    files = cfg.get("data_files")
    return OmegaConf.to_container(files) if OmegaConf.is_config(files) else files


def _load_hf(cfg) -> tuple[datasets.Dataset, datasets.Dataset]:
    data_files = _data_files(cfg)
    for f in _file_list(data_files):
        if "://" not in f and not glob.glob(os.path.expanduser(f)):
            raise DataError(f"data.data_files: no such file {f!r}")
    try:
        ds = datasets.load_dataset(cfg.path, name=cfg.get("name"), data_files=data_files)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError,
            datasets.exceptions.DatasetGenerationError) as e:
        cause = e.__cause__ or e
        raise DataError(f"data.path={cfg.path!r} ({_source(cfg)}): {str(cause).splitlines()[0][:300]}") from e
    if cfg.split not in ds:
        raise DataError(f"data.split={cfg.split!r} not found; splits: {', '.join(ds)}")
    train = ds[cfg.split]
    column = cfg.messages_column
    if column not in train.column_names:
        raise DataError(
            f"data.messages_column={column!r} not found in {cfg.path}; columns: {', '.join(train.column_names)}"
        )
    id_column = cfg.get("id_column")
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

    if cfg.get("max_examples"):
        train = train.select(range(min(cfg.max_examples, len(train))))
    train = with_ids(train, cfg.split)
    if cfg.get("val_split"):
        if cfg.val_split not in ds:
            raise DataError(f"data.val_split={cfg.val_split!r} not found; splits: {', '.join(ds)}")
        val = with_ids(ds[cfg.val_split], cfg.val_split)
    else:
        parts = train.train_test_split(test_size=cfg.val_fraction, seed=cfg.seed, shuffle=True)
        train, val = parts["train"], parts["test"]
    return train, val


def _tokenizer_fingerprint(tokenizer) -> str:
    state = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else str(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((state + str(tokenizer.chat_template)).encode()).hexdigest()[:16]


def _cache_key(cfg, tokenizer, split_name: str) -> str:
    relevant = {k: cfg.get(k) for k in ("path", "name", "data_files", "split", "val_split", "val_fraction",
                                        "seed", "max_examples", "messages_column", "id_column",
                                        "max_seq_len", "truncation")}
    relevant["role_names"] = _role_names(cfg)
    blob = json.dumps(OmegaConf.to_container(OmegaConf.create(relevant), resolve=True), sort_keys=True)
    blob += _tokenizer_fingerprint(tokenizer) + TOKENISATION_VERSION + split_name
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _source(cfg) -> str:
    if cfg.kind == "synthetic":
        return "synthetic data"
    files = _data_files(cfg)
    return f"{cfg.path} {files}" if files else cfg.path


def _tokenize(split: datasets.Dataset, split_name: str, cfg, tokenizer) -> tuple[datasets.Dataset, bool]:
    role_names = _role_names(cfg)
    column = cfg.get("messages_column", "messages")
    source = _source(cfg)
    # the split of the source the rows come from (a held-out validation fraction comes from `split`)
    source_split = cfg.val_split if split_name == "validation" and cfg.get("val_split") else cfg.get("split", split_name)

    def encode_rows(batch, indices):
        out = {"input_ids": [], "labels": [], "status": []}
        rows = batch["row"] if "row" in batch else indices
        for row, messages in zip(rows, batch["messages"]):
            where = f"{source}, split {source_split!r} row {row}, column {column!r}"
            try:
                messages = normalize_messages(messages, role_names, where)
                enc = encode_truncated(tokenizer, messages, cfg.max_seq_len, cfg.truncation)
            except ConversationError as e:
                raise DataError(str(e)) from None
            if enc is None:
                n_tokens = len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
                status = "dropped_too_long" if n_tokens > cfg.max_seq_len and cfg.truncation == "drop" else "dropped_no_target"
                out["input_ids"].append([]), out["labels"].append([]), out["status"].append(status)
            else:
                out["input_ids"].append(enc.input_ids)
                out["labels"].append(enc.labels)
                out["status"].append("truncated" if enc.truncated else "ok")
        return out

    drop = [c for c in ("messages", "row") if c in split.column_names]
    kwargs = dict(batched=True, with_indices=True, remove_columns=drop, desc=f"tokenising {split_name}")
    reused = False
    if cfg.kind != "synthetic":
        cache_dir = os.path.expanduser(cfg.cache_dir)
        os.makedirs(cache_dir, exist_ok=True)
        cache_file = os.path.join(cache_dir, f"tokenized-{_cache_key(cfg, tokenizer, split_name)}.arrow")
        reused = bool(glob.glob(cache_file[: -len(".arrow")] + "*.arrow"))
        kwargs.update(cache_file_name=cache_file, load_from_cache_file=True, num_proc=cfg.get("num_proc") or None)
    return split.map(encode_rows, **kwargs), reused


def _examples(tokenized: datasets.Dataset, counts: dict[str, int], split_name: str) -> list[Example]:
    examples = []
    for row in tokenized:
        status = row["status"]
        if status != "ok":
            counts[f"{split_name}/{status}"] = counts.get(f"{split_name}/{status}", 0) + 1
        if not status.startswith("dropped"):
            examples.append(_to_example(row["example_id"], row["input_ids"], row["labels"]))
    return examples


def prepare_data(cfg, tokenizer) -> PreparedData:
    """Tokenised train and validation examples of the data config `cfg` (the `data` group)."""
    train_raw, val_raw = _load_raw(cfg)
    counts: dict[str, int] = {}
    train_tok, reused_train = _tokenize(train_raw, "train", cfg, tokenizer)
    val_tok, reused_val = _tokenize(val_raw, "validation", cfg, tokenizer)
    train, val = _examples(train_tok, counts, "train"), _examples(val_tok, counts, "validation")
    if counts:
        log.info("length policy %s at max_seq_len=%d: %s", cfg.truncation, cfg.max_seq_len,
                 ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    if not train:
        raise DataError(f"data: every training example was dropped ({counts}); raise data.max_seq_len or use truncation=truncate")
    if not val:
        raise DataError(f"data: every validation example was dropped ({counts})")
    return PreparedData(train, val, counts, cache_reused=reused_train and reused_val)
