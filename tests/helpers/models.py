"""A tiny float64 LLaMA and examples of chosen lengths, for exact gradient and loss checks."""

import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from harness.data.batching import Example
from harness.data.chat_format import IGNORE

VOCAB = 50


def tiny_model(seed: int = 0, dtype=torch.float64, vocab: int = VOCAB, positions: int = 256, hidden: int = 16,
               heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=positions)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(dtype)


def make_examples(lengths: list[int], prompt_len: int = 3, seed: int = 0, vocab: int = VOCAB) -> list[Example]:
    """Random token ids; the first `prompt_len` tokens are prompt (no loss)."""
    rng = random.Random(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = [rng.randrange(1, vocab) for _ in range(n)]
        labels = [IGNORE] * prompt_len + ids[prompt_len:]
        out.append(Example.from_labels(f"ex-{i:03d}", ids, labels))
    return out


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
