"""Tokenizer and causal LM: the embedded tiny LLaMA, or any Hugging Face checkpoint."""

from __future__ import annotations

import glob
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from harness.chat_tokenizer import build_char_tokenizer

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")


class ModelError(ValueError):
    """Bad model input (says what and where)."""


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}[name]


def _check_local(path: str, need_weights: bool) -> None:
    looks_local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path)
    if not looks_local:
        return  # a Hub id
    if not os.path.isdir(path):
        raise ModelError(f"model.name_or_path={path!r}: no such folder")
    if need_weights and not any(glob.glob(os.path.join(path, p)) for p in WEIGHT_PATTERNS):
        raise ModelError(f"model.name_or_path={path!r}: folder holds no safetensors weights")


def load_tokenizer(cfg):
    """The tokenizer of the model config `cfg` (the `model` group), with a chat template.

    Opening the model source here, first, makes a missing folder or missing weights fail in one
    line before anything else starts."""
    if cfg.kind == "tiny_llama":
        return build_char_tokenizer()
    _check_local(cfg.name_or_path, need_weights=cfg.init == "pretrained")
    tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    if cfg.chat_template:
        tokenizer.chat_template = cfg.chat_template
    if not tokenizer.chat_template:
        raise ModelError(
            f"tokenizer of {cfg.name_or_path!r} has no chat template; set model.chat_template"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(cfg, tokenizer, seed: int) -> torch.nn.Module:
    """The model, on the CPU, initialised from `seed` alone (for random init)."""
    torch.manual_seed(seed)
    dtype = _dtype(cfg.dtype)
    if cfg.kind == "tiny_llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
        config._attn_implementation = "sdpa" if cfg.attn_implementation == "auto" else cfg.attn_implementation
        return LlamaForCausalLM(config).to(dtype)
    attention = "sdpa" if cfg.attn_implementation == "auto" else cfg.attn_implementation
    common = dict(trust_remote_code=cfg.trust_remote_code, attn_implementation=attention)
    if cfg.init == "random":
        config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, **common)
    return AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=dtype, use_safetensors=True, **common)


def choose_attention(model, setting: str, device: torch.device, packed: bool) -> None:
    """`auto`: FlexAttention for packed rows on CUDA (a block-sparse document mask; sdpa would
    need a dense [L, L] mask there), sdpa otherwise (FlexAttention has no CPU backward)."""
    if setting == "auto" and device.type == "cuda" and packed:
        model.set_attn_implementation("flex_attention")
