"""The compatibility matrix: every method on tiny random models of twenty families, every weight
counted, the result saved, reloaded and verified. The README's table is this test's output:

    python -m tests.test_compat          # prints the table
    python -m tests.test_compat --write  # writes it into README.md

A cell is "ok" or the one-line reason ptp gives for refusing (a ConfigError); anything else — a
raw exception, a layer left dense without a reason, a count that does not add up — fails the test.
"""

from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import ptp
from ptp.config import ConfigError, parse_sparsity
from tests.families import FAMILIES, NAMES, family_model, family_tokens

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("unstructured 50%", "2:4", "ADMM 4:8", "structured 0.25", "save + reload + verify")
BEGIN, END = "<!-- compat-matrix:begin -->", "<!-- compat-matrix:end -->"


def check_counts(model, report, sparsity: str) -> None:
    """Every weight is in the accounting once; every pruned unit holds the requested pattern."""
    acc = report.accounting
    unique = {id(p): p for p in model.parameters()}
    assert acc["model"]["params"] == sum(p.numel() for p in unique.values())
    dense_in_blocks = sum(d["params"] for d in acc["dense"] if d["reason"] != "outside blocks")
    assert acc["blocks"]["params"] == acc["pruned"]["params"] + dense_in_blocks
    assert {d["reason"] for d in acc["dense"]} <= {"router", "vector", "outside blocks"}
    spec = parse_sparsity(sparsity)
    for layer in report.layers:
        weight = ptp.units.find_unit(model, layer.name).matrix()
        ptp.io.check_sparsity(layer.name, weight, spec)


@functools.lru_cache(maxsize=None)
def run_cell(family: str, column: str) -> str:
    model, calib = family_model(family), family_tokens()
    try:
        if column == "structured 0.25":
            ptp.prune_structured(model, calib, ratio=0.25)
            with torch.no_grad():
                model(calib)
            return "ok"
        method, sparsity = {"unstructured 50%": ("sparsegpt", "0.5"), "2:4": ("wanda", "2:4"),
                            "ADMM 4:8": ("admm", "4:8"), "save + reload + verify": ("sparsegpt", "2:4")}[column]
        report = ptp.prune(model, calib, ptp.PruneConfig(method=method, sparsity=sparsity))
        check_counts(model, report, sparsity)
        if column == "save + reload + verify":
            with tempfile.TemporaryDirectory() as tmp:
                for fmt in ("dense", "compressed"):
                    ptp.save(model, None, Path(tmp) / fmt, report=report, sparsity=sparsity, format=fmt)
                    reloaded = ptp.load(Path(tmp) / fmt)
                    with torch.no_grad():
                        torch.testing.assert_close(reloaded(calib).logits, model(calib).logits)
        return "ok"
    except ConfigError as err:
        return f"refused: {err}"


def matrix() -> dict[str, dict[str, str]]:
    return {family: {column: run_cell(family, column) for column in COLUMNS} for family in FAMILIES}


def markdown(cells: dict[str, dict[str, str]]) -> str:
    lines = ["| family | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for family, row in cells.items():
        lines.append(f"| {NAMES[family]} | " + " | ".join("✓" if v == "ok" else v.replace("|", "/") for v in row.values()) + " |")
    return "\n".join(lines)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("column", COLUMNS)
def test_cell(family, column):
    result = run_cell(family, column)
    assert result == "ok" or result.startswith("refused: ")
    if column != "structured 0.25":
        assert result == "ok", f"{family}: {result}"  # unstructured pruning must work on every family


def test_readme_holds_the_current_matrix():
    readme = (REPO / "README.md").read_text()
    assert BEGIN in readme and END in readme
    table = readme.split(BEGIN)[1].split(END)[0].strip()
    assert table == markdown(matrix()), "README's compatibility matrix is stale: python -m tests.test_compat --write"


if __name__ == "__main__":
    torch.set_num_threads(1)
    text = markdown(matrix())
    if "--write" in sys.argv:
        readme = (REPO / "README.md").read_text()
        head, rest = readme.split(BEGIN)
        readme = f"{head}{BEGIN}\n{text}\n{END}{rest.split(END)[1]}"
        (REPO / "README.md").write_text(readme)
    print(text)
