"""Streaming, resume and several processes (ptp.scale), on tiny saved models.

Every streamed result is compared with the in-memory prune of the same model, tensor for tensor:
the streamed path must change where the weights live, never what they become.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

import ptp
from ptp import scale
from ptp.cli import main
from ptp.io import bit_equal
from tests.lm_dirs import REPO, one_thread, tiny_tokenizer, write_text  # noqa: F401 (fixture)
from tests.tiny import tiny_model, tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def saved(folder: Path, model, tokenizer=None, shard: str | None = None) -> Path:
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def state_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model directory, straight from its safetensors files."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    bad = [k for k in a if not bit_equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def in_memory(folder: Path, calib, config, out: Path, dtype="auto") -> ptp.PruneReport:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    report = ptp.prune(model, calib, config)
    ptp.save(model, None, out, report=report, sparsity=config.sparsity)
    return report


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("family,budget", [("llama", None), ("llama", 0), ("qwen2", None), ("opt", 0),
                                           ("gpt2", None)])
def test_stream_equals_in_memory_prune(family, budget, tmp_path):
    """Weights, tied or not, activations in memory or on disk (budget 0), four families."""
    src = saved(tmp_path / "src", tiny_model(family), shard="20KB")
    assert (src / scale.INDEX).is_file()  # the source itself is sharded
    calib = tokens(6, 24)
    config = ptp.PruneConfig(method="sparsegpt", sparsity="2:4", batch_size=4)
    report = scale.prune_streaming(src, calib, config, tmp_path / "out", act_budget=budget)
    reference = in_memory(src, calib, config, tmp_path / "ref")
    assert_identical(state_of(tmp_path / "out"), state_of(tmp_path / "ref"))
    assert [l.name for l in report.layers] == [l.name for l in reference.layers]
    assert report.mean_sparsity == reference.mean_sparsity
    assert [l.error for l in report.layers] == [l.error for l in reference.layers]
    # An ordinary checkpoint: from_pretrained loads it; nothing is left beside it.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "ref").state_dict()
    assert all(torch.equal(loaded[k], dense[k]) for k in dense)
    record = json.loads((tmp_path / "out" / "ptp.json").read_text())
    assert record["stream"]["activations"] == ("disk" if budget == 0 else "memory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref", "src"]


def test_stream_tied_llama_with_tokenizer_and_true_sequential(tmp_path):
    from tests.lm_dirs import tiny_model as lm

    tokenizer = tiny_tokenizer()
    src = saved(tmp_path / "src", lm(tokenizer, tied=True), tokenizer)
    calib = torch.randint(0, len(tokenizer), (5, 16), generator=torch.Generator().manual_seed(1))
    config = ptp.PruneConfig(method="wanda", sparsity="0.5", true_sequential=True, batch_size=2)
    scale.prune_streaming(src, calib, config, tmp_path / "out", tokenizer=tokenizer, act_budget=0)
    in_memory(src, calib, config, tmp_path / "ref")
    assert_identical(state_of(tmp_path / "out"), state_of(tmp_path / "ref"))
    assert "lm_head.weight" not in state_of(tmp_path / "out")  # tied: stored once, as save_pretrained does
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_stream_casts_to_the_requested_dtype(tmp_path):
    src = saved(tmp_path / "src", tiny_model("llama"))
    calib, config = tokens(4, 16), ptp.PruneConfig(method="sparsegpt", sparsity="4:8")
    scale.prune_streaming(src, calib, config, tmp_path / "out", dtype="bfloat16")
    in_memory(src, calib, config, tmp_path / "ref", dtype=torch.bfloat16)
    out = state_of(tmp_path / "out")
    assert_identical(out, state_of(tmp_path / "ref"))
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto").dtype == torch.bfloat16


def test_only_one_block_is_ever_in_memory(tmp_path, monkeypatch):
    src = saved(tmp_path / "src", tiny_model("llama"))
    stream = scale.Stream(src, tmp_path / "out", ptp.PruneConfig(method="wanda"))
    assert all(p.is_meta for p in stream.model.parameters())
    seen = []
    load_block = scale.Stream.load_block

    def spy(self, index, block):
        load_block(self, index, block)
        real = {n for n, p in self.model.named_parameters() if not p.is_meta}
        seen.append(real)

    monkeypatch.setattr(scale.Stream, "load_block", spy)
    stream.run(tokens(4, 16))
    assert [sorted({n.split(".")[2] for n in real}) for real in seen] == [["0"], ["1"], ["2"]]
    assert all(all(n.startswith(f"model.layers.{i}.") for n in real) for i, real in enumerate(seen))
    assert all(p.is_meta for p in stream.model.parameters())  # and nothing is kept afterwards


def test_activation_file_round_trip(tmp_path):
    x = torch.randn(5, 3, 4).to(torch.bfloat16)
    file = scale.ActivationFile(tmp_path / "a.bin", x.shape, x.dtype)
    file.write(slice(0, 2), x[:2])
    file.write(slice(2, 5), x[2:])
    assert bit_equal(file.read(slice(1, 4)), x[1:4]) and bit_equal(file.read(slice(None)), x)
    assert (tmp_path / "a.bin").stat().st_size == x.numel() * 2
    file.close()
    disk = scale.DiskActivations((tmp_path / "0", tmp_path / "1"), x.shape, x.dtype, block=-1)
    disk[0:5] = x  # captured inputs
    disk.advance()
    disk[0:5] = x * 2  # block 0's outputs go to the other file; its inputs stay readable
    assert bit_equal(disk[0:5], x)
    disk.advance()
    assert bit_equal(disk[0:5], x * 2)
    disk.close()


def test_parse_size():
    assert scale.parse_size("2GB") == 2 * 10**9 and scale.parse_size("512MiB") == 512 * 2**20
    assert scale.parse_size("1.5G") == int(1.5 * 2**30) and scale.parse_size("0") == 0
    assert scale.parse_size(None) is None and scale.parse_size("100") == 100
    with pytest.raises(ptp.ConfigError, match="a size is a number"):
        scale.parse_size("lots")


# --------------------------------------------------------------------------- resume


class Killed(Exception):
    pass


def killed_after(monkeypatch, stop_after: int, run) -> None:
    """Call ``run()`` with the stream dying right after block ``stop_after`` is committed."""
    block_done = scale.Stream.block_done

    def dies(self, index, block, hidden, report):
        block_done(self, index, block, hidden, report)
        if index == stop_after:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(scale.Stream, "block_done", dies)
        with pytest.raises(Killed):
            run()


@pytest.mark.parametrize("budget,stop_after", [(None, 0), (None, 1), (0, 1), (0, 2)])
def test_resume_after_an_interruption_is_identical(budget, stop_after, tmp_path, monkeypatch):
    """Interrupt after block ``stop_after`` is committed, resume, compare with an uninterrupted run."""
    src = saved(tmp_path / "src", tiny_model("llama"))
    calib = tokens(6, 24)
    config = ptp.PruneConfig(method="sparsegpt", sparsity="0.5", batch_size=4)
    scale.prune_streaming(src, calib, config, tmp_path / "whole", act_budget=budget)

    killed_after(monkeypatch, stop_after,
                 lambda: scale.prune_streaming(src, calib, config, tmp_path / "out", act_budget=budget))
    assert not (tmp_path / "out").exists()
    state = json.loads((tmp_path / ".out.ptp-partial" / scale.STATE).read_text())
    assert state["done"] == stop_after + 1
    with pytest.raises(ptp.ConfigError, match="interrupted run .* pass --resume"):
        scale.prune_streaming(src, calib, config, tmp_path / "out")
    other = ptp.PruneConfig(method="sparsegpt", sparsity="0.6", batch_size=4)
    with pytest.raises(ptp.ConfigError, match="different settings \\(config, config.sparsity\\)"):
        scale.prune_streaming(src, calib, other, tmp_path / "out", resume=True)
    with pytest.raises(ptp.ConfigError, match="different settings \\(tokens_sha256\\)"):
        scale.prune_streaming(src, tokens(6, 24, seed=1), config, tmp_path / "out", resume=True)

    loaded = []
    load_block = scale.Stream.load_block
    monkeypatch.setattr(scale.Stream, "load_block", lambda self, i, b: (loaded.append(i), load_block(self, i, b)))
    report = scale.prune_streaming(src, calib, config, tmp_path / "out", resume=True, act_budget=budget)
    assert loaded == list(range(stop_after + 1, 3))  # only the blocks left
    assert_identical(state_of(tmp_path / "out"), state_of(tmp_path / "whole"))
    assert len(report.layers) == 21 and report.mean_sparsity == pytest.approx(0.5, abs=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "whole"]


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    src = saved(tmp_path / "src", tiny_model("llama"))
    scale.prune_streaming(src, tokens(4, 16), ptp.PruneConfig(method="magnitude"), tmp_path / "out", resume=True)
    assert json.loads((tmp_path / "out" / "ptp.json").read_text())["stream"]["resumed_at_block"] == 0


def llama_dir(folder: Path, layers: int, hidden: int = 64) -> Path:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return saved(folder, AutoModelForCausalLM.from_config(config), tokenizer, shard="100KB")


def ptp_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ptp", "prune", *args]


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_sigkill_then_resume_gives_identical_output(tmp_path):
    """A real `ptp prune --stream` is SIGKILLed after two blocks are checkpointed, then resumed."""
    src = llama_dir(tmp_path / "src", layers=16, hidden=128)
    calib = write_text(tmp_path / "calib.txt")
    args = [str(src), "--stream", "--calib", str(calib), "--nsamples", "8", "--seqlen", "64", "--sparsity", "2:4",
            "--batch-size", "4", "-q"]
    state = tmp_path / ".out.ptp-partial" / scale.STATE
    run = subprocess.Popen(ptp_command(*args, "--out", str(tmp_path / "out")), env=subprocess_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = 0
    while run.poll() is None and done < 2:
        time.sleep(0.01)
        try:
            done = json.loads(state.read_text())["done"]
        except (OSError, ValueError):
            pass
    assert run.poll() is None, f"the run ended before it could be killed: {run.communicate()[1][-500:]}"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL
    killed_at = json.loads(state.read_text())["done"]
    assert 2 <= killed_at < 16 and not (tmp_path / "out").exists()

    resumed = subprocess.run(ptp_command(*args, "--out", str(tmp_path / "out"), "--resume", "--json"),
                             env=subprocess_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert main(["prune", *args, "--out", str(tmp_path / "whole")]) == 0  # uninterrupted, in this process
    assert_identical(state_of(tmp_path / "out"), state_of(tmp_path / "whole"))
    record = json.loads((tmp_path / "out" / "ptp.json").read_text())
    assert record["stream"]["resumed_at_block"] >= killed_at
    layers = [(l["name"], l["sparsity"], l["zeros"]) for l in record["report"]["layers"]]
    whole_record = json.loads((tmp_path / "whole" / "ptp.json").read_text())
    assert layers == [(l["name"], l["sparsity"], l["zeros"]) for l in whole_record["report"]["layers"]]
    assert not (tmp_path / ".out.ptp-partial").exists()


# --------------------------------------------------------------------------- several processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# 9 samples in batches of 2: 5 batches (the last of one sample), split 2 + 3 over two ranks; in
# batches of 3, 3 split 1 + 2. ``single`` fits in one batch: the second rank has none.
CALIB = tokens(9, 24)
CONFIGS = {
    "sparsegpt": ptp.PruneConfig(method="sparsegpt", sparsity="0.5", batch_size=2),
    "wanda": ptp.PruneConfig(method="wanda", sparsity="0.5", batch_size=2),
    "sequential": ptp.PruneConfig(method="sparsegpt", sparsity="2:4", batch_size=3, true_sequential=True),
    "single": ptp.PruneConfig(method="sparsegpt", sparsity="0.5", batch_size=16),
}
STREAMED = ("sparsegpt", "wanda")


def _rank(rank: int, world: int, port: int, folder: str) -> None:
    """One gloo rank: check the reduction, prune with each method, stream; results go to ``folder``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        folder = Path(folder)
        # The reduction: halves of X accumulated on two ranks equal X accumulated on one.
        x = torch.randn(2, 37, 16, generator=torch.Generator().manual_seed(3))
        hessian, norms = ptp.solvers.Hessian(16), ptp.solvers.InputNorms(16)
        for acc in (hessian, norms):
            acc.add(x[rank, : 10 + 27 * rank])  # unequal token counts: 10 and 37
        scale.all_reduce_stats([hessian, norms])
        torch.save({"hessian": hessian.hessian, "tokens": hessian.tokens, "norm": norms.norm},
                   folder / f"stats-{rank}.pt")
        for name, config in CONFIGS.items():
            model = tiny_model("llama")
            scale.prune_distributed(model, CALIB, config)
            torch.save(model.state_dict(), folder / f"{name}-{rank}.pt")
        for name in STREAMED:
            scale.prune_streaming(folder / "src", CALIB, CONFIGS[name], folder / f"stream-{name}", act_budget=0)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    """2 ranks give bit for bit the weights of 1 process with the same batch size: in memory and
    streamed, with an uneven split of the batches and with a rank that has no batch."""
    import torch.multiprocessing as mp

    saved(tmp_path / "src", tiny_model("llama"))
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)

    x = torch.randn(2, 37, 16, generator=torch.Generator().manual_seed(3))
    hessian, norms = ptp.solvers.Hessian(16), ptp.solvers.InputNorms(16)
    for acc in (hessian, norms):
        acc.add(x[0, :10])
        acc.add(x[1])
    for rank in (0, 1):
        stats = torch.load(tmp_path / f"stats-{rank}.pt")
        assert stats["tokens"] == 47
        assert torch.equal(stats["hessian"], hessian.hessian)
        assert torch.equal(stats["norm"], norms.norm)

    for name, config in CONFIGS.items():
        model = tiny_model("llama")
        ptp.prune(model, CALIB, config)
        ranks = [torch.load(tmp_path / f"{name}-{r}.pt") for r in (0, 1)]
        assert_identical(ranks[0], ranks[1])  # every rank solved the same problem the same way
        assert_identical(ranks[0], model.state_dict())

    for name in STREAMED:
        scale.prune_streaming(tmp_path / "src", CALIB, CONFIGS[name], tmp_path / f"one-{name}")
        assert_identical(state_of(tmp_path / f"stream-{name}"), state_of(tmp_path / f"one-{name}"))
        assert json.loads((tmp_path / f"stream-{name}" / "ptp.json").read_text())["stream"]["processes"] == 2
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_cli_nproc_2_runs_torchrun_and_matches_one_process(tmp_path):
    """`ptp prune --nproc 2` gives the files of one process, tensor for tensor (in memory; the
    streamed path under two ranks is tested above). 6 samples in batches of 2: 1 + 2 batches."""
    src = llama_dir(tmp_path / "src", layers=2)
    calib = write_text(tmp_path / "calib.txt")
    common = [str(src), "--calib", str(calib), "--nsamples", "6", "--seqlen", "32", "--sparsity", "2:4",
              "--method", "wanda", "--batch-size", "2", "-q"]
    two = subprocess.run(ptp_command(*common, "--nproc", "2", "--out", str(tmp_path / "two"), "--json"),
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert len([line for line in two.stdout.splitlines() if line.startswith("{")]) == 1  # rank 0 reports
    assert main(["prune", *common, "--out", str(tmp_path / "one")]) == 0
    assert_identical(state_of(tmp_path / "two"), state_of(tmp_path / "one"))
    assert json.loads((tmp_path / "two" / "ptp.json").read_text())["processes"] == 2


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return llama_dir(tmp_path_factory.mktemp("m") / "tiny", layers=2)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("c") / "calib.txt")


def prune_args(model_dir, calib, out, *extra):
    return ["prune", str(model_dir), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32",
            "--out", str(out), "--sparsity", "2:4", "-q", *extra]


def test_cli_stream_equals_cli_in_memory(model_dir, calib, tmp_path, capsys):
    assert main(prune_args(model_dir, calib, tmp_path / "s", "--stream", "--act-budget", "1KB", "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mean_sparsity"] == pytest.approx(0.5) and summary["verified"]
    assert main(prune_args(model_dir, calib, tmp_path / "m")) == 0
    assert_identical(state_of(tmp_path / "s"), state_of(tmp_path / "m"))
    record = json.loads((tmp_path / "s" / "ptp.json").read_text())
    assert record["stream"]["activations"] == "disk" and record["calibration"]["nsamples"] == 4
    assert record["config"] == json.loads((tmp_path / "m" / "ptp.json").read_text())["config"]


def test_model_that_would_not_fit_is_streamed(model_dir, calib, tmp_path, monkeypatch):
    monkeypatch.setattr(scale, "available_memory", lambda: 1000)
    assert main(prune_args(model_dir, calib, tmp_path / "out")) == 0
    assert "stream" in json.loads((tmp_path / "out" / "ptp.json").read_text())


@pytest.fixture
def bin_dir(model_dir, tmp_path):
    """The same model with its weights in a pytorch_model.bin instead of safetensors."""
    import shutil

    folder = tmp_path / "bin"
    shutil.copytree(model_dir, folder)
    torch.save(state_of(folder), folder / "pytorch_model.bin")
    for file in [*folder.glob("*.safetensors"), *folder.glob("*.index.json")]:
        file.unlink()
    return folder


def bad_inputs(model_dir, calib, tmp_path, bin_dir):
    out = tmp_path / "out"
    partial = tmp_path / ".busy.ptp-partial"
    partial.mkdir()
    (partial / scale.STATE).write_text("{}")
    return {
        "compressed": (prune_args(model_dir, calib, out, "--stream", "--format", "compressed"),
                       "--stream writes dense checkpoints"),
        "self": (prune_args(model_dir, "self", out, "--stream"), "--calib self samples from the whole model"),
        "budget without stream": (prune_args(model_dir, calib, out, "--act-budget", "1GB"),
                                  "--act-budget applies to --stream runs"),
        "bad size": (prune_args(model_dir, calib, out, "--stream", "--act-budget", "lots"), "a size is a number"),
        "no safetensors": (prune_args(bin_dir, calib, out, "--stream"), "--stream reads safetensors weights"),
        "interrupted run": (prune_args(model_dir, calib, tmp_path / "busy", "--stream"),
                            "holds an interrupted run of this output: pass --resume"),
        "nproc": (prune_args(model_dir, calib, out, "--nproc", "0"), "--nproc must be positive"),
        "structured": (["prune", str(model_dir), "--method", "structured", "--ratio", "0.3", "--nproc", "2",
                        "--calib", str(calib), "--out", str(out), "-q"], "--method structured runs in one process"),
    }


CASES = ["compressed", "self", "budget without stream", "bad size", "no safetensors", "interrupted run", "nproc",
         "structured"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_written(model_dir, calib, tmp_path, bin_dir, capsys, case):
    argv, message = bad_inputs(model_dir, calib, tmp_path, bin_dir)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ptp: error: "), err
    assert message in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert sorted(p.name for p in (tmp_path / ".busy.ptp-partial").iterdir()) == [scale.STATE]


# --------------------------------------------------------------------------- block reconstruction


def tunings(report) -> list[dict]:
    return [{k: v for k, v in t.items() if k != "seconds"} for t in report.reconstruction]


RECON = dict(method="sparsegpt", sparsity="2:4", batch_size=4, reconstruct=True, recon_epochs=2, recon_lr=1e-3,
             recon_batch=2, recon_holdout=2)


@pytest.mark.parametrize("budget", [None, 0])  # dense activations beside the pruned ones: in memory, on disk
def test_streamed_reconstruction_equals_in_memory(budget, tmp_path):
    src = saved(tmp_path / "src", tiny_model("llama"))
    calib, config = tokens(10, 16), ptp.PruneConfig(**RECON)
    memory = in_memory(src, calib, config, tmp_path / "memory")
    report = scale.prune_streaming(src, calib, config, tmp_path / "streamed", act_budget=budget)
    assert_identical(state_of(tmp_path / "streamed"), state_of(tmp_path / "memory"))
    assert tunings(report) == tunings(memory) and len(report.reconstruction) == 3
    assert any(t["kept"] == "tuned" for t in report.reconstruction)  # it did tune, so equality means something
    record = json.loads((tmp_path / "streamed" / "ptp.json").read_text())
    assert [t["heldout_after"] for t in record["report"]["reconstruction"]] == [
        t["heldout_after"] for t in memory.reconstruction]
    assert not list((tmp_path).glob(".*ptp-partial"))  # dense-rank*.bin went with the checkpoint


@pytest.mark.parametrize("budget", [None, 0])
def test_reconstruction_resumes_from_the_saved_dense_activations(budget, tmp_path, monkeypatch):
    src = saved(tmp_path / "src", tiny_model("llama"))
    calib, config = tokens(10, 16), ptp.PruneConfig(**RECON)
    whole = scale.prune_streaming(src, calib, config, tmp_path / "whole", act_budget=budget)
    killed_after(monkeypatch, 1,
                 lambda: scale.prune_streaming(src, calib, config, tmp_path / "out", act_budget=budget))
    work = tmp_path / ".out.ptp-partial"
    assert sorted(p.name for p in work.glob("dense-rank0-*.bin")) == ["dense-rank0-0.bin", "dense-rank0-1.bin"]
    report = scale.prune_streaming(src, calib, config, tmp_path / "out", resume=True, act_budget=budget)
    assert_identical(state_of(tmp_path / "out"), state_of(tmp_path / "whole"))
    assert tunings(report) == tunings(whole)  # the first two blocks' from the checkpoint


# --------------------------------------------------------------------------- structured pruning, streamed


def structured_in_memory(folder: Path, calib, out: Path, ratio: float, **options):
    model = AutoModelForCausalLM.from_pretrained(folder)
    report = ptp.prune_structured(model, calib, ratio, **options)
    ptp.save(model, None, out, meta={"structured": report.to_dict()})
    return report


def structured_dict(report) -> dict:
    out = report.to_dict()
    out.pop("wall_time_s")
    out["reconstruction"] = tunings(report)
    return out


@pytest.mark.parametrize("family,budget,compensation", [("llama", None, "ls"), ("llama", 0, "bias"),
                                                        ("qwen2", 0, "ls")])
def test_streamed_structured_equals_in_memory(family, budget, compensation, tmp_path):
    """The smaller config's blocks written one at a time, activations in memory or on disk; bias
    compensation adds tensors the source checkpoint does not have."""
    src = saved(tmp_path / "src", tiny_model(family), shard="20KB")
    calib = tokens(8, 32)
    options = dict(compensation=compensation, batch_size=4)
    report = scale.prune_structured_streaming(src, calib, tmp_path / "out", 0.35, act_budget=budget, **options)
    reference = structured_in_memory(src, calib, tmp_path / "ref", 0.35, **options)
    assert_identical(state_of(tmp_path / "out"), state_of(tmp_path / "ref"))
    assert structured_dict(report) == structured_dict(reference) and 0.25 < report.removed < 0.45
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert all(config[k] == v for k, v in report.config.items()) and report.config
    if compensation == "bias":
        assert any(k.endswith("down_proj.bias") for k in state_of(tmp_path / "out"))
    record = json.loads((tmp_path / "out" / "ptp.json").read_text())
    assert record["structured"]["removed"] == report.removed and record["stream"]["activations"] == (
        "disk" if budget == 0 else "memory")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # the standard smaller model
    assert loaded.config.intermediate_size == report.intermediate[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref", "src"]


@pytest.mark.parametrize("budget", [None, 0])
def test_structured_reconstruction_resumes_identically(budget, tmp_path, monkeypatch):
    """Killed after block 0: the resumed run plans the cut from block 1 and tunes from the saved
    dense activations; the result is the uninterrupted one."""
    src = saved(tmp_path / "src", tiny_model("llama"))
    calib = tokens(32, 32)
    tuning = ptp.PruneConfig(**{**RECON, "recon_lr": 1e-4, "recon_holdout": 4})
    whole = scale.prune_structured_streaming(src, calib, tmp_path / "whole", 0.35, batch_size=4, tuning=tuning,
                                             act_budget=budget)
    assert any(t["kept"] == "tuned" for t in whole.reconstruction)
    killed_after(monkeypatch, 0, lambda: scale.prune_structured_streaming(
        src, calib, tmp_path / "out", 0.35, batch_size=4, tuning=tuning, act_budget=budget))
    with pytest.raises(ptp.ConfigError, match="different settings \\(structured\\)"):
        scale.prune_structured_streaming(src, calib, tmp_path / "out", 0.3, batch_size=4, tuning=tuning, resume=True)
    report = scale.prune_structured_streaming(src, calib, tmp_path / "out", 0.35, batch_size=4, tuning=tuning,
                                              act_budget=budget, resume=True)
    assert_identical(state_of(tmp_path / "out"), state_of(tmp_path / "whole"))
    assert structured_dict(report) == structured_dict(whole)
    assert json.loads((tmp_path / "out" / "ptp.json").read_text())["stream"]["resumed_at_block"] == 1


def test_a_structured_plan_refused_at_block_0_leaves_nothing_to_resume(tmp_path):
    src = saved(tmp_path / "src", tiny_model("qwen2"))
    with pytest.raises(ptp.ConfigError, match="no bias"):  # found when block 0 is recognised
        scale.prune_structured_streaming(src, tokens(4, 16), tmp_path / "out", 0.35, compensation="bias")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_cli_structured_stream_and_resume(model_dir, calib, tmp_path, capsys):
    def structured(out, *extra):
        return ["prune", str(model_dir), "--method", "structured", "--ratio", "0.3", "--calib", str(calib),
                "--nsamples", "4", "--seqlen", "32", "--out", str(out), "-q", *extra]

    assert main(structured(tmp_path / "s", "--stream", "--act-budget", "1KB", "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "structured" and 0.2 < summary["removed"] < 0.4
    assert main(structured(tmp_path / "m")) == 0
    capsys.readouterr()
    assert_identical(state_of(tmp_path / "s"), state_of(tmp_path / "m"))
    streamed, memory = (json.loads((tmp_path / d / "ptp.json").read_text()) for d in ("s", "m"))
    assert streamed["method"] == memory["method"] == "structured" and "sparsity" not in streamed
    assert streamed["structured"]["config"] == memory["structured"]["config"]
    assert main(structured(tmp_path / "s", "--resume")) == 0  # finished: nothing to do
    assert "the run is complete" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "s")]) == 0
    assert "| block | attention output error | MLP output error |" in capsys.readouterr().out
