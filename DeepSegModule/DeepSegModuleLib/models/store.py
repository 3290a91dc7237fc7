"""A local model store: imported models live in one folder each, with a sha256 for every file.

Layout::

    <root>/<model id>/manifest.json     {"id", "source", "imported", "files": {relative path: sha256}}
    <root>/<model id>/...               the model's files (a card + TorchScript, a bundle, an nnU-Net folder)

The root defaults to ``$DEEPSEG_MODEL_DIR`` or ``~/.deepseg/models``, outside the Slicer install so
models survive upgrades. Models that ship with DeepSeg (``Resources/models/<id>/``, same layout, manifest
committed) are listed with the user's own, read-only: they cannot be removed or shadowed, and their checksums
are verified like any other. :data:`DEFAULT_MODEL_ID` is the one a run without a model uses. Zip archives are extracted with :func:`safe_extract_zip`. :meth:`ModelStore.verify`
recomputes the checksums, so a damaged or tampered file is found before it is loaded.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from DeepSegModuleLib.models.archive import safe_extract_zip, sha256_of_file, verify_sha256
from DeepSegModuleLib.models.errors import ChecksumError, ModelFileError
from DeepSegModuleLib.outputs import replace_text

MANIFEST_NAME = "manifest.json"
#: The bundled model a segmentation without an explicit model runs (see ``Resources/models/``).
DEFAULT_MODEL_ID = "deepseg-brain"
#: A model id, matched whole (``fullmatch``: a trailing newline is not part of a valid id).
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_LOCK_NAME = ".store.lock"


def is_model_id(text: str) -> bool:
    """True when ``text`` is a valid model id (letters, digits, '.', '_', '-'; at most 128; no leading dot)."""
    return bool(_ID_PATTERN.fullmatch(text))


@contextmanager
def _store_lock(root: Path):
    """An exclusive lock on the store while an entry is checked and installed (concurrent imports, removals)."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / _LOCK_NAME, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def default_store_root() -> Path:
    """``$DEEPSEG_MODEL_DIR`` if set, else ``~/.deepseg/models``."""
    return Path(os.environ.get("DEEPSEG_MODEL_DIR") or Path.home() / ".deepseg" / "models")


def bundled_models_root() -> Path | None:
    """``Resources/models`` of this installation (packaged or source checkout), or None when it has none."""
    from DeepSegModuleLib.resources import resource_candidates

    for candidate in resource_candidates("models"):
        if candidate.is_dir():
            return candidate
    return None


def file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` except the manifest, keyed by relative path with '/'."""
    return {
        path.relative_to(folder).as_posix(): sha256_of_file(path)
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def write_manifest(folder: str | os.PathLike, model_id: str, source: str, needs_trust: list[str] | None = None) -> dict:
    """Records the checksums of a model folder's files in its ``manifest.json``; returns the manifest."""
    folder = Path(folder)
    manifest = {
        "id": model_id,
        "source": source,
        "imported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": file_checksums(folder),
    }
    if needs_trust:
        manifest["needs_trust"] = list(needs_trust)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


@dataclass(frozen=True)
class StoredModel:
    """A model in the store: its id, folder and recorded file checksums."""

    model_id: str
    path: Path
    files: dict[str, str]
    source: str
    bundled: bool = False
    needs_trust: list[str] = field(default_factory=list)
    trusted: dict = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        """What to hand to :func:`~DeepSegModuleLib.models.loader.load_model`: the folder, or its single
        top-level sub-folder when an archive wrapped everything in one."""
        return _model_path_in(self.path)


def _model_path_in(folder: Path) -> Path:
    entries = [p for p in folder.iterdir() if p.name != MANIFEST_NAME]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return folder


def validate_model(path: Path) -> list[str]:
    """Loads a model (untrusted, on the CPU) to prove it is one; returns what a bundle needs trust for.

    Raises:
        ModelError: it is not a model DeepSeg reads (naming why).
    """
    from DeepSegModuleLib.models.bundle_config import UntrustedCodeError
    from DeepSegModuleLib.models.loader import load_model

    try:
        load_model(path, "cpu")
    except UntrustedCodeError as error:
        return list(error.findings)
    return []


class ModelStore:
    """Imports, lists, verifies and removes local models.

    Args:
        root: the store folder; created when needed.
        bundled_root: the folder of the models shipped with DeepSeg (default: ``Resources/models``).
        include_bundled: list and resolve the shipped models too.
    """

    def __init__(
        self, root: str | os.PathLike | None = None, bundled_root: str | os.PathLike | None = None,
        include_bundled: bool = True,
    ) -> None:  # fmt: skip
        self.root = Path(root) if root is not None else default_store_root()
        if not include_bundled:
            self.bundled_root = None
        else:
            self.bundled_root = Path(bundled_root) if bundled_root is not None else bundled_models_root()

    def bundled_ids(self) -> list[str]:
        """The ids of the models shipped with DeepSeg, sorted."""
        if self.bundled_root is None or not self.bundled_root.is_dir():
            return []
        return sorted(p.name for p in self.bundled_root.iterdir() if (p / MANIFEST_NAME).is_file())

    def _folder(self, model_id: str) -> Path:
        if not _ID_PATTERN.fullmatch(model_id):
            raise ValueError(f"model id {model_id!r}: use letters, digits, '.', '_' and '-' only (at most 128)")
        return self.root / model_id

    def import_model(
        self, source: str | os.PathLike, model_id: str | None = None, expected_sha256: str | None = None,
        replace: bool = False, validate: bool = True,
    ) -> StoredModel:  # fmt: skip
        """Copies a model file, folder or zip archive into the store and records its checksums.

        Args:
            source: a TorchScript file (its card beside it is copied too), a model folder, or a ``.zip``.
            model_id: the id to store it under; defaults to the source's name without extension.
            expected_sha256: when given, the source file (archive or TorchScript) must have this sha256.
            replace: replace an existing model with the same id.
            validate: the model must load (untrusted) before it is recorded; a MONAI bundle that needs its own
                code is stored with what it needs listed (``needs_trust``), and runs only with trust.

        Raises:
            FileExistsError: the id is taken and ``replace`` is False.
            ChecksumError: ``expected_sha256`` does not match.
            UnsafeArchiveError: the archive tries to write outside its folder.
            ModelError: the content does not load as a model (nothing is stored).
        """
        source = Path(source)
        if not source.exists():
            raise ModelFileError(f"{source} does not exist")
        if expected_sha256 is not None:
            if source.is_dir():
                raise ValueError("expected_sha256 applies to a file or an archive, not a folder")
            verify_sha256(source, expected_sha256)
        model_id = model_id or source.name.split(".")[0]
        folder = self._folder(model_id)
        if model_id in self.bundled_ids():
            raise FileExistsError(
                f"{model_id!r} is the name of a model that ships with DeepSeg; store this one under another name"
            )
        if folder.exists() and not replace:
            raise FileExistsError(f"a model named {model_id!r} is already stored in {folder}; pass --replace")
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".import-{model_id}-", dir=self.root))
        try:
            content = staging / "content"
            if source.is_dir():
                shutil.copytree(source, content, symlinks=False)
            elif source.suffix.lower() == ".zip":
                safe_extract_zip(source, content)
            else:
                content.mkdir()
                shutil.copy2(source, content / source.name)
                from DeepSegModuleLib.models.torchscript import find_card

                card = find_card(source)
                if card is not None and card.resolve() != source.resolve():
                    shutil.copy2(card, content / card.name)
            needs_trust = validate_model(_model_path_in(content)) if validate else []
            files = write_manifest(content, model_id, str(source.resolve()), needs_trust=needs_trust)["files"]
            with _store_lock(self.root):
                # checked again under the lock: of concurrent imports of one name exactly one installs it
                if folder.exists() and not replace:
                    raise FileExistsError(f"a model named {model_id!r} is already stored in {folder}; pass --replace")
                if folder.exists():
                    os.replace(folder, staging / "previous")
                os.replace(content, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return StoredModel(model_id, folder, files, str(source), needs_trust=needs_trust)

    def get(self, model_id: str) -> StoredModel:
        """Returns a stored model's record.

        Raises:
            KeyError: no model with this id (the message lists the ids there are).
        """
        folder = self._folder(model_id)
        bundled = model_id in self.bundled_ids()
        if bundled:
            folder = self.bundled_root / model_id
        manifest_path = folder / MANIFEST_NAME
        if not manifest_path.is_file():
            raise KeyError(f"no model {model_id!r} in {self.root}; stored models: {self.list_ids()}")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            files = {str(k): str(v) for k, v in dict(manifest["files"]).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelFileError(
                f"model {model_id!r} is damaged: its {MANIFEST_NAME} in {folder} cannot be read. Remove it "
                f"(deepseg models remove {model_id}) and import it again"
            ) from None
        trusted = manifest.get("trusted") if isinstance(manifest.get("trusted"), dict) else {}
        return StoredModel(model_id, folder, files, str(manifest.get("source", "")), bundled,
                           needs_trust=list(manifest.get("needs_trust", [])), trusted=trusted)

    def list_ids(self) -> list[str]:
        """The ids of the stored models and of the models shipped with DeepSeg, sorted."""
        own = []
        if self.root.is_dir():
            own = [p.name for p in self.root.iterdir() if (p / MANIFEST_NAME).is_file()]
        return sorted(set(own) | set(self.bundled_ids()))

    def verify(self, model_id: str) -> StoredModel:
        """Recomputes every file's sha256 and compares with the manifest.

        Raises:
            ChecksumError: a file changed, is missing, or was added (naming it).
        """
        stored = self.get(model_id)
        present = {
            p.relative_to(stored.path).as_posix()
            for p in stored.path.rglob("*")
            if p.is_file() and p.name != MANIFEST_NAME
        }
        missing = sorted(set(stored.files) - present)
        added = sorted(present - set(stored.files))
        if missing or added:
            raise ChecksumError(
                f"model {model_id!r} in {stored.path} has missing files {missing} / unexpected files {added}; "
                "import it again"
            )
        for relative, expected in stored.files.items():
            actual = sha256_of_file(stored.path / relative)
            if actual != expected:
                raise ChecksumError(
                    f"model {model_id!r}: {relative} has sha256 {actual}, recorded {expected}; the file was damaged "
                    "or changed. Import the model again."
                )
        return stored

    def set_trusted(self, model_id: str, trusted: bool, what_runs: list[str] | None = None) -> StoredModel:
        """Records (or withdraws) the user's decision to run a stored model's own code (trusted mode).

        The record names what was shown when the decision was made; it is kept in the model's manifest and
        honoured only while the model's files still have the checksums recorded at import.
        """
        stored = self.verify(model_id)
        if stored.bundled:
            raise PermissionError(f"{model_id!r} ships with DeepSeg; it needs no trust decision")
        manifest_path = stored.path / MANIFEST_NAME
        with _store_lock(self.root):
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            if trusted:
                manifest["trusted"] = {
                    "decided": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "what_runs": list(what_runs or []),
                }
            else:
                manifest.pop("trusted", None)
            replace_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
        return self.get(model_id)

    def remove(self, model_id: str) -> None:
        """Deletes a stored model."""
        folder = self._folder(model_id)
        if model_id in self.bundled_ids():
            raise PermissionError(f"{model_id!r} ships with DeepSeg and cannot be removed")
        if not (folder / MANIFEST_NAME).is_file():
            raise KeyError(f"no model {model_id!r} in {self.root}")
        with _store_lock(self.root):
            # moved aside first: a removal that stops half-way leaves no half model under the id
            trash = Path(tempfile.mkdtemp(prefix=f".remove-{model_id}-", dir=self.root))
            os.replace(folder, trash / model_id)
        shutil.rmtree(trash, ignore_errors=True)


def model_argument(text: str, store: ModelStore) -> tuple[str, str | Path]:
    """What a model argument names, without ambiguity: ``("path", Path)`` or ``("store", id)``.

    A path is a path: it holds a separator or starts with ``.`` or ``~``. A bare name is a model in the store;
    when no stored model has that name, a file or folder of that name here is used. A bare name that is both
    is refused, naming both, so a folder that happens to be in the working directory is never run in place of
    the checksum-verified stored model.

    Raises:
        ModelFileError: nothing has that name, or two things do.
    """
    text = str(text)
    if not text.strip():
        raise ModelFileError("no model given: pass a model folder or file, or the name of a stored model")
    if "/" in text or os.sep in text or text.startswith((".", "~")):
        path = Path(text).expanduser()
        if not path.exists():
            raise ModelFileError(f"model {path} does not exist")
        return "path", path
    local = Path(text)
    stored = is_model_id(text) and text in store.list_ids()
    if stored and local.exists():
        raise ModelFileError(
            f"{text!r} names both the stored model {text!r} and {local.resolve()} in this folder: write ./{text} "
            "for the file or folder, or run from another folder for the stored model"
        )
    if stored:
        return "store", text
    if local.exists():
        return "path", local
    known = ", ".join(store.list_ids()) or "none"
    raise ModelFileError(
        f"model {text!r} is neither a file or folder nor in the model store (stored: {known}); "
        "import it with: deepseg models import PATH_OR_URL"
    )


def resolve_model(model: str | os.PathLike | None, store: ModelStore, verified: dict[str, tuple] | None = None) -> Path:
    """A model argument as the path to load: None is the default model that ships with DeepSeg, a path is used as
    it is (see :func:`model_argument`), a stored model's name is its folder once its checksums are verified.

    ``verified`` (name -> the files' sizes and times at the last check), kept by a long-lived caller such as the
    panel's logic, skips re-hashing a stored model whose files did not change since, so a large model (an
    nnU-Net folder of several folds) does not stall every run.

    Raises:
        ModelFileError: no such model, an ambiguous name, or the default model missing from the installation.
        ChecksumError: a stored model's file was damaged or changed since it was imported.
    """
    if model is None:
        if DEFAULT_MODEL_ID not in store.bundled_ids():
            raise ModelFileError(
                f"the default model {DEFAULT_MODEL_ID!r} is missing from this installation (Resources/models): "
                "reinstall DeepSeg, or pass --model (a model folder, file, or a store name)"
            )
        model = DEFAULT_MODEL_ID
    kind, value = model_argument(str(model), store)
    if kind == "path":
        return Path(value)
    name = str(value)
    if verified is None:
        return store.verify(name).model_path
    stored = store.get(name)
    signature = _file_signature(stored.path)
    if verified.get(name) != signature:
        stored = store.verify(name)
        verified[name] = signature
    return stored.model_path


def _file_signature(folder: Path) -> tuple:
    """Relative path, size and modification time of every file under ``folder``: cheap to take, changes when a
    file is replaced or edited."""
    signature = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            status = path.stat()
            signature.append((path.relative_to(folder).as_posix(), status.st_size, status.st_mtime_ns))
    return tuple(signature)


def recorded_trust(model: str, store: ModelStore) -> bool:
    """Whether a model argument names a stored model whose own code the user has trusted
    (``deepseg models trust NAME`` or the panel's confirmation); False for a path or a name that resolves to none."""
    try:
        kind, value = model_argument(str(model), store)
        return kind == "store" and bool(store.get(str(value)).trusted)
    except (ModelFileError, KeyError, ValueError):  # resolving the model reports a bad argument itself
        return False
