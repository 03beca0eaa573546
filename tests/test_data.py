"""Calibration sources: the seeded window draw, local files, the named recipes (offline, from a
local Hugging Face cache layout) and self-calibration."""

from __future__ import annotations

import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ptp.config import ConfigError
from ptp.data import calibration_batches, document_windows, random_windows, self_calibration
from tests.lm_dirs import TEXT, one_thread, run_python, tiny_model, tiny_tokenizer, write_text

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def stream(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids


# --------------------------------------------------------------------------- random_windows


def test_random_windows_match_the_reference_draw():
    """SparseGPT/Wanda: random.seed(seed); i = random.randint(0, T - L - 1); window = ids[i:i+L]."""
    ids = torch.arange(1000, 2000)[None]
    random.seed(7)
    starts = [random.randint(0, 1000 - 64 - 1) for _ in range(10)]
    expected = torch.stack([ids[0, s : s + 64] for s in starts])
    assert torch.equal(random_windows(ids, 10, 64, seed=7), expected)


def test_random_windows_are_seeded():
    ids = torch.arange(5000)[None]
    assert torch.equal(random_windows(ids, 4, 16, 0), random_windows(ids, 4, 16, 0))
    assert not torch.equal(random_windows(ids, 4, 16, 0), random_windows(ids, 4, 16, 1))


def test_random_windows_reach_both_ends_and_never_run_past():
    ids = torch.arange(11)[None]  # T = 11, L = 10: starts 0 only (randint(0, 0))
    assert torch.equal(random_windows(ids, 3, 10, 0), torch.arange(10).repeat(3, 1))
    starts = random_windows(torch.arange(20)[None], 500, 10, 0)[:, 0]
    assert starts.min() == 0 and starts.max() == 9  # uniform over [0, T - L)


def test_random_windows_too_short_says_how_many_tokens():
    with pytest.raises(ConfigError, match="has 10 tokens, needs at least 11"):
        random_windows(torch.arange(10)[None], 1, 10, 0)


# --------------------------------------------------------------------------- local files


def test_txt_file_is_one_token_stream(tokenizer, tmp_path):
    """What the reproduction script does: the whole file tokenized at once, then random_windows."""
    path = write_text(tmp_path / "calib.txt")
    got = calibration_batches(str(path), tokenizer, nsamples=5, seqlen=32, seed=3)
    expected = random_windows(stream(tokenizer, path.read_text()), 5, 32, 3)
    assert torch.equal(got, expected)


def test_jsonl_and_parquet_use_the_text_field(tokenizer, tmp_path):
    docs = [TEXT[i * 100 : (i + 1) * 100] for i in range(6)]
    with open(tmp_path / "a.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"body": d, "id": 1}) + "\n")
    pq.write_table(pa.table({"body": docs}), tmp_path / "a.parquet")
    expected = random_windows(stream(tokenizer, "\n\n".join(docs)), 4, 16, 0)
    for name in ("a.jsonl", "a.parquet"):
        got = calibration_batches(str(tmp_path / name), tokenizer, 4, 16, 0, text_field="body")
        assert torch.equal(got, expected), name
    with pytest.raises(ConfigError, match="no field 'text'.*--text-field"):
        calibration_batches(str(tmp_path / "a.jsonl"), tokenizer, 4, 16, 0)


def test_directory_joins_its_files_in_sorted_order(tokenizer, tmp_path):
    (tmp_path / "b.txt").write_text("second file " * 30)
    (tmp_path / "a.txt").write_text("first file " * 30)
    (tmp_path / "notes.md").write_text("ignored")
    got = calibration_batches(str(tmp_path), tokenizer, 3, 16, 0)
    expected = random_windows(stream(tokenizer, "first file " * 30 + "\n\n" + "second file " * 30), 3, 16, 0)
    assert torch.equal(got, expected)


def test_short_source_and_unknown_source_are_config_errors(tokenizer, tmp_path):
    (tmp_path / "tiny.txt").write_text("just a few words")
    ntok = stream(tokenizer, "just a few words").shape[1]
    with pytest.raises(ConfigError, match=f"has {ntok} tokens, needs at least 65"):
        calibration_batches(str(tmp_path / "tiny.txt"), tokenizer, 2, 64, 0)
    with pytest.raises(ConfigError, match="unknown calibration source 'nope'.*wikitext2"):
        calibration_batches("nope", tokenizer, 2, 64, 0)


def test_seqlen_above_max_positions_is_refused(tokenizer, tmp_path):
    model = tiny_model(tokenizer, max_positions=64)
    with pytest.raises(ConfigError, match="seqlen 65 is above the model's maximum positions \\(64\\)"):
        calibration_batches(str(write_text(tmp_path / "c.txt")), tokenizer, 2, 65, 0, model=model)


# --------------------------------------------------------------------------- recipes


def reference_c4(docs, tokenizer, nsamples, seqlen, seed):
    """The SparseGPT C4 loader, written out: a random document longer than seqlen, a random window."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            enc = tokenizer(docs[i], return_tensors="pt").input_ids
            if enc.shape[1] > seqlen:
                break
        j = random.randint(0, enc.shape[1] - seqlen - 1)
        out.append(enc[0, j : j + seqlen])
    return torch.stack(out)


def fake_dataset_repo(hf_home, repo_id: str, files: dict[str, bytes], readme: str = "") -> None:
    """A dataset repository in the hub cache layout: datasets--org--name/{refs/main, snapshots/<sha>/...}."""
    sha = "0" * 40
    root = hf_home / "hub" / ("datasets--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    for name, content in {**files, "README.md": readme.encode()}.items():
        path = root / "snapshots" / sha / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def parquet_bytes(tmp_path, column: str, rows: list[str]) -> bytes:
    pq.write_table(pa.table({column: rows}), tmp_path / "t.parquet")
    return (tmp_path / "t.parquet").read_bytes()


def test_recipes_load_offline_from_the_hub_cache(tokenizer, tmp_path):
    """wikitext2, c4 and ptb through `datasets`, with HF_HUB_OFFLINE=1 and only a local cache."""
    hf_home = tmp_path / "hf"
    wiki = [f" = Section {i} = " if i % 5 == 0 else TEXT[i * 40 : i * 40 + 120] for i in range(30)]
    fake_dataset_repo(hf_home, "wikitext", {
        "wikitext-2-raw-v1/train-00000-of-00001.parquet": parquet_bytes(tmp_path, "text", wiki),
        # another config and split that the recipe must not pick up
        "wikitext-2-v1/train-00000-of-00001.parquet": parquet_bytes(tmp_path, "text", ["WRONG CONFIG"] * 50),
        "wikitext-2-raw-v1/test-00000-of-00001.parquet": parquet_bytes(tmp_path, "text", ["WRONG SPLIT"] * 50),
    }, readme="---\nconfigs:\n- config_name: wikitext-2-raw-v1\n  data_files:\n  - split: train\n"
              "    path: wikitext-2-raw-v1/train-*\n  - split: test\n    path: wikitext-2-raw-v1/test-*\n"
              "- config_name: wikitext-2-v1\n  data_files:\n  - split: train\n    path: wikitext-2-v1/train-*\n---\n")
    c4 = [("short doc " if i % 3 else "a long document about pruning " * 8) + str(i) for i in range(20)]
    fake_dataset_repo(hf_home, "allenai/c4", {
        "en/c4-train.00000-of-01024.json.gz": gzip.compress(
            "".join(json.dumps({"text": t, "url": "u"}) + "\n" for t in c4).encode()),
        "en/c4-train.00001-of-01024.json.gz": gzip.compress(json.dumps({"text": "WRONG SHARD " * 99}).encode()),
    })
    ptb = [TEXT[i * 30 : i * 30 + 60].lower() for i in range(40)]
    fake_dataset_repo(hf_home, "ptb_text_only", {
        "penn_treebank/train-00000-of-00001.parquet": parquet_bytes(tmp_path, "sentence", ptb),
    }, readme="---\nconfigs:\n- config_name: penn_treebank\n  data_files:\n  - split: train\n"
              "    path: penn_treebank/train-*\n---\n")
    tokenizer.save_pretrained(tmp_path / "tok")
    code = f"""
import torch
from transformers import AutoTokenizer
from ptp.data import calibration_batches
tok = AutoTokenizer.from_pretrained({str(tmp_path / 'tok')!r})
out = {{name: calibration_batches(name, tok, 6, 24, 5) for name in ("wikitext2", "c4", "ptb")}}
torch.save(out, {str(tmp_path / 'out.pt')!r})
"""
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = run_python(code, env)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert torch.equal(got["wikitext2"], random_windows(stream(tokenizer, "\n\n".join(wiki)), 6, 24, 5))
    assert torch.equal(got["c4"], reference_c4(c4, tokenizer, 6, 24, 5))
    assert torch.equal(got["ptb"], random_windows(stream(tokenizer, " ".join(ptb)), 6, 24, 5))


def test_uncached_recipe_offline_is_one_config_error(tmp_path):
    code = """
from ptp.data import recipe_texts, load_recipe, RECIPE_DIR
from ptp.config import ConfigError
try:
    recipe_texts(load_recipe(RECIPE_DIR / "wikitext2.json"))
except ConfigError as err:
    print("CONFIGERROR", err)
"""
    env = {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = run_python(code, env)
    assert "CONFIGERROR cannot load calibration dataset 'wikitext'" in result.stdout, result.stderr[-2000:]
    assert "--calib self" in result.stdout


def test_document_windows_refuse_a_source_without_long_documents(tokenizer):
    with pytest.raises(ConfigError, match="longest document has .* tokens, needs more than 500"):
        document_windows(["short one", "short two"], tokenizer, 2, 500, 0)


# --------------------------------------------------------------------------- self-calibration


@pytest.fixture(scope="module")
def peaky_model(tokenizer):
    """Sharp next-token distributions, so sampling outside the top-p nucleus would be visible."""
    model = tiny_model(tokenizer, tied=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # nucleus of ~10 of 300 tokens
    return model


def test_self_calibration_is_seeded_and_starts_at_bos(tokenizer, peaky_model):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = self_calibration(peaky_model, tokenizer, nsamples=10, seqlen=24, seed=0)
    assert torch.equal(torch.rand(3), before), "self-calibration must not consume the caller's RNG"
    b = self_calibration(peaky_model, tokenizer, nsamples=10, seqlen=24, seed=0)
    c = self_calibration(peaky_model, tokenizer, nsamples=10, seqlen=24, seed=1)
    assert a.shape == (10, 24) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == tokenizer.bos_token_id).all()
    assert len({tuple(row.tolist()) for row in a}) == 10  # sampled, not greedy: rows differ


def test_self_calibration_samples_from_the_models_top_p_nucleus(tokenizer, peaky_model):
    """Every sampled token lies inside the model's own 0.95 nucleus: a sampler ignoring the model
    (uniform tokens) or ignoring top-p would put tokens outside it."""
    tokens = self_calibration(peaky_model, tokenizer, nsamples=8, seqlen=24, seed=0)
    with torch.no_grad():
        probs = peaky_model(tokens).logits.float().softmax(-1)[:, :-1]
    chosen = probs.gather(-1, tokens[:, 1:, None])
    mass_above = (probs * (probs > chosen)).sum(-1)  # probability of strictly likelier tokens
    assert (mass_above < 0.95 + 1e-3).all()
    # and the test has teeth: uniformly random tokens fall outside the nucleus most of the time
    noise = torch.randint(0, len(tokenizer), tokens[:, 1:].shape)
    assert ((probs * (probs > probs.gather(-1, noise[..., None]))).sum(-1) >= 0.95).float().mean() > 0.5


def test_self_calibration_suppresses_eos_until_the_window_is_full(tokenizer):
    model = tiny_model(tokenizer)
    with torch.no_grad():  # make EOS the most likely next token everywhere
        model.lm_head.weight[tokenizer.eos_token_id] = 0
        model.lm_head.bias = None
    model.config.tie_word_embeddings = False
    head = torch.nn.Linear(64, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 5.0
    model.lm_head = head
    tokens = self_calibration(model, tokenizer, nsamples=4, seqlen=20, seed=0)
    assert tokens.shape == (4, 20)
    assert not (tokens[:, 1:] == tokenizer.eos_token_id).any()
