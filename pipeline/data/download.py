"""Fetch the four MNIST files into a directory, verified by the sha256 of their decompressed bytes.

Mirrors are tried in order: first $MNIST_MIRROR if it is set, then download.mirrors in params.yaml.
A mirror is an http:// or https:// URL, a file:// URL, or a local directory holding the four
*-ubyte.gz files. A mirror that fails for a file (an HTTP error, an HTML page, wrong or truncated
bytes) is skipped with a warning naming it, and the next one is tried. Dropped connections,
timeouts (download.timeout seconds without a byte) and 5xx answers are retried download.retries
times with exponential backoff, resuming where they stopped (HTTP Range). Two limits abandon a slow
mirror with a warning, for that file and the ones after it: a connection that has averaged under
download.min_rate bytes/s over the last download.timeout seconds (curl's --speed-limit and
--speed-time), and a file not delivered within download.deadline seconds (retries included), so a
mirror trickling bytes cannot hold the stage for long. Files already present and verified are not
fetched again.

Offline, point MNIST_MIRROR at a local copy of the files. A relative path is taken from the
current directory; an absolute path is safest, since `dvc exp run --temp` runs in a copy:

    MNIST_MIRROR=$PWD/../shared/data/mnist dvc repro
    MNIST_MIRROR=file:///data/mnist python -m pipeline download

download.sha256 (file name without .gz -> sha256 of the decompressed bytes) defaults to the real
MNIST sums; tests set it to run the pipeline on small synthetic files.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.core.config import PipelineError, require
from pipeline.core.files import make_dir
from pipeline.data.slow import Deadline, MirrorFailed, RateFloor

log = logging.getLogger(__name__)

# sha256 of the *decompressed* files (../shared/data/mnist/SHA256SUMS). Mirrors re-compress, so
# the .gz bytes differ between mirrors; the content does not. Each is fetched as <name>.gz.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
CHUNK = 1 << 16
GZIP_MAGIC = b"\x1f\x8b"
# Worth another try on the same mirror: the connection broke or stalled mid-way.
TRANSIENT = (TimeoutError, ConnectionResetError, ConnectionAbortedError, http.client.HTTPException)


class DownloadError(PipelineError):
    """No mirror gave a verified copy of a file."""


def check_mirror(key: str, mirror: str) -> None:
    """Refuse a mirror that is neither an http(s):// or file:// URL nor a directory path."""
    require(isinstance(mirror, str) and mirror.strip() != "", key, mirror, "expected a URL or a directory")
    if "://" not in mirror:  # a local directory; whether it holds the files is found out when it is used
        require("\0" not in mirror, key, mirror, "not a usable path (it holds a NUL byte)")
        try:
            Path(mirror).expanduser()
        except RuntimeError as e:  # ~user of no such user
            require(False, key, mirror, f"not a usable path ({e})")
        return
    try:
        parts = urllib.parse.urlsplit(mirror)
        parts.port  # noqa: B018  (read for its check: a port that is no number 0-65535 raises)
    except ValueError as e:
        require(False, key, mirror, f"not a valid URL ({e})")
    require(
        parts.scheme in ("http", "https", "file"),
        key,
        mirror,
        "unknown scheme; expected http://, https://, file:// or a local directory",
    )
    if parts.scheme == "file":
        require(parts.netloc in ("", "localhost"), key, mirror, "a file:// URL needs an absolute path: file:///dir")
    else:
        require(parts.netloc != "", key, mirror, "the URL has no host")


@dataclass(frozen=True)
class DownloadConfig:
    mirrors: list[str]
    timeout: float = 30.0
    min_rate: float = 1024.0
    deadline: float = 300.0
    retries: int = 3
    backoff: float = 1.0
    sha256: dict[str, str] = field(default_factory=lambda: dict(MNIST_SHA256))

    def __post_init__(self):
        require(len(self.mirrors) > 0, "download.mirrors", self.mirrors, "list at least one mirror")
        for i, mirror in enumerate(self.mirrors):
            check_mirror(f"download.mirrors[{i}]", mirror)
        require(self.timeout > 0, "download.timeout", self.timeout, "must be positive (seconds)")
        require(self.min_rate >= 0, "download.min_rate", self.min_rate, "must be 0 (off) or more (bytes per second)")
        require(self.deadline > 0, "download.deadline", self.deadline, "must be positive (seconds per file and mirror)")
        require(self.retries >= 0, "download.retries", self.retries, "must be 0 or more")
        require(self.backoff >= 0, "download.backoff", self.backoff, "must be 0 or more (seconds)")
        require(
            sorted(self.sha256) == sorted(MNIST_SHA256),
            "download.sha256",
            self.sha256,
            f"expected the keys {', '.join(MNIST_SHA256)}",
        )
        for name, digest in self.sha256.items():
            ok = isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) is not None
            require(ok, f"download.sha256.{name}", digest, "expected 64 lowercase hex digits")


def source(mirror: str, filename: str) -> str | Path:
    """Where ``filename`` is on ``mirror``: a URL for http(s), a local path otherwise."""
    if "://" not in mirror:
        return Path(mirror).expanduser().resolve() / filename
    parts = urllib.parse.urlsplit(mirror)
    if parts.scheme == "file":
        return Path(urllib.request.url2pathname(parts.path)) / filename
    return mirror.rstrip("/") + "/" + filename  # urljoin would drop the last segment without a '/'


def verify(path: Path, sha256: str) -> str | None:
    """Why ``path`` is not a gzip file whose decompressed bytes have ``sha256``; None when it is."""
    digest = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):  # streamed: never the whole decompressed file in memory
                digest.update(chunk)
    except EOFError:
        return "truncated gzip (the compressed stream ends early)"
    except (gzip.BadGzipFile, zlib.error) as e:
        return f"not a valid gzip file ({e})"
    if digest.hexdigest() != sha256:
        return f"wrong content: the decompressed sha256 is {digest.hexdigest()}, expected {sha256}"
    return None


def copy_local(path: Path, part: Path, bar: tqdm) -> None:
    """Copy a file from a local-directory or file:// mirror."""
    try:  # a path the system refuses outright (too long a name) is a bad mirror like any other
        if not path.parent.is_dir():
            raise MirrorFailed(f"no such directory {path.parent}")
        if not path.is_file():
            raise MirrorFailed(f"no such file {path}")
    except OSError as e:
        raise MirrorFailed(f"cannot use the path: {e.strerror}") from None
    bar.reset(total=path.stat().st_size)
    try:
        with path.open("rb") as src, part.open("wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
                bar.update(len(chunk))
    except OSError as e:
        raise MirrorFailed(f"cannot copy: {e}") from None


def resumed_from(response: http.client.HTTPResponse, have: int) -> int:
    """The byte offset ``response`` starts at: ``have`` for a matching 206, 0 for a full 200."""
    if response.status != 206:
        return 0  # the server ignored the Range, or If-Range saw a changed file: start over
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
    if not match or int(match.group(1)) != have:
        raise MirrorFailed(f"asked for bytes {have}- but got Content-Range {response.headers.get('Content-Range')!r}")
    return have


def check_gzip(response: http.client.HTTPResponse, first: bytes) -> None:
    """Refuse a body whose ``first`` bytes are not gzip's (an HTML page, most often)."""
    if not GZIP_MAGIC.startswith(first[:2]):
        kind = response.headers.get_content_type()
        what = "an HTML page" if "html" in kind or b"<html" in first[:1024].lower() else "not gzip data"
        raise MirrorFailed(f"served {what} (Content-Type {kind}, starting {first[:40]!r})")


def arriving(response: http.client.HTTPResponse, have: int, total: int | None, timeout: float, deadline: Deadline):
    """The chunks of ``response``'s body as they arrive (``have`` bytes of ``total`` before them). A read
    waits download.timeout for data, never past ``deadline``: passing it raises MirrorFailed."""
    # http.client keeps the socket only inside its file object
    sock = response.fp.raw._sock
    while True:
        sock.settimeout(deadline.read_timeout(timeout))
        try:
            # read1: whatever has arrived, so a stall or a reset loses nothing already received
            chunk = response.read1(CHUNK)
        except TimeoutError:
            deadline.check(have, total)  # cut short by the deadline, not by a stall
            raise
        if not chunk:
            return
        yield chunk
        have += len(chunk)
        deadline.check(have, total)


def receive(
    response: http.client.HTTPResponse, part: Path, start: int, bar: tqdm, config: DownloadConfig, deadline: Deadline
) -> None:
    """Write the body of ``response`` into ``part`` from byte ``start`` (appending when resumed).

    Past ``deadline``, or below download.min_rate, it stops with MirrorFailed."""
    length = response.headers.get("Content-Length")
    total = start + int(length) if length else None
    bar.reset(total=total)
    bar.update(start)
    received = 0
    floor = RateFloor(config.min_rate, config.timeout)
    with part.open("ab" if start else "wb") as f:
        for chunk in arriving(response, start, total, config.timeout, deadline):
            if start + received == 0:
                check_gzip(response, chunk)
            f.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
            floor.check(received)
    # http.client returns b"" rather than raising when the connection closes early
    if total is not None and start + received < total:
        raise ConnectionResetError(f"connection closed after {start + received} of {total} bytes")


def fetch_http(url: str, part: Path, config: DownloadConfig, bar: tqdm) -> None:
    """Download ``url`` into ``part``, retrying transient failures and resuming with HTTP Range."""
    validator = None  # ETag or Last-Modified: If-Range makes a resume come from the same file
    answered = False
    why = ""
    deadline = Deadline(config.deadline)  # for this file from this mirror, retries included
    for attempt in range(config.retries + 1):
        have = part.stat().st_size if part.exists() else 0
        if attempt:
            deadline.check(have)
            delay = config.backoff * 2 ** (attempt - 1)
            log.warning("%s: %s; retry %d of %d in %.1f s from byte %d", url, why, attempt, config.retries, delay, have)
            time.sleep(min(delay, max(deadline.left(), 0)))
        deadline.check(have)
        headers = {"User-Agent": "nndl-pipeline (python urllib)", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
            if validator:
                headers["If-Range"] = validator
        try:
            request = urllib.request.Request(url, headers=headers)
            # no single read may wait past the deadline either
            with urllib.request.urlopen(request, timeout=deadline.read_timeout(config.timeout)) as response:
                answered = True
                start = resumed_from(response, have)
                etag = response.headers.get("ETag")
                validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
                receive(response, part, start, bar, config, deadline)
            return
        except urllib.error.HTTPError as e:
            answered = True
            why = f"HTTP {e.code} {e.reason}"
            e.close()
            if e.code < 500 and e.code not in (408, 429):
                raise MirrorFailed(why) from None
        except urllib.error.URLError as e:  # no answer: DNS, refused, TLS, or a connect timeout
            why = f"cannot connect ({e.reason})"
            if not isinstance(e.reason, TRANSIENT):
                raise MirrorFailed(why, unreachable=not answered) from None
        except TRANSIENT as e:
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        except OSError as e:
            raise MirrorFailed(f"{type(e).__name__}: {e}") from None
    deadline.check(part.stat().st_size if part.exists() else 0)
    raise MirrorFailed(f"{why} (gave up after {config.retries} retries)", unreachable=not answered)


def fetch_one(
    name: str,
    sha256: str,
    mirrors: list[str],
    out_dir: Path,
    config: DownloadConfig,
    progress: bool,
    unreachable: dict[str, str],
) -> str:
    """Fetch ``name``.gz from the first mirror that gives verified bytes; return where it came from."""
    filename = f"{name}.gz"
    part = out_dir / f"{filename}.part"
    failures = []
    for mirror in mirrors:
        where = source(mirror, filename)
        if mirror in unreachable:
            failures.append(f"{where}: {unreachable[mirror]} (for an earlier file; not tried again)")
            continue
        part.unlink(missing_ok=True)  # never resume another mirror's bytes: each compresses differently
        try:
            with tqdm(desc=filename, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress) as bar:
                if isinstance(where, Path):
                    copy_local(where, part, bar)
                else:
                    fetch_http(where, part, config, bar)
            why = verify(part, sha256)
            if why:
                raise MirrorFailed(why)
            os.replace(part, out_dir / filename)
            return str(where)
        except MirrorFailed as e:
            log.warning("skipping mirror %s: %s", where, e)
            failures.append(f"{where}: {e}")
            if e.unreachable:
                unreachable[mirror] = str(e)
        finally:
            part.unlink(missing_ok=True)
    lines = "\n".join(f"  {failure}" for failure in failures)
    raise DownloadError(
        f"no mirror gave a verified {filename}; tried:\n{lines}\n"
        "Offline? Set MNIST_MIRROR to a directory holding the four files."
    )


def download(*, config: DownloadConfig, out_dir: Path, env_mirror: str | None = None, progress: bool = True) -> dict:
    """Fetch ``<name>.gz`` for each name in ``config.sha256`` into ``out_dir``, trying ``env_mirror`` first.

    Returns ``{"out_dir": ..., "files": {filename: where it came from, or "already present"}}``.
    """
    mirrors = list(config.mirrors)
    if env_mirror:
        check_mirror("MNIST_MIRROR", env_mirror)
        mirrors.insert(0, env_mirror)
    out_dir = Path(out_dir)
    make_dir(out_dir)
    unreachable: dict[str, str] = {}
    files = {}
    for name, sha256 in config.sha256.items():
        path = out_dir / f"{name}.gz"
        if path.exists():
            why = verify(path, sha256)
            if why is None:
                log.info("%s: already present and verified", path)
                files[path.name] = "already present"
                continue
            log.warning("%s is present but %s; fetching it again", path, why)
            path.unlink()
        files[path.name] = fetch_one(name, sha256, mirrors, out_dir, config, progress, unreachable)
        log.info("%s: verified, from %s", path, files[path.name])
    return {"out_dir": str(out_dir), "files": files}
