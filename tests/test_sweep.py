"""ptp sweep: every cell present, each equal to running it by hand, resumable, bad cells reported."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

import ptp
from ptp.cli import main
from ptp.pipeline import Job, run
from ptp.sweep import pareto
from tests.lm_dirs import REPO, one_thread, tiny_model, tiny_tokenizer, write_text  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    tok = tiny_tokenizer()
    model = tiny_model(tok, intermediate=126)  # 126 inputs to down_proj: 2:4 cannot apply there
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model", write_text(root / "calib.txt"), write_text(root / "eval.txt", repeats=8)


def sweep_args(model, calib, evaluation, out, *extra):
    return ["sweep", str(model), "--calib", str(calib), "--nsamples", "4", "--seqlen", "16", "--methods",
            "magnitude,wanda", "--sparsities", "0.5,0.7,2:4", "--structured", "0.3", "--ppl", str(evaluation),
            "--ppl-seqlen", "32", "--ppl-limit", "2", "--out", str(out), "-q", *extra]


def test_sweep_table_cells_equal_cells_run_by_hand(files, tmp_path):
    model, calib, evaluation = files
    out = tmp_path / "sweep"
    assert main(sweep_args(model, calib, evaluation, out, "--bench", "--bench-repeats", "1")) == 0
    state = json.loads((out / "sweep.json").read_text())
    names = [c["name"] for c in state["cells"]]
    assert names == ["magnitude-0.5", "magnitude-0.7", "magnitude-2of4", "wanda-0.5", "wanda-0.7", "wanda-2of4",
                     "structured-0.3"]
    cells = {c["name"]: c for c in state["cells"]}
    for bad in ("magnitude-2of4", "wanda-2of4"):  # reported, and the sweep went on
        assert cells[bad]["status"] == "error" and "not a multiple of M=4" in cells[bad]["error"]
    tokens = torch.load(out / "calibration.pt")
    key = f"ppl[{evaluation.name}]"
    for name, job in (("wanda-0.7", Job(str(model), prune=ptp.PruneConfig(method="wanda", sparsity="0.7"))),
                      ("structured-0.3", Job(str(model), structured_ratio=0.3))):
        job.ppl, job.ppl_seqlen, job.ppl_limit = (str(evaluation),), 32, 2
        by_hand = run(job, tokens=tokens)
        assert cells[name][key] == pytest.approx(by_hand.perplexity[str(evaluation)], rel=1e-6)
        assert cells[name]["status"] == "ok" and cells[name]["decode_tok_s"] > 0
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "sweep.md").read_text()
    assert "| wanda-2of4 | wanda | 2:4 | error:" in table and "Smallest:" in table
    assert state["dense"]["decode_x"] == 1.0


def test_killed_sweep_resumes_without_recomputing_finished_cells(files, tmp_path):
    model, calib, evaluation = files
    out = tmp_path / "sweep"
    # The sweep SIGKILLs itself once two cells are recorded: polling sweep.json from here let a
    # quiet machine finish every tiny cell between two looks, and the test failed as "not interrupted".
    code = """
import os, signal, sys
from ptp import sweep
from ptp.cli import main
write = sweep._write
def write_then_die(out, config, result):
    write(out, config, result)
    if len(result.cells) >= 2:
        os.kill(os.getpid(), signal.SIGKILL)
sweep._write = write_then_die
sys.exit(main(sys.argv[1:]))
"""
    command = [sys.executable, "-c", code, *sweep_args(model, calib, evaluation, out)]
    proc = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=240)
    assert proc.returncode == -signal.SIGKILL
    first = json.loads((out / "sweep.json").read_text())["cells"]
    assert 2 <= len(first) < 7, "the sweep was not interrupted mid-way"
    assert main(sweep_args(model, calib, evaluation, out)) == 2  # a sweep is there: --resume needed
    assert main(sweep_args(model, calib, evaluation, out, "--resume")) == 0
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    assert len(cells) == 7
    assert cells[: len(first)] == first  # finished cells kept exactly, not recomputed
    other = sweep_args(model, calib, evaluation, out, "--resume")
    other[other.index("--nsamples") + 1] = "5"
    assert main(other) == 2  # resuming with other settings is refused


def test_pareto_front():
    points = [(1.0, 10.0), (1.5, 12.0), (1.2, 15.0), (2.0, 30.0), (0.9, 9.0)]
    assert pareto(points) == [4, 0, 1, 3]


def test_records_and_dataframe(files, tmp_path):
    from ptp.sweep import SweepConfig, run_sweep

    model, calib, evaluation = files
    result = run_sweep(SweepConfig(model=str(model), out=str(tmp_path / "s"), calib=str(calib), nsamples=4,
                                   seqlen=16, methods=("magnitude",), sparsities=("0.5",), ppl=(str(evaluation),),
                                   ppl_seqlen=32, ppl_limit=2))
    records = result.records()
    assert [r["name"] for r in records] == ["dense", "magnitude-0.5"]
    pd = pytest.importorskip("pandas")
    assert list(result.frame()["name"]) == ["dense", "magnitude-0.5"]
    assert isinstance(result.frame(), pd.DataFrame)
