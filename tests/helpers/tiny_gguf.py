"""A tiny LLaMA written as a GGUF file the way llama.cpp writes one: byte-level BPE tokenizer
with a ChatML template, Q/K weights permuted, matrices quantised to Q4_1 (as in the SmolLM2
package), the rest float32. `expected_state_dict` is what a correct conversion must load."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from tokenizers.pre_tokenizers import ByteLevel

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
QUANTISED = (".attn_q.", ".attn_k.", ".attn_v.", ".attn_output.", ".ffn_gate.", ".ffn_up.", ".ffn_down.")


def _tokens() -> list[str]:
    byte_level = sorted(ByteLevel.alphabet())
    return SPECIAL + byte_level + [m.replace(" ", "") for m in MERGES]


def _config() -> LlamaConfig:
    return LlamaConfig(vocab_size=len(_tokens()), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of the Q and K rows (transformers undoes it when loading)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for hf, ours in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if ours == "attn_q":
                w = _permute(w, c.num_attention_heads)
            elif ours == "attn_k":
                w = _permute(w, c.num_key_value_heads)
            out[f"blk.{i}.{ours}.weight"] = w
    return out


def _writer(path: Path, architecture: str, name: str, c) -> "gguf.GGUFWriter":
    """A GGUF writer with the shape every architecture's file states, from the config `c`."""
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name(name)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    return w


def _write_out(w: "gguf.GGUFWriter", path: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """Write the GGUF file; returns its path."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config())
    c = model.config
    w = _writer(path, "llama", "tiny llama", c)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    tokens = _tokens()
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for name, tensor in _gguf_tensors(model).items():
        if any(q in name for q in QUANTISED):
            w.add_tensor(name, quants.quantize(tensor, GGMLQuantizationType.Q4_1),
                         raw_dtype=GGMLQuantizationType.Q4_1)
        else:
            w.add_tensor(name, tensor)
    return _write_out(w, path)


def expected_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights a correct conversion of `write_tiny_gguf(path, seed)` holds: the model's own,
    with every Q4_1 matrix replaced by its dequantised value."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config())
    c = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for key, value in sd.items():
        if value.dim() == 2 and "embed_tokens" not in key and "lm_head" not in key:
            w = value.numpy()
            heads = c.num_attention_heads if "q_proj" in key else c.num_key_value_heads if "k_proj" in key else None
            if heads:
                w = _permute(w, heads)
            d = quants.dequantize(quants.quantize(w, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
            sd[key] = torch.from_numpy(_unpermute(d, heads) if heads else d)
    return sd


# A tiny Gemma 3 written as llama.cpp writes one: a sentencepiece vocabulary with Gemma's
# special tokens (no merges and no chat template, like the packaged Gemma 3 270M), norms stored
# as 1 + weight, matrices and the embedding quantised to Q8_0 (as the real file's embedding is).
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
GEMMA_WORDS = ["▁t", "he", "▁the", "▁h", "▁he", "ll", "llo", "▁hello", "er", "re", "▁there"]
GEMMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def _gemma_tokens() -> list[str]:
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()\n") | {"▁"})
    return GEMMA_SPECIAL + [f"<0x{b:02X}>" for b in range(256)] + chars + GEMMA_WORDS


def _gemma_config():
    from transformers import Gemma3TextConfig
    # six layers: Gemma 3's pattern of five sliding-window layers, then one of full attention
    return Gemma3TextConfig(vocab_size=len(_gemma_tokens()), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
                            max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                            query_pre_attn_scalar=256, tie_word_embeddings=True,
                            pad_token_id=0, eos_token_id=1, bos_token_id=2)


def _gemma_model(seed: int):
    from transformers import Gemma3ForCausalLM
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(_gemma_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # initialised to 0 (a norm's scale is 1 + weight): make the test see them
                p.normal_(0, 0.1)
    return model


def write_tiny_gemma3_gguf(path: Path, seed: int = 0) -> Path:
    """Write the GGUF file; returns its path."""
    model = _gemma_model(seed)
    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = _writer(path, "gemma3", "tiny gemma 3", c)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(c.sliding_window)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    tokens = _gemma_tokens()
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([3 if t in GEMMA_SPECIAL and t != "<unk>" else 2 if t == "<unk>" else 6 if t.startswith("<0x") else 1
                       for t in tokens])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    for i in range(c.num_hidden_layers):
        for hf, ours in GEMMA_NAMES.items():
            tensors[f"blk.{i}.{ours}.weight"] = sd[f"model.layers.{i}.{hf}.weight"]
    for name, tensor in tensors.items():
        if "norm" in name:
            w.add_tensor(name, tensor + 1)  # llama.cpp stores Gemma's norms as 1 + weight
        else:
            w.add_tensor(name, quants.quantize(tensor, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    return _write_out(w, path)


def expected_gemma3_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights a correct conversion of `write_tiny_gemma3_gguf(path, seed)` holds."""
    sd = {k: v.detach().clone() for k, v in _gemma_model(seed).state_dict().items()}
    for key, value in sd.items():
        if value.dim() == 2:
            q8 = GGMLQuantizationType.Q8_0
            sd[key] = torch.from_numpy(quants.dequantize(quants.quantize(value.numpy(), q8), q8))
        elif "norm" in key:
            sd[key] = (value + 1) - 1  # as float32 rounds the stored 1 + weight
    return sd
