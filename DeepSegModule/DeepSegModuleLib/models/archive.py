"""Safe extraction of model archives (zip) and file checksums.

Models are untrusted downloads: an entry such as ``../../.bashrc`` or ``/etc/passwd``, a symbolic
link, or an archive that expands to terabytes must never be written. :func:`safe_extract_zip` checks
every entry before writing anything.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from DeepSegModuleLib.models.errors import ChecksumError, ModelFileError, UnsafeArchiveError



def sha256_of_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Returns the hex sha256 of a file, read in chunks (weights files are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Checks a file against an expected sha256.

    Raises:
        ChecksumError: when they differ (the file is damaged, incomplete or not the expected one).
    """
    actual = sha256_of_file(path)
    if actual.lower() != expected.lower():
        raise ChecksumError(
            f"{path} has sha256 {actual} but {expected} was expected: the file is damaged, incomplete or a "
            "different version. Download or copy it again."
        )


def _checked_member_path(name: str) -> PurePosixPath:
    if any(ord(character) < 32 for character in name):
        raise UnsafeArchiveError(f"archive entry {name!r} has control characters in its name; refusing to extract")
    normalized = name.replace("\\", "/")
    posix = PurePosixPath(normalized)
    if normalized.startswith("/") or (len(normalized) > 1 and normalized[1] == ":"):
        raise UnsafeArchiveError(f"archive entry {name!r} has an absolute path; refusing to extract this archive")
    if any(part == ".." for part in posix.parts):
        raise UnsafeArchiveError(
            f"archive entry {name!r} points outside the extraction folder ('..'); refusing to extract this archive"
        )
    return posix


def safe_extract_zip(
    archive: str | os.PathLike,
    destination: str | os.PathLike,
    max_unpacked_bytes: int | None = None,
    max_entries: int | None = None,
) -> Path:
    """Extracts a zip archive after checking every entry, into ``destination``.

    Nothing is written unless every entry is safe: relative, without ``..``, not a symbolic link,
    and the declared total size within ``max_unpacked_bytes``. Extraction goes to a temporary
    sibling folder first and is renamed into place, so a failure leaves no half-extracted model.

    Args:
        archive: the zip file.
        destination: folder to create (must not exist yet).
        max_unpacked_bytes: refuse archives declaring (or producing) more uncompressed bytes than this
            (default: ``$DEEPSEG_MAX_UNPACKED_BYTES``, 8 GiB; see :mod:`~DeepSegModuleLib.limits`).
        max_entries: refuse archives with more entries than this (default: ``$DEEPSEG_MAX_ARCHIVE_ENTRIES``).

    Returns:
        The destination folder.

    Raises:
        UnsafeArchiveError: for path traversal, absolute paths, links or a zip bomb.
        ModelFileError: when the file is not a readable zip archive.
    """
    from DeepSegModuleLib import limits

    destination = Path(destination)
    max_unpacked_bytes = max_unpacked_bytes or limits.UNPACKED_BYTES.value()
    max_entries = max_entries or limits.ARCHIVE_ENTRIES.value()
    try:
        zip_file = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise ModelFileError(f"{archive} is not a readable zip archive ({error}); download or copy it again") from None
    with zip_file:
        members = zip_file.infolist()
        if len(members) > max_entries:
            raise UnsafeArchiveError(
                f"{archive} has {len(members)} entries, over the limit of {max_entries}; refusing to extract "
                f"(raise it with {limits.ARCHIVE_ENTRIES.variable} if the archive is expected)"
            )
        total = 0
        for member in members:
            _checked_member_path(member.filename)
            mode = member.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(
                    f"archive entry {member.filename!r} is a symbolic link; refusing to extract this archive"
                )
            total += member.file_size
        packed = max(sum(member.compress_size for member in members), 1)
        if total > 64 << 20 and total / packed > limits.COMPRESSION_RATIO.value():
            raise UnsafeArchiveError(
                f"{archive} would expand {total / packed:.0f}-fold ({packed >> 20} MiB to {total >> 20} MiB), more than "
                f"model files do (limit {limits.COMPRESSION_RATIO.value()}-fold); refusing to extract (raise "
                f"{limits.COMPRESSION_RATIO.variable} if the archive is expected)"
            )
        if total > max_unpacked_bytes:
            raise UnsafeArchiveError(
                f"{archive} would expand to {total / 2**30:.2f} GiB, over the limit of {max_unpacked_bytes / 2**30:.2f} "
                f"GiB; refusing to extract (raise it with {limits.UNPACKED_BYTES.variable} if the archive is expected)"
            )
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".extracting-", dir=destination.parent))
        try:
            root = staging.resolve()
            for member in members:
                target = (staging / _checked_member_path(member.filename)).resolve()
                if root not in target.parents and target != root:
                    raise UnsafeArchiveError(f"archive entry {member.filename!r} resolves outside the folder")
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                try:
                    with zip_file.open(member) as source, open(target, "wb") as sink:
                        while chunk := source.read(1 << 22):
                            written += len(chunk)
                            if written > member.file_size:
                                raise UnsafeArchiveError(
                                    f"archive entry {member.filename!r} is larger than it declares; refusing to extract"
                                )
                            sink.write(chunk)
                except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as error:
                    raise ModelFileError(
                        f"{archive}: entry {member.filename!r} cannot be extracted ({error}); the archive is damaged or "
                        "truncated: download or copy it again"
                    ) from None
            os.replace(staging, destination)
        except (ModelFileError, UnsafeArchiveError):
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except OSError as error:  # an entry that is a folder and a file at once, a name the file system refuses
            shutil.rmtree(staging, ignore_errors=True)
            raise ModelFileError(f"{archive} cannot be extracted ({error.strerror or error}); it is not a model "
                                 "archive DeepSeg can unpack") from None  # fmt: skip
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return destination
