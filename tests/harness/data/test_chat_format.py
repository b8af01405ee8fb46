import pytest

from harness.data.batching import Example, pad
from harness.data.chat_format import (DROPPED_NO_TARGET, DROPPED_TOO_LONG, IGNORE, OK, TRUNCATED, ConversationError,
                                 encode, encode_truncated, normalize_messages)
from harness.model.chat_tokenizer import build_char_tokenizer

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "count to 3"},
    {"role": "assistant", "content": "1 2 3"},
]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_labels_cover_exactly_the_assistant_replies(tok):
    ids, labels = encode(tok, CONVERSATION)
    kept = tok.decode([l for l in labels if l != IGNORE])
    assert kept == "hello there<|im_end|>1 2 3<|im_end|>"
    assert len(ids) == len(labels)


def test_spans_agree_with_generation_markers(tok):
    ids, labels = encode(tok, CONVERSATION)
    marked = tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    assert marked["input_ids"] == ids
    assert [l != IGNORE for l in labels] == [bool(m) for m in marked["assistant_masks"]]


def test_prompt_tokens_carry_no_loss(tok):
    ids, labels = encode(tok, CONVERSATION[:3])
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert all(l == IGNORE for l in labels[:n_prompt])
    assert all(l != IGNORE for l in labels[n_prompt : n_prompt + len("hello there") + 1])


def test_padding_carries_no_loss(tok):
    short = Example.from_labels("a", *encode(tok, CONVERSATION[:3]))
    long = Example.from_labels("b", *encode(tok, CONVERSATION))
    batch = pad([short, long], pad_id=tok.pad_token_id)
    row = batch.targets[0]
    assert (row[short.seq_len :] == IGNORE).all()
    assert (batch.seq_index[0, short.seq_len :] == -1).all()
    assert int(batch.target_mask.sum()) == short.target_tokens + long.target_tokens


def test_truncate_and_drop(tok):
    ids, _ = encode(tok, CONVERSATION)
    whole = encode_truncated(tok, CONVERSATION, len(ids) + 5, "drop")
    assert whole.status == OK and whole.input_ids == ids and not whole.dropped
    too_long = encode_truncated(tok, CONVERSATION, len(ids) - 3, "drop")
    assert too_long.status == DROPPED_TOO_LONG and too_long.dropped and too_long.input_ids == []
    cut = encode_truncated(tok, CONVERSATION, len(ids) - 3, "truncate")
    assert cut.status == TRUNCATED and len(cut.input_ids) == len(ids) - 3 and not cut.dropped
    nothing = encode_truncated(tok, CONVERSATION, 20, "truncate")  # no assistant token left
    assert nothing.status == DROPPED_NO_TARGET and nothing.dropped


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user"}], "a turn must be {role, content}"),
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "user", "content": "x"}], "no assistant turn"),
])
def test_bad_conversations(messages, message):
    roles = {"system": "system", "user": "user", "assistant": "assistant"}
    with pytest.raises(ConversationError, match=message.replace("{", r"\{").replace("}", r"\}")):
        normalize_messages(messages, roles, "train example 7")
