"""Downloads from a hostile or broken server (on 127.0.0.1): bounded in size and time, nothing partial kept."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time

import pytest
from DeepSegModuleLib.download import DownloadError, download, file_name_of


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        route = self.path.split("?")[0]
        if route == "/ok.zip":
            body = b"PK" + b"x" * 1000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif route == "/huge":
            self.send_response(200)
            self.send_header("Content-Length", str(50 << 30))
            self.end_headers()
        elif route == "/endless":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(4096):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
        elif route == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif route == "/stall":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(3)
        elif route == "/broken":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
        else:
            self.send_error(404)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_a_good_download_is_verified_and_kept(server, tmp_path):
    body = b"PK" + b"x" * 1000
    seen = []
    path = download(f"{server}/ok.zip", tmp_path, expected_sha256=hashlib.sha256(body).hexdigest(),
                    progress=lambda received, total: seen.append((received, total)))  # fmt: skip
    assert path.read_bytes() == body and path.name == "ok.zip"
    # Progress from nothing to everything, against the size the server announced.
    assert seen[0] == (0, len(body)) and seen[-1] == (len(body), len(body))
    assert [received for received, _ in seen] == sorted(received for received, _ in seen)


@pytest.mark.parametrize(
    ("route", "environment", "message"),
    [
        ("/huge", {}, "over the limit"),
        ("/endless", {"DEEPSEG_MAX_DOWNLOAD_BYTES": str(1 << 20)}, "more than"),
        ("/trickle", {"DEEPSEG_DOWNLOAD_DEADLINE_S": "1"}, "deadline"),
        ("/stall", {"DEEPSEG_DOWNLOAD_STALL_S": "1"}, "nothing received"),
        ("/broken", {}, "broke off"),
        ("/missing", {}, "404"),
    ],
)
def test_hostile_servers_are_cut_off_and_nothing_is_kept(route, environment, message, server, tmp_path, monkeypatch):
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    with pytest.raises(DownloadError, match=message):
        download(f"{server}{route}", tmp_path)
    assert time.monotonic() - started < 10
    assert os.listdir(tmp_path) == []


def test_a_wrong_checksum_keeps_nothing(server, tmp_path):
    with pytest.raises(DownloadError, match="sha256"):
        download(f"{server}/ok.zip", tmp_path, expected_sha256="0" * 64)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("url", ["http://h/%2e%2e", "http://h/..%2f..%2fetc%2fpasswd", "http://h/a%00b.zip",
                                 "http://h/", "http://h/%2e%2e%2f"])  # fmt: skip
def test_url_file_names_are_made_safe(url):
    name = file_name_of(url)
    assert "/" not in name and not name.startswith(".") and "\0" not in name and name
