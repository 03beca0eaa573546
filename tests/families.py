"""Tiny random models of twenty architecture families, built from their transformers configs
(no downloads): what the compatibility matrix runs on."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 128
# Shapes every family shares: 2 blocks, width 32, 4 heads of 8, MLP 64 (all multiples of 8, so
# N:M applies everywhere), 4 experts of width 32 with 2 chosen per token.
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64)
LLAMA_LIKE = dict(COMMON, intermediate_size=64, num_key_value_heads=2)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)

FAMILIES = {
    "Llama": lambda: tf.LlamaConfig(**LLAMA_LIKE),
    "Mistral": lambda: tf.MistralConfig(**LLAMA_LIKE),
    "Qwen2": lambda: tf.Qwen2Config(**LLAMA_LIKE),
    "Qwen3": lambda: tf.Qwen3Config(**LLAMA_LIKE, head_dim=8),
    "Gemma 2": lambda: tf.Gemma2Config(**LLAMA_LIKE, head_dim=8),
    "Gemma 3": lambda: tf.Gemma3TextConfig(**LLAMA_LIKE, head_dim=8),
    "Phi-3": lambda: tf.Phi3Config(**LLAMA_LIKE, pad_token_id=0),
    "OLMo 2": lambda: tf.Olmo2Config(**LLAMA_LIKE),
    "StableLM": lambda: tf.StableLmConfig(**LLAMA_LIKE),
    "GPT-NeoX": lambda: tf.GPTNeoXConfig(**COMMON, intermediate_size=64),
    "Falcon": lambda: tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      new_decoder_architecture=True, num_kv_heads=2),
    "BLOOM": lambda: tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
    "OPT": lambda: tf.OPTConfig(**COMMON, ffn_dim=64, word_embed_proj_dim=32),
    "GPT-2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                   bos_token_id=0, eos_token_id=0),
    "GPT-J": lambda: tf.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=8,
                                   bos_token_id=0, eos_token_id=0),
    "Mixtral": lambda: tf.MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    "Qwen2-MoE": lambda: tf.Qwen2MoeConfig(**LLAMA_LIKE, **MOE, num_experts=4, shared_expert_intermediate_size=64),
    "Qwen3-MoE": lambda: tf.Qwen3MoeConfig(**LLAMA_LIKE, **MOE, num_experts=4, head_dim=8),
    "Granite": lambda: tf.GraniteConfig(**LLAMA_LIKE),
    "Cohere": lambda: tf.CohereConfig(**LLAMA_LIKE),
}


def family_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A random model of ``family``, every parameter perturbed (no ties decide a mask)."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def family_tokens(n: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
