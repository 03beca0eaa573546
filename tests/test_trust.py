"""Issue 16: what a careless or hostile input does. Corrupt checkpoints, a dangerous --overwrite,
inputs that silently do nothing. Each must end as one ``ptp: error:`` line (exit 2), with nothing
lost and nothing half-written."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

import ptp
from ptp import integrity, io
from ptp.cli import main
from ptp.config import ConfigError
from tests.lm_dirs import pruned_dirs, one_thread, save_model_dir, tiny_model, tiny_tokenizer, write_text  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny model directory, a calibration text, and the model pruned (Wanda 50%) and saved by
    ptp both dense and compressed."""
    return pruned_dirs(tmp_path_factory.mktemp("trust"), "wanda", 4)


def copy(root: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root / name, tmp_path / name))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ptp: error: "), err
    return err[0]


# --------------------------------------------------------------------------- safetensors surgery


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def key_ending(header: dict, suffix: str) -> str:
    return next(k for k in sorted(header) if k.endswith(suffix))


def flip_value_bytes(path: Path) -> None:
    header, data = read_st(path)
    start, end = header[key_ending(header, ":values")]["data_offsets"]
    data = bytearray(data)
    for i in range(start, end, max(1, (end - start) // 16)):
        data[i] ^= 0xFF  # NaNs and huge values: the perplexity went to nan, exit 0
    write_st(path, header, bytes(data))


def delete_mask_byte(path: Path) -> None:
    """Remove one byte of a mask and shift the later tensors, so the file stays valid safetensors."""
    header, data = read_st(path)
    key = key_ending(header, ":mask")
    start, _ = header[key]["data_offsets"]
    for info in header.values():
        if isinstance(info, dict) and "data_offsets" in info:
            a, b = info["data_offsets"]
            info["data_offsets"] = [a - (a > start), b - (b > start)]
    header[key]["shape"] = [header[key]["shape"][0] - 1]
    write_st(path, header, data[:start] + data[start + 1 :])


def flip_mask_bits(path: Path) -> None:
    header, data = read_st(path)
    start, _ = header[key_ending(header, ":mask")]["data_offsets"]
    data = bytearray(data)
    data[start] ^= 0x01
    write_st(path, header, bytes(data))


def reshape_norm(path: Path) -> None:
    """Same bytes, another shape: [64] -> [32, 2] (valid safetensors, wrong for the model)."""
    header, data = read_st(path)
    header[key_ending(header, "input_layernorm.weight")]["shape"] = [32, 2]
    write_st(path, header, data)


def shrink_header_shape(path: Path) -> None:
    """A shape that no longer covers the tensor's bytes."""
    header, data = read_st(path)
    info = header[key_ending(header, "input_layernorm.weight")]
    info["shape"] = [info["shape"][0] - 1]
    write_st(path, header, data)


def swap_metadata_shape(path: Path) -> None:
    header, data = read_st(path)
    index = json.loads(header["__metadata__"]["ptp_compressed"])
    key = next(k for k in sorted(index) if "up_proj" in k)
    index[key]["shape"] = index[key]["shape"][::-1]
    header["__metadata__"]["ptp_compressed"] = json.dumps(index)
    write_st(path, header, data)


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


COMPRESSED = "model.ptp.safetensors"
STRUCTURAL = {
    "mask byte deleted": (delete_mask_byte, "mask of .* needs"),
    "mask bits flipped": (flip_mask_bits, "marks \\d+ kept weights, but \\d+ values"),
    "header shape changed": (reshape_norm, "do not fit the model's config"),
    "header shape too small": (shrink_header_shape, "not a readable safetensors file"),
    "metadata shape swapped": (swap_metadata_shape, "do not fit the model's config"),
    "truncated": (truncate, "not a readable safetensors file"),
}


# --------------------------------------------------------------------------- 1. corrupt checkpoints


def test_save_records_a_sha256_per_file_and_of_the_record(root):
    record = json.loads((root / "compressed" / "ptp.json").read_text())
    files = record["integrity"]["files"]
    assert sorted(files) == sorted(p.name for p in (root / "compressed").iterdir() if p.name != "ptp.json")
    assert files[COMPRESSED] == integrity.sha256_file(root / "compressed" / COMPRESSED)
    assert record["integrity"]["record"] == integrity.record_digest(record)
    assert all(layer["zeros"] > 0 for layer in record["report"]["layers"])  # what each layer claims


def test_flipped_value_bytes_are_caught_by_load_and_eval(root, tmp_path, capsys):
    folder = copy(root, "compressed", tmp_path)
    flip_value_bytes(folder / COMPRESSED)
    with pytest.raises(ConfigError, match=f"{COMPRESSED} is corrupt: its SHA-256 differs"):
        ptp.load(folder)
    argv = ["eval", str(folder), "--ppl", str(root / "text.txt"), "--limit", "1", "--seqlen", "32", "-q"]
    assert main(argv) == 2
    assert "model.ptp.safetensors is corrupt" in one_error_line(capsys)
    ptp.load(folder, verify=False)  # the opt-out: structurally fine, so it loads


@pytest.mark.parametrize("case", sorted(STRUCTURAL))
def test_structural_corruption_of_a_compressed_dir_is_one_line(root, tmp_path, capsys, case):
    corrupt, message = STRUCTURAL[case]
    folder = copy(root, "compressed", tmp_path)
    corrupt(folder / COMPRESSED)
    with pytest.raises(ConfigError, match="is corrupt"):  # the checksum sees it first
        ptp.load(folder)
    with pytest.raises(ConfigError, match=message):  # without checksums, the structure does
        ptp.load(folder, verify=False)
    argv = ["eval", str(folder), "--ppl", str(root / "text.txt"), "--limit", "1", "--seqlen", "32", "-q"]
    assert main(argv + ["--no-verify"]) == 2
    assert re.search(message, one_error_line(capsys))


@pytest.mark.parametrize("ptp_written", [True, False])
def test_truncated_model_safetensors_in_prune_and_eval(root, tmp_path, capsys, ptp_written):
    folder = copy(root, "dense" if ptp_written else "tiny", tmp_path)
    truncate(folder / "model.safetensors")
    evaluate = ["eval", str(folder), "--ppl", str(root / "text.txt"), "--limit", "1", "--seqlen", "32", "-q"]
    prune = ["prune", str(folder), "--sparsity", "0.5", "--calib", str(root / "text.txt"), "--nsamples", "2",
             "--seqlen", "32", "--out", str(tmp_path / "out"), "-q"]
    expected = "model.safetensors is corrupt" if ptp_written else "safetensors file is unreadable"
    for argv in (evaluate, prune, prune + ["--no-verify"], evaluate + ["--no-verify"]):
        assert main(argv) == 2
        line = one_error_line(capsys)
        assert (expected if "--no-verify" not in argv else "unreadable") in line, line
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError):
        ptp.load(folder, verify=False)


def test_an_edited_record_or_a_lying_one_is_refused(root, tmp_path):
    folder = copy(root, "dense", tmp_path)
    record = json.loads((folder / "ptp.json").read_text())
    for layer in record["report"]["layers"]:
        layer["sparsity"] = 0.9
    (folder / "ptp.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="ptp.json was changed after it was saved"):
        ptp.load(folder)
    # Re-sealed, so every checksum holds: the layers still do not have the zeros it claims.
    layer = record["report"]["layers"][0]
    layer["zeros"] += 1
    integrity.write_record(folder, record)
    with pytest.raises(ConfigError, match=f"layer {layer['name']} has \\d+ zero weights .* ptp.json claims"):
        ptp.load(folder)


def test_missing_file_is_named(root, tmp_path):
    folder = copy(root, "dense", tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="tokenizer.json is missing"):
        ptp.load(folder)


# --------------------------------------------------------------------------- 2. --overwrite


def overwrite_argv(root, out):
    return ["prune", str(root / "tiny"), "--sparsity", "0.5", "--method", "magnitude", "--calib",
            str(root / "text.txt"), "--nsamples", "2", "--seqlen", "32", "--out", str(out), "--overwrite", "-q"]


def test_overwrite_never_deletes_what_ptp_did_not_write(root, tmp_path, capsys):
    user = tmp_path / "u"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.tex").write_text("x")
    (user / "ptp.json").write_text("{}")
    assert main(overwrite_argv(root, user)) == 2
    assert "ptp.json is not a ptp record" in one_error_line(capsys)
    # A genuine record does not make the user's files ptp's.
    shutil.copy(root / "dense" / "ptp.json", user / "ptp.json")
    assert main(overwrite_argv(root, user)) == 2
    assert "entries ptp does not write (sub/, thesis.tex)" in one_error_line(capsys)
    assert sorted(p.name for p in user.iterdir()) == ["ptp.json", "sub", "thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u"]


def test_overwrite_replaces_a_ptp_output_with_its_reports(root, tmp_path, capsys):
    out = copy(root, "dense", tmp_path)
    (out / "eval.md").write_text("a report ptp eval wrote")
    assert main(overwrite_argv(root, out)) == 0
    assert json.loads((out / "ptp.json").read_text())["method"] == "magnitude"
    assert not (out / "eval.md").exists()


# --------------------------------------------------------------------------- 3. calibration tokens


def test_float_or_out_of_vocabulary_tokens_are_refused():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    config = ptp.PruneConfig(method="magnitude", sparsity="0.5")
    with pytest.raises(ConfigError, match="integer tensor of token ids, not torch.float32"):
        ptp.prune(model, torch.rand(2, 32), config)
    with pytest.raises(ConfigError, match="integer tensor"):
        ptp.prune(model, [[0.5] * 32], config)
    vocab = model.get_input_embeddings().num_embeddings
    with pytest.raises(ConfigError, match=f"must lie in \\[0, {vocab}\\).* from {vocab} to {vocab}"):
        ptp.prune(model, torch.full((2, 32), vocab), config)
    with pytest.raises(ConfigError, match="from -1 to"):
        ptp.prune(model, torch.full((2, 32), -1), config)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)  # nothing pruned
    ptp.prune(model, torch.randint(0, vocab, (2, 32), dtype=torch.int32), config)  # any integer dtype


# --------------------------------------------------------------------------- 4. patterns that match nothing


@pytest.mark.parametrize("skip, message", [
    ("nosuch_layer", "skip pattern 'nosuch_layer' matches no prunable layer"),
    ("down_prj", "did you mean down_proj"),
    ("layers.7", "skip pattern 'layers.7' matches no prunable layer"),
])
def test_skip_that_matches_nothing_is_refused(root, tmp_path, capsys, skip, message):
    argv = ["prune", str(root / "tiny"), "--sparsity", "0.5", "--calib", str(root / "text.txt"), "--nsamples", "2",
            "--seqlen", "32", "--out", str(tmp_path / "out"), "--skip", skip, "-q"]
    assert main(argv) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_profile_pattern_that_matches_nothing_is_refused(root, tmp_path, capsys):
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"down_proj": 0.6, "mlp.upproj": 0.4}))
    argv = ["prune", str(root / "tiny"), "--sparsity", "0.5", "--calib", str(root / "text.txt"), "--nsamples", "2",
            "--seqlen", "32", "--out", str(tmp_path / "out"), "--profile", str(profile), "-q"]
    assert main(argv) == 2
    assert "profile pattern 'mlp.upproj' matches no prunable layer; did you mean mlp.up_proj" in one_error_line(capsys)
    # A pattern that names only skipped layers is no less a no-op.
    profile.write_text(json.dumps({"down_proj": 0.6}))
    assert main(argv + ["--skip", "down_proj"]) == 2
    assert "profile pattern 'down_proj' matches no prunable layer" in one_error_line(capsys)


# --------------------------------------------------------------------------- 9. the Python API's config


def test_prune_takes_a_dict_config_or_says_what_it_needs():
    tokenizer = tiny_tokenizer()
    tokens = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(0))
    a, b = tiny_model(tokenizer), tiny_model(tokenizer)
    report = ptp.prune(a, tokens, {"method": "wanda", "sparsity": "2:4"})
    ptp.prune(b, tokens, ptp.PruneConfig(method="wanda", sparsity="2:4"))
    assert report.method == "wanda" and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ConfigError, match="unknown PruneConfig field\\(s\\) methd"):
        ptp.prune(a, tokens, {"methd": "wanda"})
    with pytest.raises(TypeError, match="config must be a ptp.PruneConfig \\(or a dict of its fields\\), not str"):
        ptp.prune(a, tokens, "wanda")


# --------------------------------------------------------------------------- 5. ptp report


def test_report_comes_from_the_tensors_and_refuses_a_record_that_disagrees(root, tmp_path, capsys):
    for kind in ("dense", "compressed"):
        folder = copy(root, kind, tmp_path)
        assert main(["report", str(folder), "--json", "-q"]) == 0
        blocks = json.loads(capsys.readouterr().out)["blocks"]
        assert [round(b["sparsity"], 4) for b in blocks] == [0.5, 0.5]
        record = json.loads((folder / "ptp.json").read_text())
        for layer in record["report"]["layers"]:
            layer["sparsity"] = 0.9  # the edit of the issue: the report printed 0.9000
        (folder / "ptp.json").write_text(json.dumps(record))
        assert main(["report", str(folder), "-q"]) == 2
        assert "ptp.json was changed after it was saved" in one_error_line(capsys)
        assert main(["report", str(folder), "--no-verify", "-q"]) == 2  # no checksums: the tensors still say no
        assert re.search("ptp.json says model.layers.0.self_attn.q_proj has sparsity 0.9000, its stored weight "
                         "has 0.5000", one_error_line(capsys))
        integrity.write_record(folder, record)  # re-sealed: the checksums hold, the tensors do not agree
        assert main(["report", str(folder), "-q"]) == 2
        assert "the record does not describe these tensors" in one_error_line(capsys)


# --------------------------------------------------------------------------- 6. evaluation limits


@pytest.mark.parametrize("flag, value, message", [
    ("--seqlen", "0", "--seqlen must be at least 2, got 0"),
    ("--limit", "0", "--limit must be at least 1, got 0"),
    ("--limit", "-3", "--limit must be at least 1, got -3"),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
])
def test_eval_refuses_non_positive_limits_before_loading(root, capsys, monkeypatch, flag, value, message):
    monkeypatch.setattr(io, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    assert main(["eval", str(root / "dense"), "--ppl", str(root / "text.txt"), flag, value, "-q"]) == 2
    assert message in one_error_line(capsys)


def test_prune_refuses_non_positive_counts_before_loading(root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(io, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    for flag, value, message in (("--seqlen", "0", "--nsamples and --seqlen must be positive"),
                                 ("--nsamples", "0", "--nsamples and --seqlen must be positive"),
                                 ("--seqlen", "129", "seqlen 129 is above the model's maximum positions (128)")):
        argv = ["prune", str(root / "tiny"), "--sparsity", "0.5", "--calib", str(root / "text.txt"), "--nsamples", "2",
                "--seqlen", "32", flag, value, "--out", str(tmp_path / "out"), "-q"]
        assert main(argv) == 2
        assert message in one_error_line(capsys)


# --------------------------------------------------------------------------- 7. text that is not text


def test_binary_garbage_as_text_is_one_line(root, tmp_path, capsys):
    garbage = bytes(torch.randint(0, 256, (20000,), generator=torch.Generator().manual_seed(1)).tolist())
    prune = ["prune", str(root / "tiny"), "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "32",
             "--out", str(tmp_path / "out"), "-q", "--calib"]
    for name in ("garbage.bin", "garbage.txt", "garbage.jsonl", "garbage.parquet"):
        (tmp_path / name).write_bytes(garbage)
        assert main(prune + [str(tmp_path / name)]) == 2
        assert re.search("not UTF-8 text|is not .txt, .jsonl or .parquet|is not a Parquet file",
                         one_error_line(capsys))
        assert main(["eval", str(root / "dense"), "--ppl", str(tmp_path / name), "-q"]) == 2
        assert "is not UTF-8 text (byte " in one_error_line(capsys)
    (tmp_path / "num.jsonl").write_text('{"text": 5}\n')
    assert main(prune + [str(tmp_path / "num.jsonl")]) == 2
    assert "holds int values, not text" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 8. Ctrl-C


def test_ctrl_c_is_one_line_exit_130_and_nothing_written(root, tmp_path, capsys, monkeypatch):
    from ptp import engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "prune_block", interrupted)
    argv = ["prune", str(root / "tiny"), "--sparsity", "0.5", "--calib", str(root / "text.txt"), "--nsamples", "2",
            "--seqlen", "32", "--out", str(tmp_path / "out"), "-q"]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["ptp: interrupted; nothing was written"]
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 11. smaller things


def stream_argv(root, out, *extra):
    return ["prune", str(root / "tiny"), "--sparsity", "0.5", "--method", "magnitude", "--calib", str(root / "text.txt"),
            "--nsamples", "2", "--seqlen", "32", "--out", str(out), "--resume", "-q", *extra]


def test_resume_of_a_finished_run_says_complete_and_exits_0(root, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(stream_argv(root, out)) == 0  # --resume with nothing to resume: a fresh run
    capsys.readouterr()
    before = (out / "ptp.json").read_text()
    assert main(stream_argv(root, out)) == 0
    assert capsys.readouterr().out.strip() == f"{out}: the run is complete (nothing to resume)"
    assert (out / "ptp.json").read_text() == before
    assert main(stream_argv(root, out, "--seed", "1")) == 2  # not this run: no claim that it is complete
    assert "holds a finished run with different settings (seed)" in one_error_line(capsys)


def test_a_killed_runs_hidden_directory_is_removed_by_the_next_save(root, tmp_path, caplog):
    import logging

    dead, unnamed, live = (tmp_path / f".out.ptp-tmp-{n}" for n in ("999999999-abc", "xyz", f"{os.getpid()}-live"))
    for folder in (dead, unnamed, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    tokenizer = tiny_tokenizer()
    with caplog.at_level(logging.WARNING, logger="ptp"):
        ptp.save(tiny_model(tokenizer), tokenizer, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])  # a live writer's stays
    removed = [r.getMessage() for r in caplog.records if "left by a killed run" in r.getMessage()]
    assert len(removed) == 2 and any(dead.name in m for m in removed)


def test_quiet_keeps_the_result_and_verification_logs_no_per_layer_list(root, tmp_path, capsys, caplog):
    import logging

    argv = ["prune", str(root / "tiny"), "--sparsity", "0.5", "--method", "magnitude", "--calib", str(root / "text.txt"),
            "--nsamples", "2", "--seqlen", "32", "--out", str(tmp_path / "q"), "-q"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "achieved sparsity 0.5000" in captured.out and captured.err == ""
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"down_proj": 0.6, "layers.1.self_attn": 0.4}))
    argv[-2:] = [str(tmp_path / "p"), "--profile", str(profile)]  # another --out, and without -q: info logs
    with caplog.at_level(logging.INFO, logger="ptp"):
        assert main(argv) == 0
    verified = [r.getMessage() for r in caplog.records if r.getMessage().startswith("verified")]
    assert verified and verified[0].endswith("14 pruned layers at 0.4-0.6 (3 values)"), verified


def test_unknown_method_lists_structured_too():
    with pytest.raises(ConfigError, match="choose one of magnitude, wanda, sparsegpt, admm, or structured"):
        ptp.PruneConfig(method="obs")


def test_a_record_from_before_checksums_loads_with_a_warning_and_its_claims_checked(root, tmp_path, caplog):
    import logging

    folder = copy(root, "dense", tmp_path)
    record = json.loads((folder / "ptp.json").read_text())
    del record["integrity"]
    (folder / "ptp.json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="ptp"):
        ptp.load(folder)
    assert any("records no checksums" in r.getMessage() for r in caplog.records)
    record["report"]["layers"][0]["zeros"] -= 1
    (folder / "ptp.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="ptp.json claims"):
        ptp.load(folder)
    record["integrity"] = None  # present but not checksums: not a record ptp wrote
    (folder / "ptp.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="integrity entry is malformed"):
        ptp.load(folder)


def test_stream_and_export_refuse_a_corrupt_input_too(root, tmp_path, capsys):
    folder = copy(root, "dense", tmp_path)
    truncate(folder / "model.safetensors")
    stream = ["prune", str(folder), "--sparsity", "0.5", "--calib", str(root / "text.txt"), "--nsamples", "2",
              "--seqlen", "32", "--out", str(tmp_path / "out"), "--stream", "-q"]
    assert main(stream) == 2
    assert "model.safetensors is corrupt" in one_error_line(capsys)
    assert main(stream + ["--no-verify"]) == 2
    assert "model.safetensors is not a readable safetensors file" in one_error_line(capsys)
    packed = copy(root, "compressed", tmp_path)
    flip_value_bytes(packed / COMPRESSED)
    assert main(["export", str(packed), "--dense", str(tmp_path / "exported"), "-q"]) == 2
    assert "model.ptp.safetensors is corrupt" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compressed", "dense"]


def test_quiet_eval_hides_what_libraries_draw_while_loading(root, capsys, monkeypatch):
    """transformers' GGUF reader draws its own progress bar on stderr; -q must hide it in eval too."""
    import sys

    real = io.load_model

    def drawing(*args, **kwargs):
        print("Converting and de-quantizing GGUF tensors...: 100%", file=sys.stderr)
        return real(*args, **kwargs)

    monkeypatch.setattr(io, "load_model", drawing)
    argv = ["eval", str(root / "dense"), "--ppl", str(root / "text.txt"), "--seqlen", "32", "--limit", "1",
            "--md", str(root / "e.md")]
    assert main(argv + ["-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "text.txt | " in captured.out
    assert main(argv) == 0
    assert "GGUF tensors" in capsys.readouterr().err


def test_an_n_m_no_layer_can_take_is_named_as_such(root, tmp_path, capsys, monkeypatch):
    argv = ["prune", str(root / "tiny"), "--method", "wanda", "--sparsity", "3:7", "--calib", str(root / "text.txt"),
            "--nsamples", "2", "--seqlen", "32", "--out", str(tmp_path / "out"), "-q"]
    assert main(argv) == 2
    assert "no prunable layer has a number of inputs that is a multiple of M=7 (inputs: 64, 128)" in one_error_line(capsys)


def test_eval_reads_a_text_file_before_loading_the_model(root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(io, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    (tmp_path / "garbage.bin").write_bytes(b"\xff\xfe\x00" * 100)
    assert main(["eval", str(root / "dense"), "--ppl", str(tmp_path / "garbage.bin"), "-q"]) == 2
    assert "is not UTF-8 text (byte 0 is 0xff)" in one_error_line(capsys)
