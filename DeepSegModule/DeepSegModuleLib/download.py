"""Fetching model files from a URL: streamed to a temporary file, checked, then moved into place.

Any ``http(s)://`` or ``file://`` URL works; nothing is fetched unless the user asks for that URL. With an
expected sha256 the file is refused (and deleted) when it does not match.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

CHUNK_BYTES = 1 << 20


class DownloadError(OSError):
    """The URL could not be fetched, or what came back is not what was expected."""


def is_url(text: str) -> bool:
    return urllib.parse.urlparse(str(text)).scheme in ("http", "https", "file")


def file_name_of(url: str) -> str:
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    return name or "model"


def download(url: str, folder: str | os.PathLike, expected_sha256: str | None = None, timeout_s: float = 60.0) -> Path:
    """Downloads ``url`` into ``folder`` under its own file name and returns the path.

    Raises:
        DownloadError: the server cannot be reached or answers with an error, the transfer breaks, or the
            sha256 differs from ``expected_sha256``. No partial file is left behind.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / file_name_of(url)
    handle, temporary = tempfile.mkstemp(prefix=".download-", dir=folder)
    digest = hashlib.sha256()
    try:
        with os.fdopen(handle, "wb") as output:
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as response:  # the user's own URL
                    expected_length = response.headers.get("Content-Length")
                    received = 0
                    while True:
                        chunk = response.read(CHUNK_BYTES)
                        if not chunk:
                            break
                        output.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
            except urllib.error.HTTPError as error:
                raise DownloadError(f"{url} answered {error.code} {error.reason}: check the address") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                reason = getattr(error, "reason", error)
                raise DownloadError(f"could not fetch {url} ({reason}): check the address and the network") from None
        if expected_length is not None and received != int(expected_length):
            raise DownloadError(f"the download of {url} broke off ({received} of {expected_length} bytes): try again")
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256.lower():
            raise DownloadError(
                f"{url} has sha256 {digest.hexdigest()}, expected {expected_sha256.lower()}: "
                "the file is not the one you meant (or was damaged); nothing was kept"
            )
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return target
