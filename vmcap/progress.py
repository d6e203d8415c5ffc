"""Progress on stderr: a bar on a terminal, bounded plain lines anywhere else.

kdump scripts send the collector's stderr to a serial console or the
journal, not a terminal. There, makedumpfile-style lines are what is read;
a line costs about 9 ms at 115200 baud and a capture must not flood the
console, so a phase prints at most one line per ``min_seconds`` and per
``step_percent``, plus its first and last line: at most about 22 lines a
phase whatever the dump size.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, TextIO

MODES = ("auto", "bar", "lines", "none")

Reporter = Callable[[int, int, str], None]


def human_bytes(n: float) -> str:
    """A byte count in binary units (B, KiB, MiB, GiB, TiB), as every vmcap message gives it."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class LineProgress:
    """Plain progress lines, rate-limited by time and by percentage."""

    def __init__(self, stream: TextIO, *, min_seconds: float = 3.0, step_percent: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.min_seconds = min_seconds
        self.step_percent = step_percent
        self.clock = clock
        self.phase: str | None = None
        self.lines = 0

    def _start(self, phase: str, total: int) -> None:
        self.finish()
        self.phase, self.total, self.done = phase, total, 0
        self.started = self.clock()
        self.last_time = self.started
        self.last_percent = 0.0
        self._print(0.0)

    def __call__(self, n: int, total: int, phase: str) -> None:
        if phase != self.phase:
            self._start(phase, total)
        self.done += n
        if self.done >= self.total:
            return  # the last line comes from finish(), once
        percent = 100.0 * self.done / self.total if self.total else 100.0
        now = self.clock()
        if (percent - self.last_percent >= self.step_percent
                and now - self.last_time >= self.min_seconds):
            self.last_time, self.last_percent = now, percent
            self._print(percent)

    def finish(self) -> None:
        """The phase's 100 % line (called at a phase change and at the end)."""
        if self.phase is not None and self.done >= self.total:
            self._print(100.0)
        self.phase = None

    def _print(self, percent: float) -> None:
        elapsed = self.clock() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if percent >= 100.0:
            tail = f"done in {_duration(elapsed)}"
        elif rate > 0:
            tail = f"eta {_duration((self.total - self.done) / rate)}"
        else:
            tail = "eta ?"
        line = (f"{self.phase:<24}: [{percent:5.1f} %] {human_bytes(self.done)} of "
                f"{human_bytes(self.total)}, {human_bytes(rate)}/s, {tail}\n")
        try:
            self.stream.write(line)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a console that went away must not stop the capture
        self.lines += 1


@contextmanager
def bar_progress():
    """A rich progress bar on stderr (a terminal), one bar per phase, binary units."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class BinaryRate(ProgressColumn):
        """Transfer speed in MiB/s (rich's own column is decimal only)."""

        def render(self, task):
            speed = task.finished_speed or task.speed
            if speed is None:
                return Text("?", style="progress.data.speed")
            return Text(f"{human_bytes(speed)}/s", style="progress.data.speed")

    progress = Progress(TextColumn("{task.description}"), BarColumn(),
                        DownloadColumn(binary_units=True), BinaryRate(), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=True)
    tasks: dict[str, int] = {}

    def advance(n: int, total: int, phase: str) -> None:
        if phase not in tasks:
            tasks[phase] = progress.add_task(phase, total=total)
        progress.update(tasks[phase], advance=n)

    with progress:
        yield advance


@contextmanager
def progress_reporter(mode: str, stream: TextIO, is_terminal: bool):
    """The reporter for a mode: auto is a bar on a terminal and lines elsewhere."""
    if mode == "auto":
        mode = "bar" if is_terminal else "lines"
    if mode == "none":
        yield None
    elif mode == "bar":
        with bar_progress() as advance:
            yield advance
    else:
        lines = LineProgress(stream)
        try:
            yield lines
        finally:
            lines.finish()
