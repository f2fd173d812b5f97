"""Build hook: ship the MONAI bundles (``bundles/<name>``) inside the wheel as ``ldct_clip/bundles/<name>``.

Everything else about the package is declared in setup.cfg. The bundles live at the top of the
repository, where MONAI users look for them; ``ldct_clip.bundles.resolve_bundle`` finds the copy inside
an installed wheel and the checkout's folder in an editable install.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithBundles(build_py):
    """``build_py`` that also copies every bundle folder into the built ``ldct_clip/bundles`` package."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "ldct_clip" / "bundles"
        for bundle in sorted((ROOT / "bundles").iterdir()):
            if (bundle / "configs" / "metadata.json").is_file():
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".gitkeep")
                shutil.copytree(bundle, target / bundle.name, dirs_exist_ok=True, ignore=ignore)


setup(cmdclass={"build_py": BuildPyWithBundles})
