"""ShareGPT-format JSON files written the way the packaged one is: an indented array that
ends inside its last record."""

import json
from pathlib import Path


def turn(who: str, text: str) -> dict:
    return {"from": who, "value": text}


def exchange(i: int, parts: int = 1) -> list[dict]:
    """`parts` user/assistant exchanges of varying lengths (ASCII, so any tokenizer reads them)."""
    turns = []
    for p in range(parts):
        turns += [turn("human", f"question {i}.{p} " + "q" * ((i * 7 + p) % 23)),
                  turn("gpt", f"answer {i}.{p} " + "a" * ((i * 13 + p * 5) % 41))]
    return turns


def write_cut_off(path: Path, records: list[dict], cut_record: dict | None = None) -> Path:
    """`records` in full, then `cut_record` (if any) cut off half-way, as the packaged file is."""
    text = "[\n" + ",\n".join(json.dumps(r, indent=2) for r in records)
    if cut_record is not None:
        tail = json.dumps(cut_record, indent=2)
        text += ",\n" + tail[: len(tail) // 2]
    path.write_text(text, encoding="utf-8")
    return path


def many_conversations(n: int, parts_every: int = 3) -> list[dict]:
    """n records; every `parts_every`-th source conversation is split into two parts, the second
    starting with the assistant, as long ShareGPT conversations were."""
    records, i = [], 0
    while len(records) < n:
        sid = f"src{i:04d}"
        if i % parts_every == 0:
            records.append({"id": f"{sid}_0", "conversations": exchange(i, parts=2)})
            records.append({"id": f"{sid}_1", "conversations": [turn("gpt", f"continued {i}")] + exchange(i + 1)})
        else:
            records.append({"id": f"{sid}_0", "conversations": exchange(i, parts=1 + i % 2)})
        i += 1
    return records[:n]


CUT_RECORD = {"id": "z_0", "conversations": exchange(9, parts=3)}  # the record a file ends inside
