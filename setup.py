"""Ship the calibration recipes with the package.

The recipes' source is the top-level ``calib/`` folder (one file per source, read by humans
too); a wheel carries a copy as ``ptp/calib/``, so a non-editable ``pip install .`` resolves
``--calib wikitext2``. An editable install has no copy: ``ptp.data`` then reads ``calib/``.
Everything else about the package is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RECIPES = Path(__file__).resolve().parent / "calib"


class build_py_with_recipes(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # the source tree's calib/ is read in place
        target = Path(self.build_lib) / "ptp" / "calib"
        target.mkdir(parents=True, exist_ok=True)
        for recipe in sorted(RECIPES.glob("*.json")) + [RECIPES / "README.md"]:
            shutil.copy2(recipe, target / recipe.name)


setup(cmdclass={"build_py": build_py_with_recipes})
