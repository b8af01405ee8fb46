"""Chat templates by name, for `model.chat_template` on models whose tokenizer ships none.

`model.chat_template` is either one of the names below or a Jinja template string (anything
with `{{` or `{%` in it). harness/data/chat_format.py finds a reply's tokens by rendering the
conversation prefix by prefix, so a template must render a conversation's prefix as a prefix of
the whole, with the generation prompt being what an assistant turn starts with.
"""

from __future__ import annotations

# Gemma's turn format, as in Gemma 3's instruction-tuned tokenizer: `<bos>`, then
# `<start_of_turn>{user|model}\n{text}<end_of_turn>\n` per turn. Gemma has no system role: a
# leading system message goes in front of the first turn's text, as Gemma's own template does.
# A reply's targets are its text and its `<end_of_turn>`, so the model learns to end a turn.
GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_prefix = messages[0]['content'] | trim + '\n\n' -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_prefix = '' -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' }}"
    "{{ (first_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# ChatML, the format of SmolLM2's and Qwen's instruction-tuned tokenizers.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

NAMED = {"gemma": GEMMA, "chatml": CHATML}


class ChatTemplateError(ValueError):
    """`model.chat_template` is neither a known name nor a Jinja template."""


def resolve(value: str | None) -> str | None:
    """The Jinja template `model.chat_template` stands for (None: the tokenizer's own)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ChatTemplateError(f"model.chat_template={value!r} must be a template name or a Jinja string")
    if value in NAMED:
        return NAMED[value]
    if "{{" in value or "{%" in value:
        return value
    raise ChatTemplateError(f"model.chat_template={value!r} is neither a named template "
                            f"({', '.join(sorted(NAMED))}) nor a Jinja template")
