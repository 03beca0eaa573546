"""`ptp eval`, `ptp bench` and `ptp report` end to end on tiny saved models (in-process)."""

from __future__ import annotations

import json

import pytest
import torch

from ptp.cli import main
from tests.lm_dirs import TEXT, one_thread, save_model_dir, tiny_tokenizer  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A dense tiny Llama directory, a "pruned" copy (half of each MLP input zeroed), a text."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("eval")
    dense = save_model_dir(root / "dense")
    model = AutoModelForCausalLM.from_pretrained(dense)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, ::2] = 0
    model.save_pretrained(root / "pruned")
    tiny_tokenizer().save_pretrained(root / "pruned")
    (root / "text.txt").write_text(TEXT * 10)
    return root


def run_json(argv, capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_ppl_matches_api_and_writes_markdown(dirs, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptp.evaluate import perplexity_of_tokens

    out = run_json(["eval", str(dirs / "dense"), "--ppl", str(dirs / "text.txt"), "--seqlen", "32",
                    "--limit", "4", "--batch-size", "3", "--json", "-q"], capsys)
    model = AutoModelForCausalLM.from_pretrained(dirs / "dense").eval()
    ids = AutoTokenizer.from_pretrained(dirs / "dense")(TEXT * 10, return_tensors="pt").input_ids
    assert out["perplexity"][str(dirs / "text.txt")] == pytest.approx(
        perplexity_of_tokens(model, ids, 32, limit=4, progress=False), rel=1e-5)
    md = (dirs / "dense" / "eval.md").read_text()
    assert out["markdown"] == str(dirs / "dense" / "eval.md") and "| perplexity |" in md


def test_eval_compare_reports_kl_and_top1(dirs, capsys, tmp_path):
    text = str(dirs / "text.txt")
    out = run_json(["eval", str(dirs / "pruned"), "--compare", str(dirs / "dense"), "--ppl", text,
                    "--seqlen", "32", "--limit", "4", "--json", "-q", "--md", str(tmp_path / "c.md")], capsys)
    cmp = out["compare"][text]
    dense = run_json(["eval", str(dirs / "dense"), "--ppl", text, "--seqlen", "32", "--limit", "4", "--json",
                      "-q", "--md", str(tmp_path / "d.md")], capsys)
    assert cmp["ppl_dense"] == pytest.approx(dense["perplexity"][text], rel=1e-5)
    assert cmp["ppl_pruned"] == out["perplexity"][text] != pytest.approx(cmp["ppl_dense"])
    assert cmp["kl"] > 1e-4 and 0 < cmp["top1"] < 1 and cmp["windows"] == 4
    assert "KL(dense‖model)" in (tmp_path / "c.md").read_text()


def test_bench_json_and_markdown(dirs, capsys, tmp_path):
    out = run_json(["bench", str(dirs / "pruned"), "--compare", str(dirs / "dense"), "--prefill", "1x8,2x8",
                    "--decode-batches", "2", "--new-tokens", "2", "--prompt-len", "4", "--repeats", "2",
                    "--json", "-q", "--md", str(tmp_path / "b.md")], capsys)
    shapes = {(m["model"], m["kind"], m["batch"], m["length"]) for m in out["measurements"]}
    assert shapes == {(n, k, b, l) for n in ("dense", "pruned")
                      for k, b, l in (("prefill", 1, 8), ("prefill", 2, 8), ("decode", 2, 2))}
    assert list(out["weights_bytes"]) == ["dense", "pruned"]
    assert "pruned / dense" in (tmp_path / "b.md").read_text()


def fake_record(folder):
    """A record and the weights it describes: [10, 10] each, 50 + block zeros (ptp report reads them)."""
    from safetensors.torch import save_file

    layers, tensors = [], {}
    for block in range(3):
        for kind, err in (("self_attn.q_proj", 0.01), ("mlp.down_proj", 0.1)):
            name = f"model.layers.{block}.{kind}"
            layers.append({"name": name, "sparsity": 0.5 + 0.01 * block, "error": err * (block + 1), "seconds": 1.0})
            tensors[f"{name}.weight"] = (torch.arange(100) >= 50 + block).float().reshape(10, 10)
    save_file(tensors, folder / "model.safetensors")
    (folder / "ptp.json").write_text(json.dumps({"ptp_version": "0.1.0", "format": "dense", "model": "tiny",
                                                 "method": "sparsegpt", "sparsity": "2:4",
                                                 "report": {"layers": layers}}))


def test_report_blocks_and_plot(tmp_path, capsys):
    fake_record(tmp_path)
    out = run_json(["report", str(tmp_path), "--plot", "--json"], capsys)
    b2 = out["blocks"][2]
    assert (b2["block"], b2["layers"], b2["worst_layer"]) == (2, 2, "mlp.down_proj")
    assert b2["sparsity"] == pytest.approx(0.52) and b2["error"] == pytest.approx((0.03 + 0.3) / 2)
    assert (tmp_path / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 2 | 2 | 0.5200 |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["eval", "{dense}", "--ppl", "{dense}/missing.txt"], "nor a file"),
    (["eval", "{dense}", "--ppl", "{text}", "--seqlen", "4096"], "max_position_embeddings"),
    (["eval", "{dense}", "--tasks", "x", "--include-path", "{dense}/nope"], "not a directory"),
    (["bench", "{dense}", "--prefill", "1by8"], "BATCHxLENGTH"),
    (["report", "{dense}"], "no ptp.json"),
])
def test_bad_input_exits_2_with_one_line(dirs, capsys, argv, message):
    argv = [a.format(dense=dirs / "dense", text=dirs / "text.txt") for a in argv]
    assert main(argv + ["-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptp: error:") and message in err and "\n" not in err


def test_eval_default_window_is_the_models_positions(dirs, tmp_path, capsys):
    """No --seqlen: 2048 capped at the model's positions (GPT-2's n_positions here), not an error."""
    gpt2 = save_model_dir(tmp_path / "gpt2", family="gpt2", max_positions=32)
    summary = run_json(["eval", str(gpt2), "--ppl", str(dirs / "text.txt"), "--limit", "2", "--json", "-q"], capsys)
    assert summary["seqlen"] == 32 and summary["perplexity"][str(dirs / "text.txt")] > 1
