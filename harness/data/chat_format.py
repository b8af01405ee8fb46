"""Turn a conversation into token ids and loss labels with the tokenizer's chat template.

Which tokens are the assistant's is found by rendering the conversation prefix by prefix:
the text an assistant turn adds after the generation prompt is the reply. This works for any
template, with or without `{% generation %}` markers.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100


class ConversationError(ValueError):
    """A conversation that cannot be trained on (says which and why)."""


# What the length policy made of a conversation.
OK, TRUNCATED, DROPPED_TOO_LONG, DROPPED_NO_TARGET = "ok", "truncated", "dropped_too_long", "dropped_no_target"


@dataclass
class Encoded:
    input_ids: list[int]  # empty when dropped
    labels: list[int]  # IGNORE except on assistant tokens
    status: str  # OK | TRUNCATED | DROPPED_TOO_LONG | DROPPED_NO_TARGET

    @property
    def dropped(self) -> bool:
        return self.status in (DROPPED_TOO_LONG, DROPPED_NO_TARGET)


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of every assistant reply.

    A span runs from the end of the generation prompt to the end of the turn, without the
    whitespace the template puts between turns.
    """
    text = _render(tokenizer, messages)
    spans = []
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:j], add_generation_prompt=True)
        through = _render(tokenizer, messages[: j + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise ConversationError(
                "the chat template does not render conversations prefix by prefix "
                f"(turn {j}); cannot locate assistant tokens"
            )
        end = len(through.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return text, spans


def encode(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and labels that keep only assistant tokens."""
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    span_i = 0
    for k, (start, end) in enumerate(enc["offset_mapping"]):
        while span_i < len(spans) and start >= spans[span_i][1]:
            span_i += 1
        if span_i == len(spans):
            break
        if end > start and start >= spans[span_i][0]:
            labels[k] = ids[k]
    return ids, labels


def encode_truncated(tokenizer, messages, max_seq_len: int, policy: str) -> Encoded:
    """Apply the length policy (`truncate` or `drop`); the status says what happened."""
    ids, labels = encode(tokenizer, messages)
    truncated = len(ids) > max_seq_len
    if truncated:
        if policy == "drop":
            return Encoded([], [], DROPPED_TOO_LONG)
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    # labels[0] never counts: the first token has nothing before it to predict it from.
    if all(label == IGNORE for label in labels[1:]):
        return Encoded([], [], DROPPED_NO_TARGET)
    return Encoded(ids, labels, TRUNCATED if truncated else OK)


def normalize_messages(messages, role_names: dict[str, str], where: str) -> list[dict]:
    """Check one conversation's shape and map its roles onto system/user/assistant.

    `role_names` maps our role to the name the data uses, e.g. {"assistant": "gpt"}.
    """
    to_ours = {theirs: ours for ours, theirs in role_names.items()}
    if not isinstance(messages, list) or not messages:
        raise ConversationError(f"{where}: messages must be a non-empty list of turns")
    out = []
    for t, turn in enumerate(messages):
        # Arrow fills keys that other rows have with None, so a missing key may read as None.
        if not isinstance(turn, dict) or turn.get("role") is None or turn.get("content") is None:
            raise ConversationError(f"{where}, turn {t}: a turn must be {{role, content}}, got {turn!r:.80}")
        if turn["role"] not in to_ours:
            raise ConversationError(
                f"{where}, turn {t}: unknown role {turn['role']!r}; "
                f"known roles: {', '.join(sorted(to_ours))}"
            )
        if not isinstance(turn["content"], str):
            raise ConversationError(f"{where}, turn {t}: content must be text")
        out.append({"role": to_ours[turn["role"]], "content": turn["content"]})
    if not any(turn["role"] == "assistant" for turn in out):
        raise ConversationError(f"{where}: the conversation has no assistant turn")
    return out
