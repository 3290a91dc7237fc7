"""Finds the module's resource files (.ui, icons, requirements.txt, model catalog) on disk.

The same file sits in two different places depending on how the module was installed:

* packaged by CMake (Extensions Manager, build tree): ``<qt-scripted-modules>/Resources/<name>``, next to
  ``DeepSegModule.py`` and ``DeepSegModuleLib/``, because ``DeepSegModule/CMakeLists.txt`` copies the
  top-level ``Resources/`` there;
* a source checkout loaded through Slicer's "Additional module paths" (pointing at ``DeepSegModule/``), or
  the editable ``pip install -e .``: ``<repository>/Resources/<name>``, one level above the module folder;
* an installed wheel (``pip install .``): ``<site-packages>/DeepSegModuleLib/Resources/<name>``, copied into
  the package when the wheel is built (``setup.py``).

Slicer's own ``resourcePath()`` only knows the first layout, so the module's classes call
:func:`resource_path` instead; headless code (the ``deepseg`` command, tests) uses it too.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MODULE_DIR", "resource_candidates", "resource_path"]

#: The folder that holds ``DeepSegModule.py`` and ``DeepSegModuleLib/``.
MODULE_DIR = Path(__file__).resolve().parent.parent


def resource_candidates(name: str, module_dir: Path | None = None) -> tuple[Path, ...]:
    """The places ``name`` is looked for, in order: the packaged extension, the source checkout, the wheel.

    Args:
        name: path relative to ``Resources/``, with forward slashes, e.g. ``"UI/DeepSegModule.ui"``.
        module_dir: the folder holding ``DeepSegModule.py``; defaults to the one this package is in.
    """
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        # A resource name comes from our own code; anything escaping Resources/ is a bug, not a lookup.
        raise ValueError(f"resource name must be relative to Resources/ and stay inside it: {name!r}")
    base = MODULE_DIR if module_dir is None else Path(module_dir)
    return base / "Resources" / relative, base.parent / "Resources" / relative, base / "DeepSegModuleLib" / "Resources" / relative


def resource_path(name: str, module_dir: Path | None = None) -> Path:
    """The absolute path of the resource file ``name``.

    Args:
        name: path relative to ``Resources/``, e.g. ``"Icons/DeepSegModule.png"``.
        module_dir: the folder holding ``DeepSegModule.py``; defaults to the one this package is in.

    Raises:
        FileNotFoundError: when the file is in neither place; the message names both.
    """
    candidates = resource_candidates(name, module_dir)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"DeepSeg resource {name!r} not found: looked in {', '.join(str(c) for c in candidates)} (packaged "
        "extension, source checkout, installed wheel). List it in DeepSegModule/CMakeLists.txt so that packaging "
        "copies it, and in setup.py's PACKAGED_RESOURCES for the wheel."
    )
