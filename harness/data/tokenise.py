"""Conversations to training examples: chat template, loss only on assistant tokens, the length
policy, and an on-disk cache of the tokenised rows (`datasets` caches by file name)."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import datasets
from omegaconf import OmegaConf

from harness.data.batching import Example
from harness.data.chat_format import ConversationError, encode_truncated, normalize_messages
from harness.data.sources import DataError, Source, bad_file, load_source, row_line

log = logging.getLogger(__name__)
TOKENISATION_VERSION = "1"  # bump when encode() changes, to invalidate caches
BAR_MIN_ROWS = 10_000  # smaller splits tokenise in about a second: no progress bar for them
CACHE_KEYS = ("kind", "path", "name", "data_files", "split", "val_split", "val_fraction", "seed", "max_examples",
              "messages_column", "id_column", "role_names", "max_seq_len", "truncation", "single_turn",
              "test_split", "test_fraction")


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example]
    test: list[Example] = field(default_factory=list)  # evaluated once, at the end (reporting, not selection)
    counts: dict[str, int] = field(default_factory=dict)  # "<split>/<status>" for every status but ok
    cache: str = "none"  # the tokenisation cache: built (in this process), reused (built before it), none


_BUILT: set[str] = set()  # cache files this process built (the pre-flight check builds what the job uses)


def tokenizer_fingerprint(tokenizer) -> str:
    state = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else str(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((state + str(tokenizer.chat_template)).encode()).hexdigest()[:16]


def _cache_key(cfg, source: Source, tokenizer, split_name: str) -> str:
    """The data config, the data's content, the tokenizer and the split: any change is a new cache."""
    relevant = OmegaConf.to_container(OmegaConf.masked_copy(cfg, list(CACHE_KEYS)), resolve=True)
    blob = (json.dumps(relevant, sort_keys=True) + source.content + tokenizer_fingerprint(tokenizer)
            + TOKENISATION_VERSION + split_name)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _tokenize(source: Source, split_name: str, cfg, tokenizer) -> tuple[datasets.Dataset, str]:
    split = {"train": source.train, "validation": source.val, "test": source.test}[split_name]

    def encode_rows(batch):
        out = {"input_ids": [], "labels": [], "status": []}
        for row, messages in zip(batch["row"], batch["messages"]):
            where = f"{source.name}, split {source.splits[split_name]!r} row {row}, column {source.column!r}"
            try:
                messages = normalize_messages(messages, source.role_names, where)
                enc = encode_truncated(tokenizer, messages, cfg.max_seq_len, cfg.truncation)
            except ConversationError as e:
                line = row_line(cfg, source.splits[split_name], row)
                raise DataError(f"{e} ({line})" if line else str(e)) from None
            out["input_ids"].append(enc.input_ids)
            out["labels"].append(enc.labels)
            out["status"].append(enc.status)
        return out

    kwargs = dict(batched=True, remove_columns=["messages", "row"], desc=f"tokenising {split_name}")
    if not source.cacheable:
        with _bar_if_long(split):
            return split.map(encode_rows, **kwargs), "none"
    cache_dir = os.path.expanduser(cfg.cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    cache_file = os.path.join(cache_dir, f"tokenized-{_cache_key(cfg, source, tokenizer, split_name)}.arrow")
    existed = bool(glob.glob(cache_file[: -len(".arrow")] + "*.arrow"))  # num_proc > 1 writes shards
    kwargs.update(cache_file_name=cache_file, load_from_cache_file=True, num_proc=cfg.num_proc or None)
    with _bar_if_long(split):
        tokenized = split.map(encode_rows, **kwargs)
    if not existed:
        _BUILT.add(cache_file)
    return tokenized, "reused" if existed and cache_file not in _BUILT else "built"


@contextmanager
def _bar_if_long(split: datasets.Dataset):
    """datasets' progress bar only for splits of BAR_MIN_ROWS rows or more."""
    quiet = len(split) < BAR_MIN_ROWS and datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _examples(tokenized: datasets.Dataset, counts: dict[str, int], split_name: str) -> list[Example]:
    examples = []
    for row in tokenized:
        status = row["status"]
        if status != "ok":
            counts[f"{split_name}/{status}"] = counts.get(f"{split_name}/{status}", 0) + 1
        if row["input_ids"]:  # dropped rows have none
            examples.append(Example.from_labels(row["example_id"], row["input_ids"], row["labels"]))
    return examples


def prepare_data(cfg, tokenizer) -> PreparedData:
    """Tokenised train and validation examples of the data config `cfg` (the `data` group)."""
    try:
        source = load_source(cfg)
        if source.counts:
            log.info("%s: %s", source.name, ", ".join(f"{k}={v}" for k, v in source.counts.items()))
        counts: dict[str, int] = {}
        train_tok, cache_train = _tokenize(source, "train", cfg, tokenizer)
        val_tok, cache_val = _tokenize(source, "validation", cfg, tokenizer)
        train, val = _examples(train_tok, counts, "train"), _examples(val_tok, counts, "validation")
        caches = {cache_train, cache_val}
        test = []
        if source.test is not None:
            test_tok, cache_test = _tokenize(source, "test", cfg, tokenizer)
            test = _examples(test_tok, counts, "test")
            caches.add(cache_test)
    except UnicodeDecodeError as e:  # pyarrow reads bytes that are not UTF-8; decoding a row fails
        raise DataError(bad_file(cfg, e) or f"data: text that is not UTF-8 ({e})") from None
    if counts:
        log.info("length policy %s at max_seq_len=%d: %s", cfg.truncation, cfg.max_seq_len,
                 ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    if not train:
        raise DataError(f"data: every training example was dropped ({counts}); raise data.max_seq_len or use truncation=truncate")
    if not val:
        raise DataError(f"data: every validation example was dropped ({counts})")
    check_test_split(train, val, test, source)
    counts |= {f"source/{k}": v for k, v in source.counts.items()}
    return PreparedData(train, val, test, counts, caches.pop() if len(caches) == 1 else "built")


def check_test_split(train: list[Example], val: list[Example], test: list[Example], source: Source) -> None:
    """The test split holds examples, and none of them is also a training or validation example."""
    if not test:
        why = "has no test split" if source.test is None else "leaves no test example"
        raise DataError(f"data: {source.name} {why}; the test split must hold examples (data.num_test, "
                        "data.test_split or data.test_fraction)")
    ids = {e.example_id for e in test}
    for name, other in (("training", train), ("validation", val)):
        shared = sorted(ids & {e.example_id for e in other})
        if shared:
            raise DataError(f"data: {len(shared)} example id(s) are both test and {name} examples (e.g. "
                            f"{shared[0]!r}); the test split must be held out")
