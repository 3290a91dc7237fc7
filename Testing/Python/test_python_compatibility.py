"""The module file and every Lib file compile under Python 3.12, the Python current Slicer releases ship.

This suite runs on another Python (the project's virtual environment), so a construct that 3.12 rejects would pass
here and fail only when Slicer loads the module. Two checks: a real Python 3.12, when this machine has one, compiles
copies of the files with warnings as errors; and, always, the current interpreter compiles them with warnings as
errors (invalid escape sequences warn, and are an error in waiting) while ``ast`` looks for what 3.12 removed.
"""

from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
import textwrap
import warnings
from pathlib import Path

import pytest
from extension_checks import MODULE_DIR, module_python_files

#: Standard-library modules Python 3.12 removed (PEP 594 and PEP 632), with what to use instead.
REMOVED_IN_3_12 = {
    "distutils": "setuptools or packaging (e.g. packaging.version.Version for LooseVersion)",
    "imp": "importlib",
    "asynchat": "asyncio",
    "asyncore": "asyncio",
    "smtpd": "aiosmtpd",
}
#: unittest.TestCase aliases Python 3.12 removed; DeepSegModuleTest is a TestCase that Slicer runs.
REMOVED_TEST_CASE_ALIASES = {
    "assertEquals": "assertEqual", "assertNotEquals": "assertNotEqual", "assert_": "assertTrue",
    "assertAlmostEquals": "assertAlmostEqual", "assertNotAlmostEquals": "assertNotAlmostEqual",
    "assertRegexpMatches": "assertRegex", "assertNotRegexpMatches": "assertNotRegex",
    "assertRaisesRegexp": "assertRaisesRegex", "assertDictContainsSubset": "a dict comparison",
    "failUnless": "assertTrue", "failIf": "assertFalse", "failUnlessEqual": "assertEqual",
    "failIfEqual": "assertNotEqual", "failUnlessAlmostEqual": "assertAlmostEqual",
    "failIfAlmostEqual": "assertNotAlmostEqual", "failUnlessRaises": "assertRaises",
}  # fmt: skip


def module_sources() -> list[Path]:
    """DeepSegModule.py and every file of DeepSegModuleLib, as packaged."""
    return [MODULE_DIR / name for name in sorted(module_python_files(MODULE_DIR))]


def python_3_12() -> str | None:
    """A working Python 3.12 interpreter: ``python3.12`` on PATH, else one installed by pyenv; None if neither.

    A pyenv shim is on PATH even when 3.12 is not the selected version, and then fails; every candidate is run.
    """
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    candidates = [shutil.which("python3.12"), *sorted(glob.glob(f"{pyenv_root}/versions/3.12*/bin/python3.12"))[::-1]]
    for candidate in filter(None, candidates):
        try:
            result = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
        except OSError:
            continue
        if result.returncode == 0 and result.stdout.strip() == "True":
            return candidate
    return None


def compile_with(python: str, sources: list[Path], root: Path, scratch: Path) -> subprocess.CompletedProcess:
    """``python -W error -m py_compile`` on copies of ``sources`` (paths kept relative to ``root``) in ``scratch``,
    so no ``__pycache__`` of another Python lands in the repository."""
    copies = []
    for source in sources:
        copy = scratch / source.relative_to(root)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, copy)
        copies.append(str(copy))
    return subprocess.run(
        [python, "-W", "error", "-m", "py_compile", *copies], capture_output=True, text=True, timeout=300, check=False
    )


def compatibility_problems(path: Path, source: str | None = None) -> list[str]:
    """What stops ``path`` from running on Python 3.12, found with this interpreter: a warning while compiling
    (raised as an error), an import of a removed module, a removed TestCase alias."""
    source = path.read_text(encoding="utf-8") if source is None else source
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            tree = compile(source, str(path), "exec", flags=ast.PyCF_ONLY_AST, dont_inherit=True)
            compile(tree, str(path), "exec", dont_inherit=True)
        except (SyntaxError, SyntaxWarning, DeprecationWarning) as error:
            return [f"{path.name}:{getattr(error, 'lineno', '?')}: {type(error).__name__}: {error}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            modules = []
        for module in modules:
            top = module.split(".")[0]
            if top in REMOVED_IN_3_12:
                problems.append(
                    f"{path.name}:{node.lineno}: imports {module}, removed in Python 3.12: use {REMOVED_IN_3_12[top]}"
                )
        if isinstance(node, ast.Attribute) and node.attr in REMOVED_TEST_CASE_ALIASES:
            problems.append(
                f"{path.name}:{node.lineno}: {node.attr} was removed from unittest in Python 3.12: "
                f"use {REMOVED_TEST_CASE_ALIASES[node.attr]}"
            )
    return problems


# ----------------------------------------------------------------------------------------------- the module


def test_the_sources_include_the_module_file_and_the_lib():
    names = {path.relative_to(MODULE_DIR).as_posix() for path in module_sources()}
    assert {"DeepSegModule.py", "DeepSegModuleLib/__init__.py", "DeepSegModuleLib/logic.py"} <= names


def test_module_and_lib_compile_under_a_real_python_3_12(tmp_path: Path):
    python = python_3_12()
    if python is None:
        pytest.skip("no Python 3.12 interpreter here (looked for python3.12 on PATH and in pyenv's versions)")
    result = compile_with(python, module_sources(), MODULE_DIR, tmp_path)
    assert result.returncode == 0, result.stderr


def test_module_and_lib_compile_without_warnings_and_use_nothing_python_3_12_removed():
    problems = [problem for path in module_sources() for problem in compatibility_problems(path)]
    assert problems == []


# ----------------------------------------------------------------------------------------------- the checks can fail

BROKEN_SOURCE = textwrap.dedent(
    r"""
    import imp
    from distutils.version import LooseVersion
    import asyncore, os


    class Checks:
        def test_it(self):
            self.assertEquals(1, 1)
    """
)


def test_compatibility_check_catches_removed_modules_and_test_case_aliases():
    problems = compatibility_problems(Path("broken.py"), BROKEN_SOURCE)
    assert problems == [
        "broken.py:2: imports imp, removed in Python 3.12: use importlib",
        (
            "broken.py:3: imports distutils.version, removed in Python 3.12: use setuptools or packaging "
            "(e.g. packaging.version.Version for LooseVersion)"
        ),
        "broken.py:4: imports asyncore, removed in Python 3.12: use asyncio",
        "broken.py:9: assertEquals was removed from unittest in Python 3.12: use assertEqual",
    ]


def test_compatibility_check_catches_an_invalid_escape_sequence():
    [problem] = compatibility_problems(Path("pattern.py"), 'import re\nDIGITS = re.compile("\\d+")\n')
    assert problem.startswith("pattern.py:2: ") and "invalid escape sequence" in problem


def test_python_3_12_compile_catches_an_invalid_escape_sequence(tmp_path: Path):
    python = python_3_12()
    if python is None:
        pytest.skip("no Python 3.12 interpreter here (looked for python3.12 on PATH and in pyenv's versions)")
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "good.py").write_text("VALUE = 1\n")
    (sources / "pattern.py").write_text('DIGITS = "\\d+"\n')
    result = compile_with(python, sorted(sources.iterdir()), sources, tmp_path / "copies")
    assert result.returncode != 0
    assert "pattern.py" in result.stderr and "invalid escape sequence" in result.stderr
