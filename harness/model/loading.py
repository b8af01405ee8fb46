"""Tokenizer and causal LM: the embedded tiny LLaMA, any Hugging Face checkpoint, or a GGUF
checkpoint converted once into one (`model=smollm2`, `model=gemma3`, harness/model/gguf_convert.py)."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from harness.config import GGUF_KINDS, no_chat_template
from harness.model import chat_templates, gguf_convert
from harness.model.chat_tokenizer import build_char_tokenizer

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
log = logging.getLogger(__name__)


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


def checkpoint(cfg) -> str:
    """What `from_pretrained` reads: model=hf's `name_or_path`, or the folder converted from
    model=smollm2's or model=gemma3's GGUF (the package's, or `model.gguf_file`, checked against
    `model.sha256` when set)."""
    if cfg.kind not in GGUF_KINDS:
        return cfg.name_or_path
    try:
        if cfg.gguf_file:
            gguf = Path(os.path.expanduser(cfg.gguf_file))
            if not gguf.is_file():
                raise gguf_convert.ConversionError(f"model.gguf_file={cfg.gguf_file!r}: no such file")
        else:
            gguf = gguf_convert.packaged_gguf(cfg.kind, cfg.cache_dir)
        gguf_convert.check_sha256(gguf, cfg.get("sha256"))
        return str(gguf_convert.converted_folder(gguf, cfg.cache_dir))
    except gguf_convert.ConversionError as e:
        raise ModelError(str(e)) from None


def load_tokenizer(cfg):
    """The tokenizer of the model config `cfg` (the `model` group), with a chat template.

    Opening the model source here, first, makes a missing folder or missing weights fail in one
    line before anything else starts; a missing or unknown `model.chat_template` fails before that."""
    if cfg.kind == "tiny_llama":
        return build_char_tokenizer()
    if OmegaConf.is_missing(cfg, "chat_template"):
        raise ModelError(no_chat_template(cfg.kind))
    try:
        template = chat_templates.resolve(cfg.chat_template)
    except chat_templates.ChatTemplateError as e:
        raise ModelError(str(e)) from None
    path = checkpoint(cfg)
    _check_local(path, need_weights=cfg.init == "pretrained")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:  # no network, offline without a cached copy, no such repository
        raise ModelError(_unreachable(cfg.get("name_or_path", path), e)) from None
    if template:
        tokenizer.chat_template = template
    if not tokenizer.chat_template:
        raise ModelError(
            f"tokenizer of {path!r} has no chat template; set model.chat_template "
            f"(a name: {', '.join(sorted(chat_templates.NAMED))}; or a Jinja template)"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _unreachable(name: str, error: OSError) -> str:
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") else ""
    return (f"model.name_or_path={name!r}: cannot load it from the Hub or the local cache{offline}: "
            f"{(str(error).strip().splitlines() or [type(error).__name__])[0][:300]}")


def build_model(cfg, tokenizer, seed: int) -> torch.nn.Module:
    """The model, on the CPU, initialised from `seed` alone (for random init)."""
    torch.manual_seed(seed)
    dtype = _dtype(cfg.dtype)
    if dtype in (torch.bfloat16, torch.float16):
        log.warning("model.dtype=%s: the weights and AdamW's updates are kept in %s, which rounds away an "
                    "update smaller than about %.2g%% of a weight (most updates at fine-tuning learning rates); "
                    "model.dtype=float32 with trainer.precision=auto (bf16 autocast on CUDA) keeps them",
                    cfg.dtype, cfg.dtype, 100 * torch.finfo(dtype).eps / 2)
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
    path = checkpoint(cfg)
    try:
        if cfg.init == "random":
            config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
            return AutoModelForCausalLM.from_config(config, dtype=dtype, **common)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **common)
    except OSError as e:
        raise ModelError(_unreachable(cfg.get("name_or_path", path), e)) from None


def choose_attention(model, setting: str, device: torch.device, packed: bool) -> None:
    """`auto`: FlexAttention for packed rows on CUDA (a block-sparse document mask; sdpa would
    need a dense [L, L] mask there), sdpa otherwise (FlexAttention has no CPU backward)."""
    if setting == "auto" and device.type == "cuda" and packed:
        model.set_attn_implementation("flex_attention")


LIGER_KERNELS = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)


def apply_liger_kernels(model) -> None:
    """`model.liger_kernels=true`: Liger's Triton kernels for RMSNorm, SwiGLU and RoPE in this
    model (CUDA only, checked in harness/config.py). The loss stays the harness's own (chunked,
    weighted per token), so Liger's cross-entropy kernels are not used."""
    import inspect

    import liger_kernel.transformers as liger
    apply = getattr(liger, f"apply_liger_kernel_to_{model.config.model_type}", None)
    if apply is None:
        raise ModelError(f"model.liger_kernels=true: liger-kernel has no kernels for model type "
                         f"{model.config.model_type!r}; set model.liger_kernels=false")
    accepted = inspect.signature(apply).parameters
    apply(model=model, **{k: v for k, v in LIGER_KERNELS.items() if k in accepted})
    log.info("Liger kernels applied to the %s model: %s", model.config.model_type,
             ", ".join(k for k, v in LIGER_KERNELS.items() if v and k in accepted))
