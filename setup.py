"""Packaging hook: a built wheel (``pip install .``, ``python -m build``) carries the resources the module needs.

The resources live in the repository's top-level ``Resources/`` (where Slicer's CMake packaging and a source
checkout find them); a wheel has no such folder, so they are copied into the package as
``DeepSegModuleLib/Resources/``, the third place :mod:`DeepSegModuleLib.resources` looks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

#: What a running DeepSeg reads from Resources/ (the bundled models, the panel, icons, the self-test's data).
PACKAGED_RESOURCES = ("models", "UI", "Icons", "Testing", "requirements.txt")


class BuildWithResources(build_py):
    def run(self) -> None:
        super().run()
        source = Path(__file__).resolve().parent / "Resources"
        target = Path(self.build_lib) / "DeepSegModuleLib" / "Resources"
        for name in PACKAGED_RESOURCES:
            if (source / name).is_dir():
                shutil.copytree(source / name, target / name, dirs_exist_ok=True)
            elif (source / name).is_file():
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / name, target / name)


setup(cmdclass={"build_py": BuildWithResources})
