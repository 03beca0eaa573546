"""Tiny random models of every family structured pruning is tested on, from their transformers
configs (no downloads): hidden 64, 2 blocks, 4 query heads where the family allows GQA 2 KV heads."""

from __future__ import annotations

import torch
import transformers
from transformers import AutoModelForCausalLM

VOCAB = 128
IDS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)  # inside the tiny vocabulary
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=128, **IDS)
GQA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MOE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

CONFIGS = {
    "llama": ("LlamaConfig", {**COMMON, **GQA}),
    "mistral": ("MistralConfig", {**COMMON, **GQA}),
    "qwen2": ("Qwen2Config", {**COMMON, **GQA}),
    "qwen3": ("Qwen3Config", {**COMMON, **GQA, "head_dim": 16}),
    "gemma2": ("Gemma2Config", {**COMMON, **GQA, "head_dim": 16, "sliding_window": 16}),
    "gemma3": ("Gemma3TextConfig", {**COMMON, **GQA, "head_dim": 16, "sliding_window": 16}),
    "phi3": ("Phi3Config", {**COMMON, **GQA}),
    "olmo2": ("Olmo2Config", {**COMMON, **GQA}),
    "stablelm": ("StableLmConfig", {**COMMON, **GQA}),
    "gpt_neox": ("GPTNeoXConfig", {**COMMON, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                   "num_attention_heads": 4}),
    # Falcon, GPT-2, GPT-J: the MLP width left unset, as in their released configs (4 x hidden).
    "falcon": ("FalconConfig", {**IDS, "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "new_decoder_architecture": True, "num_kv_heads": 2}),
    "bloom": ("BloomConfig", {**IDS, "vocab_size": VOCAB, "hidden_size": 64, "n_layer": 2, "n_head": 4}),
    "opt": ("OPTConfig", {**COMMON, "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "word_embed_proj_dim": 64}),
    "gpt2": ("GPT2Config", {**IDS, "vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}),
    "gptj": ("GPTJConfig", {**IDS, "vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128,
                            "rotary_dim": 8}),
    "mixtral": ("MixtralConfig", {**COMMON, **MOE, "intermediate_size": 96, "num_local_experts": 4,
                                  "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", {**COMMON, **MOE, "intermediate_size": 128, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 96, "num_experts": 4,
                                     "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", {**COMMON, **MOE, "head_dim": 16, "intermediate_size": 128,
                                     "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2}),
    "granite": ("GraniteConfig", {**COMMON, **GQA}),
    "cohere": ("CohereConfig", {**COMMON, **GQA}),
}
FAMILIES = list(CONFIGS)
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]


def family_config(family: str, **overrides):
    name, kwargs = CONFIGS[family]
    return getattr(transformers, name)(**{**kwargs, **overrides})


def family_model(family: str, seed: int = 0, **overrides):
    """A random model of ``family``, every parameter perturbed so that no two heads, channels or
    experts tie (randomly initialised norms are all ones)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, **overrides), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma 2",
         "gemma3": "Gemma 3", "phi3": "Phi-3", "olmo2": "OLMo 2", "stablelm": "StableLM", "gpt_neox": "GPT-NeoX",
         "falcon": "Falcon", "bloom": "BLOOM", "opt": "OPT", "gpt2": "GPT-2", "gptj": "GPT-J", "mixtral": "Mixtral",
         "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE", "granite": "Granite", "cohere": "Cohere"}


def family_tokens(n: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
