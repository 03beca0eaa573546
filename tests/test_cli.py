"""The `ptp prune` and `ptp export` commands, end to end on tiny model directories."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import ptp
from ptp.cli import main
from ptp.io import bit_equal
from tests.lm_dirs import one_thread, save_model_dir, write_text

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("c") / "calib.txt")


def prune_args(model_dir, calib, out, *extra):
    return ["prune", str(model_dir), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32",
            "--out", str(out), *extra]


def test_prune_saves_a_verified_model_and_prints_one_json_line(model_dir, calib, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(prune_args(model_dir, calib, out, "--method", "sparsegpt", "--sparsity", "2:4", "--json", "--quiet"))
    captured = capsys.readouterr()
    assert code == 0
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["mean_sparsity"] == pytest.approx(0.5) and summary["layers"] == 14 and summary["verified"]
    assert captured.err == ""  # --quiet: no progress bars, no info logs
    record = json.loads((out / "ptp.json").read_text())
    assert record["method"] == "sparsegpt" and record["sparsity"] == "2:4"
    assert record["calibration"] == {"source": str(calib), "nsamples": 4, "seqlen": 32, "seed": 0, "text_field": "text"}
    assert record["config"]["blocksize"] == 128 and record["model"] == str(model_dir)
    model = AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[1].mlp.down_proj.weight
    assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
    assert (model.model.embed_tokens.weight != 0).all()  # embeddings never pruned


def test_cli_and_api_give_the_same_model(model_dir, calib, tmp_path):
    """The CLI is a thin layer: the same config through the Python API gives identical weights."""
    assert main(prune_args(model_dir, calib, tmp_path / "out", "--method", "wanda", "--sparsity", "50%",
                           "--seed", "3", "--quiet")) == 0
    model, tokenizer = ptp.load_model(str(model_dir))
    tokens = ptp.calibration_batches(str(calib), tokenizer, nsamples=4, seqlen=32, seed=3)
    ptp.prune(model, tokens, ptp.PruneConfig(method="wanda", sparsity="0.5"))
    cli = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    # torch.equal, not bit_equal: the saved copy has -0.0 turned into +0.0
    assert all(torch.equal(cli[k], v) for k, v in model.state_dict().items())


def test_self_calibration_compressed_then_export(model_dir, tmp_path, capsys):
    out, dense = tmp_path / "c", tmp_path / "d"
    assert main(["prune", str(model_dir), "--calib", "self", "--nsamples", "4", "--seqlen", "16",
                 "--sparsity", "2:4", "--format", "compressed", "--out", str(out), "--json", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["compression"]["pruned_weights_ratio"] <= 0.57  # float32: (2+1/8)/4 = 0.53
    assert (out / "model.ptp.safetensors").exists()
    assert main(["export", str(out), "--dense", str(dense), "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(dense)
    assert all(bit_equal(a, b) for a, b in zip(ptp.load(out).state_dict().values(),
                                               AutoModelForCausalLM.from_pretrained(dense).state_dict().values()))


def test_human_output_and_progress_without_quiet(model_dir, calib, tmp_path, capsys):
    assert main(prune_args(model_dir, calib, tmp_path / "out", "--sparsity", "0.5", "--method", "magnitude")) == 0
    captured = capsys.readouterr()
    assert "achieved sparsity 0.5000" in captured.out and "verified" in captured.out
    assert "magnitude 0.5" in captured.err  # the engine's progress bar over blocks


def test_admm_with_owl_and_a_profile_file(model_dir, calib, tmp_path, capsys):
    """--method admm --profile owl end to end; a profile file sets the layers it names."""
    out = tmp_path / "owl"
    assert main(prune_args(model_dir, calib, out, "--method", "admm", "--sparsity", "0.6", "--profile", "owl",
                           "--owl-m", "3", "--owl-lambda", "0.1", "--json", "-q")) == 0
    assert json.loads(capsys.readouterr().out)["mean_sparsity"] == pytest.approx(0.6, abs=1e-3)
    record = json.loads((out / "ptp.json").read_text())
    assert record["config"]["method"] == "admm" and record["config"]["profile"] == "owl"
    per_layer = {layer["name"]: layer["sparsity"] for layer in record["report"]["layers"]}
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05  # not uniform
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"down_proj": 0.75}))
    assert main(prune_args(model_dir, calib, tmp_path / "file", "--method", "wanda", "--sparsity", "0.5",
                           "--profile", str(profile), "-q")) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "file")
    assert float((model.model.layers[0].mlp.down_proj.weight == 0).float().mean()) == pytest.approx(0.75, abs=0.01)
    assert float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


# --------------------------------------------------------------------------- bad input: exit 2, one line, nothing written


@pytest.fixture(scope="module")
def odd_width_dir(tmp_path_factory):
    """MLP width 130: down_proj's 130 inputs are not a multiple of 4."""
    return save_model_dir(tmp_path_factory.mktemp("odd") / "tiny", intermediate=130)


def bad_inputs(model_dir, calib, odd_width_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    (tmp_path / "afile").write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    base = lambda out="out": prune_args(model_dir, calib, tmp_path / out)  # noqa: E731
    return {
        "unknown method": (base() + ["--method", "obs", "--sparsity", "0.5"], "unknown method 'obs'"),
        "sparsity >= 1": (base() + ["--sparsity", "1.5"], "sparsity must lie in \\[0, 1\\)"),
        "malformed N:M": (base() + ["--sparsity", "2:x"], "sparsity must be a fraction"),
        "N >= M": (base() + ["--sparsity", "4:4"], "N:M sparsity needs 0 < N < M"),
        "width not multiple of M": (prune_args(odd_width_dir, calib, tmp_path / "out") + ["--sparsity", "2:4"],
                                    "2 layers with a number of inputs not a multiple of M=4: "
                                    "model.layers.0.mlp.down_proj \\(130\\), model.layers.1.mlp.down_proj \\(130\\); "
                                    "leave them dense with --skip model.layers.0.mlp.down_proj,model.layers.1.mlp.down_proj"),
        "missing model path": (prune_args(tmp_path / "nope", calib, tmp_path / "out") + ["--sparsity", "0.5"],
                               "model path not found"),
        "no decoder blocks": (base() + ["--sparsity", "0.5", "--blocks", "model.nothing"],
                              "model has no module 'model.nothing'"),
        "calibration too short": (prune_args(model_dir, short, tmp_path / "out") + ["--sparsity", "0.5"],
                                  "calibration source too short: it has \\d+ tokens, needs at least 33"),
        "seqlen above max positions": (base() + ["--sparsity", "0.5", "--seqlen", "129"],
                                       "seqlen 129 is above the model's maximum positions \\(128\\)"),
        "unwritable DIR": (prune_args(model_dir, calib, tmp_path / "afile" / "out") + ["--sparsity", "0.5"],
                           "cannot write"),
        "non-empty DIR": (prune_args(model_dir, calib, full) + ["--sparsity", "0.5"], "not empty; pass --overwrite"),
        "unknown calibration source": (prune_args(model_dir, "wikitext3", tmp_path / "out") + ["--sparsity", "0.5"],
                                       "unknown calibration source 'wikitext3'"),
        "profile with N:M": (base() + ["--sparsity", "2:4", "--profile", "owl"], "profile needs unstructured"),
        "missing profile file": (base() + ["--sparsity", "0.5", "--profile", str(tmp_path / "p.json")],
                                 "cannot read profile"),
        "profile not JSON": (base() + ["--sparsity", "0.5", "--profile", str(tmp_path / "afile")], "is not JSON"),
    }


CASES = ["unknown method", "sparsity >= 1", "malformed N:M", "N >= M", "width not multiple of M",
         "missing model path", "no decoder blocks", "calibration too short", "seqlen above max positions",
         "unwritable DIR", "non-empty DIR", "unknown calibration source", "profile with N:M",
         "missing profile file", "profile not JSON"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_written(model_dir, calib, odd_width_dir, tmp_path, capsys, case):
    argv, message = bad_inputs(model_dir, calib, odd_width_dir, tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ptp: error: ")
    import re

    assert re.search(message, err[0]), err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert sorted(os.listdir(tmp_path / "full")) == ["x"]


def test_skip_leaves_the_odd_layer_dense(odd_width_dir, calib, tmp_path):
    out = tmp_path / "out"
    assert main(prune_args(odd_width_dir, calib, out, "--sparsity", "2:4", "--skip", "down_proj", "-q")) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.model.layers[0].mlp.down_proj.weight != 0).all()
    assert float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == 0.5
    names = [layer["name"] for layer in json.loads((out / "ptp.json").read_text())["report"]["layers"]]
    assert not any("down_proj" in n for n in names) and len(names) == 12


def test_export_of_a_missing_dir_is_exit_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--dense", str(tmp_path / "d"), "-q"]) == 2
    assert "model path not found" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
