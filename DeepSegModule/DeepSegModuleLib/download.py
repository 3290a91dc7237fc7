"""Fetching model files from a URL: streamed to a temporary file, checked, then moved into place.

Any ``http(s)://`` or ``file://`` URL works; nothing is fetched unless the user asks for that URL. With an
expected sha256 the file is refused (and deleted) when it does not match.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

CHUNK_BYTES = 1 << 20


class DownloadError(OSError):
    """The URL could not be fetched, or what came back is not what was expected."""


def is_url(text: str) -> bool:
    return urllib.parse.urlparse(str(text)).scheme in ("http", "https", "file")


def file_name_of(url: str) -> str:
    """The URL's last path segment as a safe file name (letters, digits, '.', '_', '-'), else ``model``."""
    segment = urllib.parse.unquote(urllib.parse.urlparse(url).path).replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", segment).lstrip(".")
    return cleaned[:128] or "model"


def download(
    url: str,
    folder: str | os.PathLike,
    expected_sha256: str | None = None,
    timeout_s: float | None = None,
    expected_size: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Downloads ``url`` into ``folder`` under its own (sanitised) file name and returns the path.

    Bounded: the size (``expected_size``, else ``Content-Length``, never more than ``DEEPSEG_MAX_DOWNLOAD_BYTES``),
    the time without a byte (``timeout_s``, default ``DEEPSEG_DOWNLOAD_STALL_S``) and the whole transfer
    (``DEEPSEG_DOWNLOAD_DEADLINE_S``); see :mod:`~DeepSegModuleLib.limits`. ``progress(received, total)`` is called
    once the server has answered and after every chunk (``total`` in bytes, None when the server does not say).

    Raises:
        DownloadError: the server cannot be reached or answers with an error, the transfer breaks, stalls or runs
            past its deadline or size, or the sha256 differs from ``expected_sha256``. No partial file is left.
    """
    from DeepSegModuleLib import limits

    stall_s = float(timeout_s or limits.DOWNLOAD_STALL_S.value())
    deadline = time.monotonic() + limits.DOWNLOAD_DEADLINE_S.value()
    max_bytes = min(int(expected_size), limits.DOWNLOAD_BYTES.value()) if expected_size else limits.DOWNLOAD_BYTES.value()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / file_name_of(url)
    handle, temporary = tempfile.mkstemp(prefix=".download-", dir=folder)
    digest = hashlib.sha256()
    try:
        with os.fdopen(handle, "wb") as output:
            try:
                with urllib.request.urlopen(url, timeout=stall_s) as response:  # the user's own URL
                    expected_length = response.headers.get("Content-Length")
                    if expected_length is not None and not expected_length.strip().isdigit():
                        raise DownloadError(f"{url} sent a malformed Content-Length {expected_length!r}")
                    if expected_length is not None and int(expected_length) > max_bytes:
                        raise DownloadError(
                            f"{url} is {int(expected_length)} bytes, over the limit of {max_bytes} bytes: raise "
                            f"{limits.DOWNLOAD_BYTES.variable} if this is the file you meant"
                        )
                    received = 0
                    total = int(expected_length) if expected_length is not None else expected_size
                    if progress is not None:
                        progress(0, total)
                    # read1 returns as soon as some bytes arrive, so a server that trickles a byte at a time
                    # still meets the deadline check between reads
                    read = getattr(response, "read1", response.read)
                    while True:
                        if time.monotonic() > deadline:
                            raise DownloadError(
                                f"the download of {url} ran past its deadline of {limits.DOWNLOAD_DEADLINE_S.value()} s "
                                f"({received} bytes received); nothing was kept. Raise "
                                f"{limits.DOWNLOAD_DEADLINE_S.variable} for a slow connection"
                            )
                        chunk = read(CHUNK_BYTES)
                        if not chunk:
                            break
                        if received + len(chunk) > max_bytes:
                            raise DownloadError(
                                f"{url} sent more than {max_bytes} bytes; nothing was kept. Raise "
                                f"{limits.DOWNLOAD_BYTES.variable} if this is the file you meant"
                            )
                        output.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        if progress is not None:
                            progress(received, total)
            except urllib.error.HTTPError as error:
                raise DownloadError(f"{url} answered {error.code} {error.reason}: check the address") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                reason = getattr(error, "reason", error)
                if isinstance(error, TimeoutError) or isinstance(reason, TimeoutError):
                    reason = f"nothing received for {stall_s:g} s"
                raise DownloadError(f"could not fetch {url} ({reason}): check the address and the network") from None
            except (http.client.HTTPException, ValueError, OSError) as error:
                if isinstance(error, DownloadError):
                    raise
                raise DownloadError(f"the download of {url} failed ({type(error).__name__}: {error})") from None
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
