"""The download stage against a real HTTP server on 127.0.0.1 that serves small synthetic IDX files
well, or badly in each of the ways the stage must survive."""

import gzip
import hashlib
import http.server
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import ConfigError, from_section, load_config
from pipeline.data.download import MNIST_SHA256, DownloadConfig, DownloadError, download
from pipeline.stages.download import main

from servers import free_port
from synthetic import REAL_MNIST, write_mnist

ROOT = Path(__file__).resolve().parents[1]
NAMES = [f"{name}.gz" for name in MNIST_SHA256]
HTML = b"<!DOCTYPE html>\n<html><head><title>Moved</title></head><body>Sorry, this page moved.</body></html>\n"


class Mirror:
    """A ThreadingHTTPServer whose first path segment picks the behaviour: /<mode>[-label]/<file>.

    Modes: good (Content-Length, ETag, Range -> 206), missing (404), wrong (valid gzip of other
    bytes), html (an HTML page with status 200), truncated (the first half of the gzip, as if whole),
    drop (the first request for each file is cut off half-way; later ones honour Range), stall (the
    same, but it goes silent for a second before closing), error (always 503), silent (reads the
    request, then says nothing), paced-<rate>[-<seconds>] (the whole file announced, then <rate>
    bytes/s, every 20 ms what is due by then; silent after <seconds>, if given).
    Every request is recorded as (segment, file, headers, monotonic time).
    """

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str, dict, float]] = []
        self.stopping = threading.Event()  # ends any paced or silent answer still going
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                _, segment, name = self.path.split("/", 2)
                mirror.requests.append((segment, name, dict(self.headers), time.monotonic()))
                mirror.answer(self, segment, name)

            def log_message(self, *args):  # keep the test output quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, segment: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{segment}/"

    def count(self, segment: str) -> int:
        return sum(1 for s, *_ in self.requests if s == segment)

    def etag(self, name: str) -> str:
        return '"' + hashlib.sha256(self.files[name]).hexdigest()[:16] + '"'

    def answer(self, h: http.server.BaseHTTPRequestHandler, segment: str, name: str) -> None:
        mode, *label = segment.split("-")
        if name not in self.files or mode == "missing":
            return h.send_error(404)
        if mode == "error":
            return h.send_error(503)
        data = self.files[name]
        if mode == "html":
            return self.send(h, 200, HTML, "text/html; charset=utf-8")
        if mode == "wrong":
            return self.send(h, 200, gzip.compress(b"not mnist" + gzip.decompress(data)), "application/gzip")
        if mode == "truncated":
            return self.send(h, 200, data[: len(data) // 2], "application/gzip")
        if mode == "silent":
            self.stopping.wait(60)
            return
        if mode == "paced":
            return self.pace(h, data, float(label[0]), float(label[1]) if len(label) > 1 else None)
        first = sum(1 for s, n, *_ in self.requests if n == name and s.startswith(mode)) == 1
        if mode in ("drop", "stall") and first:
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.send_header("ETag", self.etag(name))
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            if mode == "stall":
                time.sleep(1.0)
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return
        start = 0
        wanted = h.headers.get("Range")
        if wanted and h.headers.get("If-Range") in (None, self.etag(name)):
            start = int(wanted.removeprefix("bytes=").removesuffix("-"))
        self.send(
            h,
            206 if start else 200,
            data[start:],
            "application/gzip",
            self.etag(name),
            f"bytes {start}-{len(data) - 1}/{len(data)}" if start else None,
        )

    def pace(self, h, data: bytes, rate: float, silent_after: float | None) -> None:
        """Send ``data`` at ``rate`` bytes/s: a late tick catches up, so any second has its share."""
        h.send_response(200)
        h.send_header("Content-Type", "application/gzip")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        began, sent = time.monotonic(), 0
        try:
            while sent < len(data) and not self.stopping.wait(0.02):
                elapsed = time.monotonic() - began
                if silent_after is not None and elapsed >= silent_after:
                    self.stopping.wait(60)
                    break
                due = min(len(data), int(rate * elapsed))
                h.wfile.write(data[sent:due])
                sent = due
        except OSError:  # the client gave up on us
            pass
        h.close_connection = True

    @staticmethod
    def send(h, status, body, content_type, etag=None, content_range=None):
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        if etag:
            h.send_header("ETag", etag)
        if content_range:
            h.send_header("Content-Range", content_range)
        h.end_headers()
        h.wfile.write(body)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The four files as small synthetic gzip IDX files: (directory, gz bytes by name, checksums)."""
    directory = tmp_path_factory.mktemp("synthetic")
    write_mnist(directory, n_train=20, n_test=10)
    files = {name: (directory / name).read_bytes() for name in NAMES}
    sums = {name.removesuffix(".gz"): hashlib.sha256(gzip.decompress(data)).hexdigest() for name, data in files.items()}
    return directory, files, sums


@pytest.fixture
def mirror(synthetic):
    server = Mirror(synthetic[1])
    yield server
    server.stopping.set()
    server.server.shutdown()
    server.server.server_close()


def config(*mirrors, sha256=None, retries=2, timeout=5.0, deadline=300.0, backoff=0.0, min_rate=1024.0):
    sha256 = sha256 or MNIST_SHA256
    return DownloadConfig(
        mirrors=list(mirrors),
        timeout=timeout,
        min_rate=min_rate,
        deadline=deadline,
        retries=retries,
        backoff=backoff,
        sha256=sha256,
    )


def skips(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]


def fetch(tmp_path, synthetic, caplog, *mirrors, **settings) -> dict:
    """Download the synthetic files from ``mirrors`` with ``settings``, capturing the warnings."""
    with caplog.at_level(logging.WARNING, logger="pipeline.data.download"):
        return download(config=config(*mirrors, sha256=synthetic[2], **settings), out_dir=tmp_path, progress=False)


def seconds_to_give_up(mirror, segment: str, skip: str, caplog) -> float:
    """From the server's receiving the one request of ``segment`` to the client's warning ``skip``
    (less a little: the server notes the request after the client's clock started)."""
    (asked,) = [t for s, *_, t in mirror.requests if s == segment]
    (given_up,) = [r.created for r in caplog.records if r.getMessage() == skip]
    return given_up - (time.time() - time.monotonic() + asked)


def assert_verified(out_dir: Path, synthetic):
    """Every file is in place with the original content, and nothing else (no .part) is left."""
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(NAMES)
    for name, data in synthetic[1].items():
        assert gzip.decompress((out_dir / name).read_bytes()) == gzip.decompress(data)


@pytest.mark.parametrize("slash", ["/", ""])
def test_good_mirror(tmp_path, synthetic, mirror, slash):
    url = mirror.url("good").rstrip("/") + slash
    summary = download(config=config(url, sha256=synthetic[2]), out_dir=tmp_path / "raw", progress=False)
    assert_verified(tmp_path / "raw", synthetic)
    assert summary["files"] == {name: mirror.url("good") + name for name in NAMES}
    assert [name for _, name, *_ in mirror.requests] == NAMES


@pytest.mark.parametrize(
    "mode, why",
    [
        ("missing", "HTTP 404"),
        ("wrong", "wrong content: the decompressed sha256 is"),
        ("html", "served an HTML page (Content-Type text/html"),
        ("truncated", "truncated gzip"),
        ("error", "HTTP 503 Service Unavailable (gave up after 2 retries)"),
    ],
)
def test_bad_mirror_is_skipped_with_a_warning(tmp_path, synthetic, mirror, caplog, mode, why):
    with caplog.at_level(logging.WARNING, logger="pipeline.data.download"):
        summary = download(
            config=config(mirror.url(mode), mirror.url("good"), sha256=synthetic[2]), out_dir=tmp_path, progress=False
        )
    assert_verified(tmp_path, synthetic)
    assert set(summary["files"].values()) == {mirror.url("good") + name for name in NAMES}
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(skips) == len(NAMES)
    for name, skip in zip(NAMES, skips):
        assert skip.startswith(f"skipping mirror {mirror.url(mode)}{name}: ") and why in skip, skip
    # transient errors are retried (2 retries: 3 requests per file); the others are given up at once
    assert mirror.count(mode) == (3 if mode == "error" else 1) * len(NAMES)


@pytest.mark.parametrize("mode, why", [("drop", "connection closed after"), ("stall", "timed out")])
def test_dropped_or_stalled_connection_is_resumed_with_range(tmp_path, synthetic, mirror, caplog, mode, why):
    with caplog.at_level(logging.WARNING, logger="pipeline.data.download"):
        download(config=config(mirror.url(mode), timeout=0.2, sha256=synthetic[2]), out_dir=tmp_path, progress=False)
    assert_verified(tmp_path, synthetic)
    for name in NAMES:
        first, second = [headers for _, n, headers, _ in mirror.requests if n == name]
        assert "Range" not in first
        half = len(synthetic[1][name]) // 2
        assert second["Range"] == f"bytes={half}-"
        assert second["If-Range"] == mirror.etag(name)
    retries = [r.getMessage() for r in caplog.records if "retry 1 of 2" in r.getMessage()]
    assert len(retries) == len(NAMES) and all(why in message for message in retries), retries


def test_trickling_mirror_is_abandoned_at_the_deadline_for_the_next(tmp_path, synthetic, mirror, caplog):
    """320 bytes/s never trips the 5 s read timeout; the 0.5 s deadline moves on to the next mirror."""
    assert len(synthetic[1][NAMES[0]]) > 320 * 2  # the whole file would take over 2 s to trickle
    began = time.monotonic()
    summary = fetch(tmp_path, synthetic, caplog, mirror.url("paced-320"), mirror.url("good"), timeout=5.0, deadline=0.5)
    assert time.monotonic() - began < 2.0
    assert_verified(tmp_path, synthetic)
    assert set(summary["files"].values()) == {mirror.url("good") + name for name in NAMES}
    assert len(skips(caplog)) == 1, skips(caplog)  # abandoned once, then not tried again for the other files
    size = len(synthetic[1][NAMES[0]])
    assert re.fullmatch(
        rf"skipping mirror {re.escape(mirror.url('paced-320') + NAMES[0])}: too slow: \d+ of {size} bytes "
        r"after download.deadline=0.5 s; abandoned",
        skips(caplog)[0],
    ), skips(caplog)[0]
    assert mirror.count("paced-320") == 1


def test_a_mirror_under_the_rate_floor_is_abandoned_after_the_speed_time(tmp_path, synthetic, mirror, caplog):
    """curl's --speed-limit 4000 --speed-time 1: a mirror at 3,000 bytes/s goes after 1 s, not at the
    30 s deadline, for this file and the others, and the next mirror gives them all."""
    slow = mirror.url("paced-3000")
    summary = fetch(tmp_path, synthetic, caplog, slow, mirror.url("good"), timeout=1.0, min_rate=4000, deadline=30.0)
    assert_verified(tmp_path, synthetic)
    assert set(summary["files"].values()) == {mirror.url("good") + name for name in NAMES}
    (skip,) = skips(caplog)
    match = re.fullmatch(
        rf"skipping mirror {re.escape(slow + NAMES[0])}: too slow: (\d+) bytes in the last (\S+) s, under "
        r"download.min_rate=4000 bytes/s for download.timeout=1 s; abandoned",
        skip,
    )
    assert match, skip
    received, window = int(match[1]), float(match[2])
    assert 1.0 <= window < 1.5 and received < 4000 * window
    # abandoned at about the speed-time after its request, measured here from the server's side
    assert 0.9 <= seconds_to_give_up(mirror, "paced-3000", skip, caplog) < 2.0
    assert mirror.count("paced-3000") == 1


def test_a_mirror_just_above_the_rate_floor_is_kept(tmp_path, synthetic, mirror, caplog):
    """5,000 bytes/s against a floor of 4,000 over 1 s windows: slow, but never too slow."""
    paced = mirror.url("paced-5000")
    began = time.monotonic()
    summary = fetch(tmp_path, synthetic, caplog, paced, mirror.url("good"), timeout=1.0, min_rate=4000, deadline=30.0)
    assert_verified(tmp_path, synthetic)
    assert summary["files"] == {name: paced + name for name in NAMES}
    assert caplog.records == [] and mirror.count("good") == 0
    # the largest file alone took over two windows at this rate: the floor was checked, and held
    assert len(synthetic[1][NAMES[0]]) > 2 * 5000
    assert time.monotonic() - began >= sum(map(len, synthetic[1].values())) / 5000


@pytest.mark.parametrize("mode", ["silent", "paced-5000-0.8"], ids=["says-nothing", "goes-silent-mid-file"])
def test_a_stalled_read_longer_than_the_time_left_ends_at_the_deadline(tmp_path, synthetic, mirror, caplog, mode):
    """download.timeout 10 s, download.deadline 1.5 s: a read waits only for the time left. A mirror
    that says nothing, or that goes silent 0.8 s into the file (after its connection's timeout was set),
    is abandoned at 1.5 s, not at 10 s (nor at 0.8 + 1.5 s)."""
    stalled = mirror.url(mode)
    summary = fetch(tmp_path, synthetic, caplog, stalled, mirror.url("good"), timeout=10.0, deadline=1.5)
    assert_verified(tmp_path, synthetic)
    assert set(summary["files"].values()) == {mirror.url("good") + name for name in NAMES}
    (skip,) = skips(caplog)
    size = len(synthetic[1][NAMES[0]])
    have = r"0" if mode == "silent" else rf"\d+ of {size}"
    assert re.fullmatch(
        rf"skipping mirror {re.escape(stalled + NAMES[0])}: too slow: {have} bytes "
        r"after download.deadline=1.5 s; abandoned",
        skip,
    ), skip
    assert 1.4 <= seconds_to_give_up(mirror, mode, skip, caplog) < 2.2


@pytest.fixture
def waits(monkeypatch):
    """The seconds each time.sleep of the test's own thread asks for; it still sleeps them."""
    asked = []
    sleep = time.sleep
    caller = threading.current_thread()

    def recorded(seconds):
        if threading.current_thread() is caller:
            asked.append(seconds)
        sleep(seconds)

    monkeypatch.setattr(time, "sleep", recorded)
    return asked


def test_retries_wait_twice_as_long_each_time(tmp_path, synthetic, mirror, waits):
    """download.backoff 0.05 s, 3 retries: before each file's retries, 0.05, 0.1, 0.2 s, as the server saw."""
    download(
        config=config(mirror.url("error"), mirror.url("good"), retries=3, backoff=0.05, sha256=synthetic[2]),
        out_dir=tmp_path,
        progress=False,
    )
    assert_verified(tmp_path, synthetic)
    assert waits == [0.05, 0.1, 0.2] * len(NAMES)
    for name in NAMES:
        times = [t for s, n, _, t in mirror.requests if s == "error" and n == name]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert len(gaps) == 3 and all(gap >= wait for gap, wait in zip(gaps, [0.05, 0.1, 0.2])), gaps


def test_a_retry_wait_is_cut_short_by_the_deadline(tmp_path, synthetic, mirror, waits, caplog):
    """download.backoff 0.2 s, download.deadline 0.3 s: the second wait (0.4 s) is cut to what is left."""
    fetch(tmp_path, synthetic, caplog, mirror.url("error"), mirror.url("good"), retries=3, backoff=0.2, deadline=0.3)
    assert_verified(tmp_path, synthetic)
    first, second = waits
    assert first == 0.2 and 0 < second <= 0.1
    assert skips(caplog)[0].endswith("too slow: 0 bytes after download.deadline=0.3 s; abandoned")
    assert mirror.count("error") == 2  # no third request: the deadline had passed


def test_every_mirror_bad_lists_them_all_and_leaves_nothing(tmp_path, synthetic, mirror):
    refused = f"http://127.0.0.1:{free_port()}/mnist"  # nobody listens: connection refused
    # the last mirror's bad bytes were written to a .part before verification failed
    modes = ["missing", "html", "error", "wrong", "truncated"]
    mirrors = [refused, str(tmp_path / "no-such-dir")] + [mirror.url(m) for m in modes]
    out_dir = tmp_path / "raw"
    with pytest.raises(DownloadError) as error:
        download(config=config(*mirrors, retries=1, sha256=synthetic[2]), out_dir=out_dir, progress=False)
    lines = str(error.value).splitlines()
    assert lines[0] == f"no mirror gave a verified {NAMES[0]}; tried:"
    expected = [
        (f"{refused}/{NAMES[0]}", "cannot connect"),
        (str(tmp_path / "no-such-dir" / NAMES[0]), "no such directory"),
        (mirror.url("missing") + NAMES[0], "HTTP 404"),
        (mirror.url("html") + NAMES[0], "HTML page"),
        (mirror.url("error") + NAMES[0], "HTTP 503"),
        (mirror.url("wrong") + NAMES[0], "decompressed sha256"),
        (mirror.url("truncated") + NAMES[0], "truncated gzip"),
    ]
    for line, (where, why) in zip(lines[1:], expected, strict=False):
        assert line.startswith(f"  {where}: ") and why in line, (line, where, why)
    assert len(lines) == 1 + len(expected) + 1  # and a hint about MNIST_MIRROR
    assert list(out_dir.iterdir()) == []


def test_unreachable_mirror_is_not_tried_for_the_other_files(tmp_path, synthetic, mirror, caplog):
    refused = f"http://127.0.0.1:{free_port()}/"
    with caplog.at_level(logging.WARNING, logger="pipeline.data.download"):
        download(config=config(refused, mirror.url("good"), sha256=synthetic[2]), out_dir=tmp_path, progress=False)
    assert_verified(tmp_path, synthetic)
    assert [r.getMessage() for r in caplog.records if refused in r.getMessage()] == [
        f"skipping mirror {refused}{NAMES[0]}: cannot connect ([Errno 111] Connection refused)"
    ]


def test_mnist_mirror_is_tried_first(tmp_path, synthetic, mirror, monkeypatch):
    params = tmp_path / "params.yaml"
    section = {"mirrors": [mirror.url("good-configured")], "backoff": 0, "sha256": synthetic[2]}
    params.write_text(yaml.safe_dump({"download": section}))
    monkeypatch.setenv("MNIST_MIRROR", mirror.url("good-env"))
    assert main(["--out", str(tmp_path / "raw"), "--params", str(params)]) == 0
    assert_verified(tmp_path / "raw", synthetic)
    assert (mirror.count("good-env"), mirror.count("good-configured")) == (len(NAMES), 0)


def test_bad_mnist_mirror_is_refused_naming_the_variable(tmp_path, monkeypatch, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("download:\n  mirrors: [/nowhere]\n")
    monkeypatch.setenv("MNIST_MIRROR", "ftp://example.org/mnist")
    assert main(["--out", str(tmp_path / "raw"), "--params", str(params)]) == 1
    assert "error: Got MNIST_MIRROR='ftp://example.org/mnist': unknown scheme" in capsys.readouterr().err


def test_present_files_are_not_fetched_again(tmp_path, synthetic, mirror, caplog):
    download(config=config(mirror.url("good"), sha256=synthetic[2]), out_dir=tmp_path, progress=False)
    mirror.requests.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.data.download"):
        summary = download(config=config(mirror.url("good"), sha256=synthetic[2]), out_dir=tmp_path, progress=False)
    assert mirror.requests == []
    assert summary["files"] == {name: "already present" for name in NAMES}
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / name}: already present and verified" for name in NAMES
    ]

    # a damaged file is fetched again, and only that one
    (tmp_path / NAMES[1]).write_bytes(gzip.compress(b"damaged"))
    download(config=config(mirror.url("good"), sha256=synthetic[2]), out_dir=tmp_path, progress=False)
    assert [name for _, name, *_ in mirror.requests] == [NAMES[1]]
    assert_verified(tmp_path, synthetic)


@pytest.mark.parametrize("form", ["absolute", "relative", "file-url"])
def test_local_directory_and_file_url_mirrors(tmp_path, synthetic, monkeypatch, form):
    directory = synthetic[0]
    monkeypatch.chdir(directory.parent)
    local = {"absolute": str(directory), "relative": directory.name, "file-url": directory.as_uri()}[form]
    summary = download(
        config=config("/no/such/dir", local, sha256=synthetic[2]), out_dir=tmp_path / "raw", progress=False
    )
    assert_verified(tmp_path / "raw", synthetic)
    assert summary["files"] == {name: str(directory / name) for name in NAMES}


@pytest.mark.parametrize(
    "section, message",
    [
        (
            {"mirrors": ["ftp://example.org/mnist/"]},
            r"Got download.mirrors\[0\]='ftp://example.org/mnist/': unknown scheme",
        ),
        ({"mirrors": ["/data", "s3://bucket/mnist"]}, r"Got download.mirrors\[1\]='s3://bucket/mnist': unknown scheme"),
        (
            {"mirrors": ["file://host/data"]},
            r"Got download.mirrors\[0\]='file://host/data': a file:// URL needs an absolute path",
        ),
        ({"mirrors": []}, r"Got download.mirrors=\[\]: list at least one mirror"),
        ({"mirrors": ["/data"], "retries": -1}, r"Got download.retries=-1: must be 0 or more"),
        ({"mirrors": ["/data"], "timeout": 0}, r"Got download.timeout=0.0: must be positive"),
        ({"mirrors": ["/data"], "min_rate": -0.5}, r"Got download.min_rate=-0.5: must be 0 \(off\) or more \(bytes"),
        ({"mirrors": ["/data"], "min_rate": "1k"}, r"Got download.min_rate='1k': expected a number"),
        ({"mirrors": ["/data"], "deadline": -1}, r"Got download.deadline=-1.0: must be positive \(seconds per file"),
        ({"mirrors": ["/data"], "deadline": "1h"}, r"Got download.deadline='1h': expected a number"),
        ({"mirrors": ["/data"], "backoff": "soon"}, r"Got download.backoff='soon': expected a number"),
        ({"mirrors": "/data"}, r"Got download.mirrors='/data': expected a list"),
        (
            {"mirrors": ["/data"], "sha256": {"train-images-idx3-ubyte": "ab"}},
            r"Got download.sha256=\{'train-images-idx3-ubyte': 'ab'\}: expected the keys",
        ),
        (
            {"mirrors": ["/data"], "sha256": dict(MNIST_SHA256, **{"t10k-labels-idx1-ubyte": "XYZ"})},
            r"Got download.sha256.t10k-labels-idx1-ubyte='XYZ': expected 64",
        ),
    ],
)
def test_bad_params_name_key_and_value(section, message):
    with pytest.raises(ConfigError, match=message):
        from_section(DownloadConfig, {"download": section}, "download", source="params.yaml")


def test_no_rate_floor_is_the_edge_of_download_min_rate():
    assert from_section(DownloadConfig, {"download": {"mirrors": ["/data"], "min_rate": 0}}, "download").min_rate == 0


def test_repository_params_are_valid():
    settings = load_config(DownloadConfig, "download", ROOT / "params.yaml")
    assert settings.mirrors and settings.sha256 == MNIST_SHA256
    written = yaml.safe_load((ROOT / "params.yaml").read_text())["download"]
    assert {key: written[key] for key in ("timeout", "min_rate", "deadline", "retries", "backoff")} == {
        "timeout": 30.0,
        "min_rate": 1024,
        "deadline": 300.0,
        "retries": 3,
        "backoff": 1.0,
    }
    defaults = DownloadConfig(mirrors=["/data"])  # what a params.yaml without them gets: the same
    assert (defaults.timeout, defaults.min_rate, defaults.deadline, defaults.retries, defaults.backoff) == (
        settings.timeout,
        settings.min_rate,
        settings.deadline,
        settings.retries,
        settings.backoff,
    )


def test_help():
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "download", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "MNIST_MIRROR=$PWD/../shared/data/mnist dvc repro" in result.stdout and "--out" in result.stdout


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason=f"no local copy of MNIST at {REAL_MNIST}")
def test_real_mnist_from_the_shared_copy(tmp_path):
    summary = download(config=config(str(REAL_MNIST)), out_dir=tmp_path, progress=False)
    assert summary["files"] == {name: str(REAL_MNIST.resolve() / name) for name in NAMES}
    for name, digest in MNIST_SHA256.items():
        assert hashlib.sha256(gzip.decompress((tmp_path / f"{name}.gz").read_bytes())).hexdigest() == digest
