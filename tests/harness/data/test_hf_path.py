"""model=hf data=hf on a tiny saved model and a tulu-format JSONL, through the real CLI."""

import json

import datasets
import mlflow
import pandas as pd
import pyarrow
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from omegaconf import OmegaConf

from harness.data.chat_format import IGNORE
from harness.model.chat_tokenizer import build_char_tokenizer
from harness.config import CONF_DIR
from harness.data import tokenise
from harness.runs.fingerprint import data_fingerprint, params_fingerprint
from harness.model.loading import ModelError, build_model, load_tokenizer
from harness.data.sources import DataError
from harness.data.tokenise import prepare_data
from tests.helpers.cli import entry_check, run_cli
from tests.helpers.models import make_examples
from tests.helpers.store import new_store

# ChatML without generation markers: assistant spans must come from prefix rendering.
PLAIN_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MAX_SEQ_LEN = 160


def conversation(i: int) -> list[dict]:
    turns = [{"role": "system", "content": "answer briefly"}]
    for t in range(1 + i % 3):  # 1 to 3 exchanges
        turns += [{"role": "user", "content": f"q{i}.{t} " + "x" * (i % 7)},
                  {"role": "assistant", "content": f"a{i}.{t} " + "y" * ((i * 13 + t * 29) % 60)}]
    return turns


def render_len(messages) -> int:  # one token per character, one per special token
    return sum(1 + len(m["role"]) + 1 + len(m["content"]) + 1 + 1 for m in messages)


def expected_target_tokens(messages) -> int:
    return sum(len(m["content"]) + 1 for m in messages if m["role"] == "assistant")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tok = build_char_tokenizer()
    tok.chat_template = PLAIN_CHATML
    model_dir = root / "model"
    tok.save_pretrained(model_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    torch.manual_seed(12345)  # the checkpoint's weights, whatever earlier tests left in the global generator
    LlamaForCausalLM(config).save_pretrained(model_dir)
    rows = {split: [{"id": f"{split}_{i}", "source": "unit", "messages": conversation(i)} for i in range(n)]
            for split, n in (("train", 40), ("validation", 12), ("test", 8))}
    files = {}
    for split, items in rows.items():
        files[split] = root / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in items))
    return root, model_dir, files, rows


def data_cfg(files, **over):
    base = OmegaConf.load(CONF_DIR / "data" / "hf.yaml")
    return OmegaConf.merge(base, {"path": "json", "data_files": {k: str(v) for k, v in files.items()},
                                  "val_split": "validation", "id_column": "id", "max_seq_len": MAX_SEQ_LEN,
                                  "test_split": "test" if "test" in files else None,
                                  "cache_dir": str(files["train"].parent / "cache")}, over)


def model_cfg(model_dir, **over):
    base = OmegaConf.load(CONF_DIR / "model" / "hf.yaml")
    return OmegaConf.merge(base, {"name_or_path": str(model_dir), "dtype": "float32"}, over)


def test_labels_cover_exactly_the_assistant_turns(assets):
    root, model_dir, files, rows = assets
    tok = load_tokenizer(model_cfg(model_dir))
    data = prepare_data(data_cfg(files, max_seq_len=10_000), tok)
    by_id = {r["id"]: r["messages"] for r in rows["train"]}
    assert len(data.train) == 40
    for ex in data.train:
        kept = tok.decode([t for t in ex.targets if t != IGNORE])
        replies = [m["content"] + "<|im_end|>" for m in by_id[ex.example_id] if m["role"] == "assistant"]
        assert kept == "".join(replies)


def test_truncate_and_drop_counts(assets):
    root, model_dir, files, rows = assets
    tok = load_tokenizer(model_cfg(model_dir))
    too_long = sum(render_len(r["messages"]) > MAX_SEQ_LEN for r in rows["train"])
    assert 0 < too_long < 40
    dropped = prepare_data(data_cfg(files, truncation="drop"), tok)
    assert dropped.counts["train/dropped_too_long"] == too_long and len(dropped.train) == 40 - too_long
    cut = prepare_data(data_cfg(files, truncation="truncate"), tok)
    assert cut.counts["train/truncated"] == too_long and len(cut.train) == 40
    assert max(e.seq_len for e in cut.train) == MAX_SEQ_LEN
    # cut so short that no assistant token is left: dropped and counted, never trained on
    with pytest.raises(DataError, match="every training example was dropped"):
        prepare_data(data_cfg(files, truncation="truncate", max_seq_len=30), tok)


def test_tokenizer_without_chat_template_needs_one(assets, tmp_path):
    root, model_dir, files, rows = assets
    tok = build_char_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(tmp_path)  # a tokenizer alone: no weights, so init=random
    with pytest.raises(ModelError, match="has no chat template; set model.chat_template"):
        load_tokenizer(model_cfg(tmp_path, init="random"))
    assert load_tokenizer(model_cfg(tmp_path, init="random", chat_template=PLAIN_CHATML)).chat_template == PLAIN_CHATML


def test_editing_a_data_file_in_place_changes_the_cache_and_the_fingerprint(assets, tmp_path, monkeypatch):
    root, model_dir, files, rows = assets
    train = tmp_path / "train.jsonl"
    train.write_text(files["train"].read_text())
    cfg = data_cfg({"train": train, "validation": files["validation"]}, cache_dir=str(tmp_path / "cache"))
    tok = load_tokenizer(model_cfg(model_dir))
    monkeypatch.setattr(tokenise, "_BUILT", set())  # as if in a fresh process

    def prepared():
        data = prepare_data(cfg, tok)
        order = list(range(len(data.train)))
        return data, data_fingerprint(data.train, order, data.val), set((tmp_path / "cache").glob("*.arrow"))

    first, first_fp, first_cache = prepared()
    assert first.cache == "built" and len(first_cache) == 3  # train, validation, test
    monkeypatch.setattr(tokenise, "_BUILT", set())  # a later command
    again, again_fp, again_cache = prepared()
    assert again.cache == "reused" and again_cache == first_cache and again_fp == first_fp

    edited = [dict(r) for r in rows["train"]]
    edited[3] = {**edited[3], "messages": conversation(3)[:-1] + [{"role": "assistant", "content": "EDITED"}]}
    train.write_text("".join(json.dumps(r) + "\n" for r in edited))  # same path, new content
    monkeypatch.setattr(tokenise, "_BUILT", set())
    after, after_fp, after_cache = prepared()
    assert after.cache == "built" and len(after_cache - first_cache) == 3
    assert after_fp != first_fp
    tokens = {e.example_id: e.input_ids for e in after.train}
    assert "EDITED" in tok.decode(tokens["train_3"])
    assert tokens["train_4"] == {e.example_id: e.input_ids for e in first.train}["train_4"]


def test_the_data_fingerprint_follows_content_and_order():
    a, b = make_examples([5, 9, 7]), make_examples([5, 9, 7])
    assert data_fingerprint(a, [0, 2], b[:1]) == data_fingerprint(b, [0, 2], a[:1])
    assert data_fingerprint(a, [0, 2], b) != data_fingerprint(a, [2, 0], b)  # order
    assert data_fingerprint(a, [0, 2], b) != data_fingerprint(a, [0, 2], b[:1])  # validation set
    changed = make_examples([5, 9, 7])
    changed[1].input_ids[4] += 1  # one token of an example the order never reaches
    assert data_fingerprint(a, [0, 2], b) != data_fingerprint(changed, [0, 2], b)
    assert data_fingerprint(a, [0, 2], b, b[:1]) != data_fingerprint(a, [0, 2], b, b[1:])  # test set
    assert data_fingerprint(a, [0, 2], b, b[:1]) != data_fingerprint(a, [0, 2], b)


def test_a_test_split_named_or_drawn_from_what_trains(assets):
    """data.test_split names one; else data.test_fraction of what is left of data.split after
    validation, drawn with data.seed: validation stays as it was, no id is on two sides."""
    root, model_dir, files, rows = assets
    tok = load_tokenizer(model_cfg(model_dir))
    named = prepare_data(data_cfg(files, max_seq_len=10_000), tok)
    assert [e.example_id for e in named.test] == [f"test_{i}" for i in range(8)] and len(named.train) == 40
    only_train = {"train": files["train"]}
    drawn = prepare_data(data_cfg(only_train, val_split=None, val_fraction=0.25, test_fraction=0.2,
                                  max_seq_len=10_000), tok)
    ids = {name: {e.example_id for e in getattr(drawn, name)} for name in ("train", "val", "test")}
    assert (len(ids["val"]), len(ids["test"]), len(ids["train"])) == (10, 6, 24)
    assert not (ids["test"] & ids["train"]) and not (ids["test"] & ids["val"])
    assert ids["train"] | ids["val"] | ids["test"] == {f"train_{i}" for i in range(40)}
    again = prepare_data(data_cfg(only_train, val_split=None, val_fraction=0.25, test_fraction=0.4,
                                  max_seq_len=10_000), tok)
    assert {e.example_id for e in again.val} == ids["val"]  # validation does not depend on the test fraction
    with pytest.raises(DataError, match="data.test_split='nope' not found"):
        prepare_data(data_cfg(files, test_split="nope"), tok)


def bad_rows(case: str) -> bytes:
    good = [{"id": str(i), "messages": conversation(i)} for i in range(8)]
    lines = [json.dumps(r).encode() for r in good]
    if case == "empty":
        return b""
    if case == "blank":
        return b"\n  \n"
    if case == "not_utf8":
        lines[5] = lines[5].replace(b"a5.0 ", b"caf\xe9 ")  # latin-1
    if case == "number":
        lines[6] = json.dumps({"id": "6", "messages": [{"role": "user", "content": 42},
                                                       {"role": "assistant", "content": "a"}]}).encode()
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("case, expected", [
    ("empty", "data.data_files: {train} is empty"),
    ("blank", "data.data_files: {train} is empty"),
    ("not_utf8", "data.data_files: {train} line 6 is not UTF-8 text (byte 0xe9 at column"),
    ("number", "split 'train' row 6, column 'messages', turn 0: content must be text (row 6 is line 7 of {train})"),
])
def test_bad_data_files_are_named_with_the_right_row(assets, tmp_path, case, expected):
    root, model_dir, files, rows = assets
    train = tmp_path / "train.jsonl"
    train.write_bytes(bad_rows(case))
    cfg = data_cfg({"train": train}, val_split=None, val_fraction=0.25)
    with pytest.raises(DataError) as error:
        prepare_data(cfg, load_tokenizer(model_cfg(model_dir)))
    assert expected.format(train=train) in str(error.value)


def test_a_type_change_that_pyarrow_reports_in_its_own_block_is_found_in_the_file(assets, tmp_path, monkeypatch):
    """Versions of datasets that cannot mix types pass on pyarrow's error, whose row number
    counts within a block of the file; the message must name the file's row instead."""
    root, model_dir, files, rows = assets
    good = [{"id": str(i), "messages": conversation(i)} for i in range(3000)]
    good[2500]["messages"][0]["content"] = 7
    train = write_jsonl(tmp_path / "train.jsonl", good)

    def load_dataset(*args, **kwargs):
        error = datasets.exceptions.DatasetGenerationError("An error occurred while generating the dataset")
        raise error from pyarrow.ArrowInvalid("JSON parse error: Column(/messages/[]/content) changed from "
                                              "string to number in row 9")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError, match=rf"{train} row 2500 \(line 2501\): /messages/\[\]/content is a number "
                                         "where earlier rows have a string"):
        prepare_data(data_cfg({"train": train}, val_split=None, val_fraction=0.25),
                     load_tokenizer(model_cfg(model_dir)))


def hf_args(model_dir, files, cache_dir, *extra):
    """CLI overrides; `files` is {train, validation, test} or one file split by data.val_fraction and
    data.test_fraction."""
    source = ([f"data.data_files={{train:{files['train']},validation:{files['validation']},test:{files['test']}}}",
               "data.val_split=validation", "data.test_split=test"]
              if isinstance(files, dict) else [f"data.data_files={files}", "data.val_fraction=0.25",
                                               "data.test_fraction=0.2"])
    return ["model=hf", f"model.name_or_path={model_dir}", "model.dtype=float32",
            "data=hf", "data.path=json", *source, "data.id_column=id", f"data.max_seq_len={MAX_SEQ_LEN}",
            "data.truncation=drop", f"data.cache_dir={cache_dir}",
            "trainer.max_steps=3", "trainer.eval_every=3", "trainer.batch_size=4", *extra]


@pytest.mark.slow
def test_cli_trains_on_hf_model_and_json_data_and_reuses_tokenisation(assets, tmp_path):
    root, model_dir, files, rows = assets
    files = {split: tmp_path / path.name for split, path in files.items()}  # edited below
    for split, path in files.items():
        path.write_text((root / path.name).read_text())
    cache = tmp_path / "cache"
    new_store(tmp_path / "mlflow.db")
    first = run_cli(hf_args(model_dir, files, cache), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    cached = {p: p.stat().st_mtime_ns for p in cache.glob("*.arrow")}
    assert len(cached) == 3  # train, validation and test
    second = run_cli(hf_args(model_dir, files, cache, "seed=1"), tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.arrow")} == cached

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True).sort_values("start_time", ignore_index=True)
    assert (runs.status == "FINISHED").all() and len(runs) == 2
    assert list(runs["tags.tokenisation_cache"]) == ["built", "reused"]
    too_long = sum(render_len(r["messages"]) > MAX_SEQ_LEN for r in rows["train"])
    assert (runs["metrics.data/train/dropped_too_long"] == too_long).all()
    run_id = runs.run_id.iloc[0]
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval/final.parquet", dst_path=str(tmp_path))
    df = pd.read_parquet(local)
    by_id = {r["id"]: r["messages"] for r in rows["validation"]}
    kept = {i for i, m in by_id.items() if render_len(m) <= MAX_SEQ_LEN}
    assert set(df.example_id) == kept
    for row in df.itertuples():
        assert row.target_tokens == expected_target_tokens(by_id[row.example_id])
        assert row.seq_len == render_len(by_id[row.example_id])

    # the same command after editing the training file in place: new tokens, new cache, new fingerprint
    edited = [dict(r) for r in rows["train"]]
    edited[0]["messages"] = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "edited reply"}]
    write_jsonl(files["train"], edited)
    third = run_cli(hf_args(model_dir, files, cache), tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert len(set(cache.glob("*.arrow")) - set(cached)) == 3
    runs = mlflow.search_runs(search_all_experiments=True).sort_values("start_time", ignore_index=True)
    assert runs["tags.tokenisation_cache"].iloc[2] == "built"
    assert runs["tags.data_fingerprint"].iloc[2] != runs["tags.data_fingerprint"].iloc[0]
    assert runs["tags.pair_id"].iloc[2] == runs["tags.pair_id"].iloc[0]  # same config: the analysis refuses to pair them


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case, expected", [
    ("missing_file", "data.data_files: no such file"),
    ("no_column", "data.messages_column='messages' not found"),
    ("bad_turn", "row 1, column 'messages', turn 0: a turn must be {role, content}"),
    ("unknown_role", "row 2, column 'messages', turn 1: unknown role 'robot'"),
    ("no_assistant", "split 'train' row 0, column 'messages': the conversation has no assistant turn"),
    ("no_model", "no such folder"),
    ("no_weights", "folder holds no safetensors weights"),
    ("all_dropped", "every training example was dropped"),
    ("empty_file", "train.jsonl is empty"),
    ("not_utf8", "train.jsonl line 6 is not UTF-8 text (byte 0xe9"),
    ("number_content", "split 'train' row 6, column 'messages', turn 0: content must be text (row 6 is line 7 of"),
])
def test_bad_hf_input_fails_in_one_line(assets, tmp_path, case, expected, monkeypatch, capsys):
    root, model_dir, files, rows = assets
    good = [{"id": str(i), "messages": conversation(i)} for i in range(4)]
    train = tmp_path / "train.jsonl"
    extra = []
    if case == "missing_file":
        train = tmp_path / "nope.jsonl"
    elif case == "no_column":
        write_jsonl(train, [{"id": r["id"], "conversation": r["messages"]} for r in good])
    elif case == "bad_turn":
        write_jsonl(train, good[:1] + [{"id": "x", "messages": [{"role": "user", "text": "hi"}]}] + good[1:])
    elif case == "unknown_role":
        write_jsonl(train, good[:2] + [{"id": "x", "messages": [{"role": "user", "content": "a"},
                                                                 {"role": "robot", "content": "b"}]}])
    elif case == "no_assistant":
        write_jsonl(train, [{"id": "x", "messages": [{"role": "user", "content": "a"}]}] + good)
    elif case in ("empty_file", "not_utf8", "number_content"):
        train.write_bytes(bad_rows({"empty_file": "empty", "not_utf8": "not_utf8", "number_content": "number"}[case]))
    else:
        write_jsonl(train, good)
    model = model_dir
    if case == "no_model":
        model = tmp_path / "missing_model"
    elif case == "no_weights":
        model = tmp_path / "empty_model"
        model.mkdir()
    elif case == "all_dropped":
        extra = ["data.max_seq_len=20"]
    argv = ["-m", "reduce_loss=mean,sum", *hf_args(model, train, tmp_path / "cache", *extra)]
    code, stderr = entry_check(argv, tmp_path, through_cli=case == "unknown_role", monkeypatch=monkeypatch, capsys=capsys)
    assert code != 0
    lines = stderr.strip().splitlines()
    assert lines and expected in lines[-1], stderr[-2000:]
    assert lines[-1].startswith("error: ")
    assert not (tmp_path / "mlflow.db").exists()


def test_random_init_uses_the_checkpoint_config_and_the_seed(assets):
    root, model_dir, files, rows = assets
    tok = load_tokenizer(model_cfg(model_dir))
    pretrained = build_model(model_cfg(model_dir), tok, seed=0)
    random0 = build_model(model_cfg(model_dir, init="random"), tok, seed=0)
    assert sum(p.numel() for p in random0.parameters()) == sum(p.numel() for p in pretrained.parameters())
    fingerprints = {params_fingerprint(m) for m in (pretrained, random0)}
    fingerprints.add(params_fingerprint(build_model(model_cfg(model_dir, init="random"), tok, seed=1)))
    assert len(fingerprints) == 3
    assert params_fingerprint(build_model(model_cfg(model_dir, init="random"), tok, seed=0)) == params_fingerprint(random0)
    assert params_fingerprint(build_model(model_cfg(model_dir), tok, seed=5)) == params_fingerprint(pretrained)
