"""The embedded tokenizer: one token per character, ChatML-style chat template.

Built by code, so the default run needs nothing from outside. It is a real
`PreTrainedTokenizerFast`, so the data pipeline treats it exactly like a Hub tokenizer.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"

# `{% generation %}` marks what the assistant says, so `return_assistant_tokens_mask` works;
# the harness itself does not rely on the markers (see chat_format.assistant_char_spans).
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " \n"


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    specials = [PAD, IM_START, IM_END, "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(CHARACTERS))}
    # BPE without merges splits any text into single characters.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(specials)
    backend.decoder = decoders.Fuse()  # characters join without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=IM_END,
        unk_token="<unk>",
        chat_template=CHATML_TEMPLATE,
    )
