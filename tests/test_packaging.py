"""A non-editable install: the package must carry what it reads (the calib/ recipes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.lm_dirs import REPO

SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "ptp", "calib"]
CHECK = """
import json, sys
from pathlib import Path
import ptp
from ptp import data
from ptp.config import ConfigError
try:
    data.calibration_batches("wikitext3", None, 1, 8)
except ConfigError as err:
    known = str(err)
print(json.dumps({"ptp": ptp.__file__, "recipes": str(data.RECIPE_DIR), "known": known,
                  "wikitext2": data.load_recipe(data.RECIPE_DIR / "wikitext2.json")["dataset"]}))
"""


def test_a_non_editable_install_resolves_the_calib_recipes(tmp_path):
    """pip install (no -e) into a fresh venv that sees this environment's torch & co through a .pth
    line (not --system-site-packages: that would be the base interpreter's, and would also run the
    editable install's finder), built without isolation or dependencies so nothing is downloaded."""
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:  # a copy: pip builds in place and would leave build/ in the checkout
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--no-index", str(source)], capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    shutil.rmtree(source)  # nothing may be read from the source any more
    run = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["ptp"].startswith(site) and out["recipes"] == str(Path(site) / "ptp" / "calib")
    assert "c4, ptb, wikitext2" in out["known"] and out["wikitext2"] == "wikitext"
    cli = subprocess.run([str(venv / "bin" / "ptp"), "prune", "--help"], capture_output=True, text=True, env=env)
    assert cli.returncode == 0 and "--calib SOURCE" in cli.stdout
