"""Tiny causal LMs *with tokenizers*, saved as model directories, for io/data/CLI tests.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in memory on a few sentences,
the model a random Llama (or GPT-2) sized to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pruning removes weights from a network. "
    "Sparse models keep only a fraction of their parameters, and calibration data tells the "
    "solver which ones matter. "
) * 4
REPO = Path(__file__).resolve().parent.parent


def tiny_tokenizer():
    """A byte-level BPE tokenizer (any text encodes) with <s>, </s>, <unk>; about 300 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_model(tokenizer, family: str = "llama", dtype=torch.float32, intermediate: int = 128,
               max_positions: int = 128, seed: int = 0, tied: bool = True):
    """A random 2-block model over ``tokenizer``'s vocabulary."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=max_positions,
                            n_inner=intermediate, **ids)
    else:
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=intermediate,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=max_positions, tie_word_embeddings=tied, **ids)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():  # break the all-ones norms so no two channels tie
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def save_model_dir(path: Path, family: str = "llama", **kwargs) -> Path:
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, family=family, **kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path



def pruned_dirs(root: Path, method: str, nsamples: int) -> Path:
    """In ``root``: a tiny model directory (``tiny``), a calibration text (``text.txt``), and the
    model pruned to 50% by ``method`` and saved by ptp as ``dense`` and ``compressed``."""
    import ptp

    tokenizer = tiny_tokenizer()
    save_model_dir(root / "tiny")
    write_text(root / "text.txt")
    model = tiny_model(tokenizer)
    tokens = torch.randint(0, len(tokenizer), (nsamples, 32), generator=torch.Generator().manual_seed(0))
    report = ptp.prune(model, tokens, ptp.PruneConfig(method=method, sparsity="0.5"))
    ptp.save(model, tokenizer, root / "dense", report=report, sparsity="0.5")
    ptp.save(model, tokenizer, root / "compressed", report=report, sparsity="0.5", format="compressed")
    return root

def write_text(path: Path, repeats: int = 20) -> Path:
    path.write_text(TEXT * repeats, encoding="utf-8")
    return path


def run_python(code: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: Hugging Face libraries read HF_HOME and the offline
    switches once, at import, so cache-layout tests need a process of their own."""
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(autouse=False)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine the thread pool's
    spinning makes each 64-wide matmul ~20x slower; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
