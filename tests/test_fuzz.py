"""Random bytes and random JSON fed to every file ptp reads: ptp.json, recipe files, profile files,
safetensors headers. Each must fail as a ConfigError (on the command line: one ``ptp: error:``
line, exit 2) — never a traceback, never a silent success. Seeded, so a failure reproduces."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch

import ptp
from ptp import cli, data, integrity, io
from ptp.config import ConfigError
from tests.lm_dirs import pruned_dirs, one_thread, save_model_dir, tiny_model, tiny_tokenizer, write_text  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
CASES = int(os.environ.get("PTP_FUZZ_CASES", "24"))  # per file kind; raise it for a longer hunt


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return pruned_dirs(tmp_path_factory.mktemp("fuzz"), "magnitude", 2)


# --------------------------------------------------------------------------- generators


def random_json(rng: random.Random, depth: int = 0):
    kinds = ["null", "bool", "int", "float", "str"] + (["list", "dict"] * 2 if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, -1, 1, 2**63, rng.randint(-10**6, 10**6)])
    if kind == "float":
        return rng.choice([0.5, -0.0, 1e308, rng.uniform(-2, 2)])
    if kind == "str":
        return rng.choice(["", "2:4", "0.5", "dense", "compressed", "model.layers.0", "\u00e9\u0000x",
                           "".join(rng.choice("abc._:/ ") for _ in range(rng.randint(1, 12)))])
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_json_key(rng): random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def random_json_key(rng: random.Random) -> str:
    return rng.choice(["dataset", "split", "field", "windows", "join", "ptp_version", "format", "report", "layers",
                       "integrity", "files", "shape", "down_proj", "", "x" * rng.randint(1, 5)])


def random_bytes(rng: random.Random) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 600)))


def mutate(rng: random.Random, value):
    """``value`` (parsed JSON) with one randomly chosen node replaced by random JSON."""
    value = copy.deepcopy(value)
    path, node = [], value
    while isinstance(node, (dict, list)) and node and rng.random() < 0.75:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append(key)
        node = node[key]
    if not path:
        return random_json(rng)
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = random_json(rng)
    return value


def payloads(seed: int, original=None):
    """CASES file contents: random bytes, random JSON, and (given ``original``) mutations of it."""
    rng = random.Random(seed)
    for i in range(CASES):
        kind = i % 3 if original is not None else i % 2
        if kind == 0:
            yield random_bytes(rng)
        elif kind == 1:
            yield json.dumps(random_json(rng)).encode()
        else:
            changed = mutate(rng, original)
            if changed != original:
                yield json.dumps(changed).encode()


def expect_config_error(call, what: str) -> None:
    try:
        call()
    except ConfigError as err:
        assert "\n" not in str(err), f"{what}: a multi-line error: {err}"
        return
    except Exception as err:  # the point of this file: nothing else may escape
        raise AssertionError(f"{what}: {type(err).__name__}: {err}") from err
    raise AssertionError(f"{what}: accepted")


def cli_exit_2(argv: list[str], capsys, what: str) -> None:
    try:
        code = cli.main(argv)
    except Exception as err:
        raise AssertionError(f"{what}: {type(err).__name__}: {err}") from err
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ptp: error: "), (what, code, err[-3:])


# --------------------------------------------------------------------------- ptp.json


@pytest.mark.parametrize("kind", ["dense", "compressed"])
def test_fuzzed_ptp_json(root, tmp_path, capsys, kind):
    folder = Path(shutil.copytree(root / kind, tmp_path / kind))
    original = json.loads((folder / "ptp.json").read_text())
    for i, payload in enumerate(payloads(1, original)):
        (folder / "ptp.json").write_bytes(payload)
        what = f"ptp.json case {i}: {payload[:80]!r}"
        expect_config_error(lambda: ptp.load(folder), what)
        try:  # an edited but genuine record still marks a directory ptp wrote: --overwrite may replace it
            io.check_out_dir(folder, overwrite=True)
            assert integrity.record_problem(json.loads(payload)) is None, what
        except ConfigError:
            pass
        cli_exit_2(["report", str(folder), "-q"], capsys, what)
        assert not (folder / "report.md").exists()


# --------------------------------------------------------------------------- recipes and profiles


def test_fuzzed_recipe_files(root, tmp_path):
    tokenizer = tiny_tokenizer()
    original = json.loads((data.RECIPE_DIR / "wikitext2.json").read_text())
    recipe = tmp_path / "recipe.json"
    for i, payload in enumerate(payloads(2, original)):
        recipe.write_bytes(payload)
        expect_config_error(lambda: data.calibration_batches(str(recipe), tokenizer, 2, 16),
                            f"recipe case {i}: {payload[:80]!r}")


def test_fuzzed_profile_files(root, tmp_path, capsys):
    profile = tmp_path / "profile.json"
    argv = ["prune", str(root / "tiny"), "--sparsity", "0.5", "--method", "magnitude", "--calib", str(root / "text.txt"),
            "--nsamples", "2", "--seqlen", "32", "--out", str(tmp_path / "out"), "--profile", str(profile), "-q"]
    for i, payload in enumerate(payloads(3, {"down_proj": 0.6, "layers.0": 0.3})):
        profile.write_bytes(payload)
        what = f"profile case {i}: {payload[:80]!r}"
        if (tmp_path / "out").exists():
            shutil.rmtree(tmp_path / "out")
        try:
            code = cli.main(argv)
        except Exception as err:
            raise AssertionError(f"{what}: {type(err).__name__}: {err}") from err
        err = capsys.readouterr().err.strip().splitlines()
        if code == 0:  # a mutation can stay a valid profile: then it must be what was applied
            applied_as_written(json.loads(payload), tmp_path / "out", what)
        else:
            assert code == 2 and len(err) == 1 and err[0].startswith("ptp: error: "), (what, code, err[-3:])
            assert not (tmp_path / "out").exists()


def applied_as_written(profile, out: Path, what: str) -> None:
    """Every pruned layer's target is the profile's longest matching pattern's value, else 0.5."""
    from ptp.config import Sparsity
    from ptp.engine import skipped

    assert isinstance(profile, dict) and profile, what
    for layer in json.loads((out / "ptp.json").read_text())["report"]["layers"]:
        matches = [p for p in profile if skipped(layer["name"], (p,))]
        expected = float(profile[max(matches, key=len)]) if matches else 0.5
        assert layer["target"] == str(Sparsity(expected)), (what, layer)


# --------------------------------------------------------------------------- safetensors headers


def header_payloads(seed: int, path: Path):
    """Whole files: a random header (bytes or JSON) before the real data, or the real header with
    one node mutated."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    rng = random.Random(seed)
    for i in range(CASES):
        if i % 3 == 0:
            text = random_bytes(rng)
        elif i % 3 == 1:
            text = json.dumps(random_json(rng)).encode()
        else:
            text = json.dumps(mutate(rng, header)).encode()
        size = struct.pack("<Q", len(text)) if rng.random() < 0.9 else struct.pack("<Q", rng.getrandbits(64))
        yield i % 3 == 2, size + text + body


@pytest.mark.parametrize("kind, file", [("dense", "model.safetensors"), ("compressed", "model.ptp.safetensors")])
def test_fuzzed_safetensors_headers(root, tmp_path, capsys, kind, file):
    folder = Path(shutil.copytree(root / kind, tmp_path / kind))
    argv = ["eval", str(folder), "--ppl", str(root / "text.txt"), "--seqlen", "32", "--limit", "1", "-q"]
    for i, (mutation, content) in enumerate(header_payloads(4, root / kind / file)):
        (folder / file).write_bytes(content)
        what = f"{file} case {i}"
        expect_config_error(lambda: ptp.load(folder), what)  # the checksum, always
        cli_exit_2(argv, capsys, what)
        if not mutation:  # a random header is not a checkpoint, checksums or not
            expect_config_error(lambda: ptp.load(folder, verify=False), what + " (verify=False)")
            cli_exit_2(argv + ["--no-verify"], capsys, what + " (--no-verify)")
            continue
        try:  # a mutated header may still describe loadable tensors; it must never be a traceback
            ptp.load(folder, verify=False)
        except ConfigError:
            pass
