"""The limits on a slow mirror: download.deadline for a file, download.min_rate over download.timeout
for a connection. Past either, the mirror is abandoned for that file and the ones after it."""

from __future__ import annotations

import time
from collections import deque


class MirrorFailed(Exception):
    """This mirror cannot give this file. ``unreachable``: it never answered, or it was too slow (past
    download.deadline, or under download.min_rate), so skip it for the other files too."""

    def __init__(self, why: str, unreachable: bool = False):
        super().__init__(why)
        self.unreachable = unreachable


class Deadline:
    """The moment, ``seconds`` from now, after which a mirror is abandoned for being too slow."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        return self.at - time.monotonic()

    def check(self, have: int, total: int | None = None) -> None:
        """Raise MirrorFailed (abandoning the mirror for the later files too) once the deadline has passed."""
        if self.left() <= 0:
            of = f" of {total}" if total is not None else ""
            raise MirrorFailed(
                f"too slow: {have}{of} bytes after download.deadline={self.seconds:g} s; abandoned", unreachable=True
            )

    def read_timeout(self, timeout: float) -> float:
        """How long one read may wait: ``timeout`` (download.timeout), but never past the deadline."""
        return max(min(timeout, self.left()), 0.001)


class RateFloor:
    """curl's --speed-limit and --speed-time: a connection that has averaged under ``rate`` bytes/s
    over the last ``seconds`` is too slow. A silent one is left to the read timeout (and retried)."""

    def __init__(self, rate: float, seconds: float):
        self.rate = rate
        self.seconds = seconds
        # (when, bytes received by then), one every seconds/16 at most: the starts a window can have
        self.marks = deque([(time.monotonic(), 0)])

    def check(self, received: int) -> None:
        """Raise MirrorFailed (abandoning the mirror for the later files too) once the rate stayed under the floor."""
        now = time.monotonic()
        while len(self.marks) > 1 and now - self.marks[1][0] >= self.seconds:
            self.marks.popleft()  # the window starts at the newest mark at least ``seconds`` old
        since, then = self.marks[0]
        if now - since >= self.seconds and received - then < self.rate * (now - since):
            raise MirrorFailed(
                f"too slow: {received - then} bytes in the last {now - since:.1f} s, under "
                f"download.min_rate={self.rate:g} bytes/s for download.timeout={self.seconds:g} s; abandoned",
                unreachable=True,
            )
        if now - self.marks[-1][0] >= self.seconds / 16:
            self.marks.append((now, received))
