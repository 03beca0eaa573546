"""Tiny random causal LMs built from configs (no downloads), one per architecture family."""

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    Qwen2Config,
)

VOCAB = 128


def tiny_config(family: str):
    if family == "llama":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "qwen2":
        return Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                          bos_token_id=0, eos_token_id=0)
    raise ValueError(family)


def tiny_model(family: str = "llama", dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(family)
    config.tie_word_embeddings = False if family == "llama" else config.tie_word_embeddings
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    # Randomly initialised norms are all ones; perturb every parameter a little so that no
    # two heads or channels are identical and masks are not decided by ties.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def tokens(n: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
