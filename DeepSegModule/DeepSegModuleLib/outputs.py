"""One rule for every file DeepSeg writes (CLI, batch, demo, the panel's saves): the user's files are safe.

- An output is checked before any work: not an input of the run, not an existing folder, inside the folder
  it must stay in (a batch's ``--output-dir``), its folder exists and is writable, and no two outputs of a run
  are the same file. An existing file is an error unless the user asked to replace it (``--overwrite``).
- Everything is written into hidden staging files beside its destination (same file name, so writers pick
  the format from it) and moved into place only when the whole run has succeeded: a failed or interrupted
  run leaves every destination as it was. A new file appears with ``os.link`` (which never replaces one that
  appeared meanwhile), a replaced one with ``os.replace`` (atomic).
- Rollback removes only what this run created: its staging files, and folders it made.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


class OutputError(ValueError):
    """An output path breaks the output rule; the message says which and what to do."""


def same_file(a: Path, b: Path) -> bool:
    """True when two paths name the same file (through links and ``..``), existing or not."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return Path(os.path.realpath(a)) == Path(os.path.realpath(b))


def inside(path: Path, folder: Path) -> bool:
    """True when ``path`` resolves inside ``folder`` (symbolic links followed)."""
    resolved, root = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return resolved == root or root in resolved.parents


@dataclass
class _Staged:
    destination: Path
    staging_folder: Path

    @property
    def temporary(self) -> Path:
        return self.staging_folder / self.destination.name


@dataclass
class OutputSet:
    """The outputs of one run (see the module docstring). Use through :func:`output_set`.

    Args:
        inputs: the run's input files and folders; no output may be one of them.
        overwrite: an existing file may be replaced (the user asked, e.g. ``--overwrite``).
        root: every output must resolve inside this folder (a batch's output folder).
    """

    inputs: list[Path] = field(default_factory=list)
    overwrite: bool = False
    root: Path | None = None
    _claimed: list[Path] = field(default_factory=list)
    _staged: list[_Staged] = field(default_factory=list)
    _folders: list[Path] = field(default_factory=list)
    _created: list[Path] = field(default_factory=list)

    def claim(self, path: str | os.PathLike, what: str = "output") -> Path:
        """Checks ``path`` as an output file before any work; returns it.

        Raises:
            OutputError: it is an input, an existing folder, an existing file without ``overwrite``, outside
                ``root``, claimed twice, or its folder is missing or not writable.
        """
        path = Path(path).expanduser()
        if path.name in ("", ".", ".."):
            raise OutputError(f"{what} {path} is not a file name")
        if self.root is not None and not inside(path, self.root):
            raise OutputError(f"{what} {path} is outside the output folder {self.root}; refusing to write it")
        for source in self.inputs:
            if same_file(path, source):
                raise OutputError(f"{what} {path} is also an input of this run; choose another file name")
        for earlier in self._claimed:
            if same_file(path, earlier):
                raise OutputError(f"{what} {path} is named twice as an output of this run")
        if path.is_dir():
            raise OutputError(f"{what} {path} is an existing folder; give a file name (e.g. {path / 'out'}...)")
        if (path.exists() or path.is_symlink()) and not self.overwrite:
            raise OutputError(f"{what} {path} already exists; pass --overwrite to replace it, or choose another name")
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir() and folder.resolve() not in [f.resolve() for f in self._folders]:
            raise OutputError(f"the folder of {what} {path} does not exist: create it, or choose another {what}")
        if folder.is_dir() and not os.access(folder, os.W_OK):
            raise OutputError(f"the folder of {what} {path} is not writable: choose another {what}")
        self._claimed.append(path)
        return path

    def claim_folder(self, path: str | os.PathLike, what: str = "output folder") -> Path:
        """Checks a folder outputs go into: an existing folder, or one this run creates (and removes on failure)."""
        path = Path(path).expanduser()
        if self.root is not None and not inside(path, self.root):
            raise OutputError(f"{what} {path} is outside the output folder {self.root}")
        if path.exists() and not path.is_dir():
            raise OutputError(f"{what} {path} is an existing file, not a folder; choose another name")
        for source in self.inputs:
            if same_file(path, source):
                raise OutputError(f"{what} {path} is also an input of this run")
        missing = []
        ancestor = path
        while not ancestor.is_dir():
            if ancestor.exists() or ancestor.is_symlink():
                raise OutputError(f"cannot create {what} {path}: {ancestor} is a file; choose another {what}")
            missing.append(ancestor)
            if ancestor.parent == ancestor:
                break
            ancestor = ancestor.parent
        if missing and not os.access(ancestor, os.W_OK):
            raise OutputError(f"cannot create {what} {path}: {ancestor} is not writable; choose another {what}")
        self._folders += list(reversed(missing)) or [path]
        return path

    def stage(self, path: str | os.PathLike) -> Path:
        """Where to write the output ``path`` now (a hidden staging file with the same name); claims it if needed."""
        path = Path(path).expanduser()
        if not any(same_file(path, claimed) for claimed in self._claimed):
            self.claim(path)
        folder = path.parent if str(path.parent) else Path(".")
        self._make_folder(folder)
        staged = _Staged(path, Path(tempfile.mkdtemp(prefix=".deepseg-staging-", dir=folder)))
        self._staged.append(staged)
        return staged.temporary

    def _make_folder(self, folder: Path) -> None:
        if folder.is_dir():
            return
        if folder.resolve() not in [f.resolve() for f in self._folders]:
            raise OutputError(f"folder {folder} does not exist")
        self._make_folder(folder.parent)
        folder.mkdir()
        self._created.append(folder)

    def commit(self) -> list[Path]:
        """Moves every staged file into place; returns the destinations."""
        for folder in self._folders:
            self._make_folder(folder)
        placed: list[Path] = []
        try:
            for staged in self._staged:
                if not staged.temporary.is_file():
                    raise OutputError(f"{staged.destination} was not written")
                if self.overwrite:
                    os.replace(staged.temporary, staged.destination)
                else:
                    try:
                        os.link(staged.temporary, staged.destination)
                    except FileExistsError:
                        raise OutputError(f"{staged.destination} appeared while DeepSeg was running; nothing was "
                                          "replaced. Run again with --overwrite, or choose another name") from None
                    except OSError:  # a file system without hard links: rename; the check above already ran
                        if staged.destination.exists():
                            raise OutputError(f"{staged.destination} appeared while DeepSeg was running") from None
                        os.rename(staged.temporary, staged.destination)
                placed.append(staged.destination)
                self._created.append(staged.destination)
        except BaseException:
            for destination in placed:
                if not self.overwrite:
                    destination.unlink(missing_ok=True)
            raise
        finally:
            self._remove_staging()
        return placed

    def rollback(self) -> None:
        """Removes what this run created and nothing else: staging files, folders it made (when empty)."""
        self._remove_staging()
        for folder in reversed([p for p in self._created if p.is_dir()]):
            try:
                folder.rmdir()  # only when empty: a file someone put there meanwhile is kept
            except OSError:
                pass

    def _remove_staging(self) -> None:
        for staged in self._staged:
            shutil.rmtree(staged.staging_folder, ignore_errors=True)
        self._staged.clear()


def replace_text(path: Path, text: str) -> Path:
    """Writes a small text file DeepSeg owns (a record, a summary, a manifest) whole or not at all: a temporary
    file beside it, then ``os.replace``, so a crash never leaves half of it."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; DeepSeg's file cannot be written there")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


@contextmanager
def output_set(
    inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False, root: str | os.PathLike | None = None
) -> Iterator[OutputSet]:
    """An :class:`OutputSet` committed when the block ends normally and rolled back when it raises."""
    outputs = OutputSet([Path(p) for p in inputs if p is not None], overwrite, Path(root) if root else None)
    try:
        yield outputs
    except BaseException:
        outputs.rollback()
        raise
    outputs.commit()
