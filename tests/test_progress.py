"""Progress lines for consoles and the journal: bounded whatever the dump size."""

from __future__ import annotations

import io
import subprocess
import sys

from vmcap.progress import LineProgress
from vmcap.sample import RamRange, SampleSpec

from conftest import env_without_debug


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def feed(progress, clock, total, chunk, seconds_per_chunk, phase="Copying data"):
    done = 0
    while done < total:
        n = min(chunk, total - done)
        clock.now += seconds_per_chunk
        progress(n, total, phase)
        done += n


def test_a_terabyte_at_a_slow_rate_prints_a_bounded_number_of_lines():
    clock, out = FakeClock(), io.StringIO()
    progress = LineProgress(out, clock=clock)
    # 1 TiB in 4 MiB windows, 0.02 s each: 262,144 calls over ~1.5 hours.
    feed(progress, clock, 1 << 40, 4 << 20, 0.02)
    progress.finish()
    lines = out.getvalue().splitlines()
    assert 20 <= len(lines) <= 22, len(lines)
    assert lines[0].startswith("Copying data") and "[  0.0 %]" in lines[0]
    assert "[100.0 %]" in lines[-1] and "done in" in lines[-1]
    percents = [float(line.split("[")[1].split("%")[0]) for line in lines]
    assert percents == sorted(percents)
    assert all(b - a >= 5.0 for a, b in zip(percents[:-2], percents[1:-1]))


def test_a_fast_dump_prints_few_lines_because_of_the_time_limit():
    clock, out = FakeClock(), io.StringIO()
    progress = LineProgress(out, clock=clock)
    feed(progress, clock, 8 << 30, 4 << 20, 0.001)  # 8 GiB in 2 s
    progress.finish()
    assert len(out.getvalue().splitlines()) == 2  # start and end


def test_each_phase_gets_its_own_lines():
    clock, out = FakeClock(), io.StringIO()
    progress = LineProgress(out, clock=clock)
    feed(progress, clock, 1 << 30, 1 << 20, 0.1, phase="Excluding zero pages")
    feed(progress, clock, 1 << 30, 1 << 20, 0.1, phase="Copying data")
    progress.finish()
    lines = out.getvalue().splitlines()
    scan = [line for line in lines if line.startswith("Excluding zero pages")]
    copy = [line for line in lines if line.startswith("Copying data")]
    assert len(scan) + len(copy) == len(lines)
    assert "[100.0 %]" in scan[-1] and "[100.0 %]" in copy[-1]
    assert lines.index(scan[-1]) < lines.index(copy[0])
    assert all(line.isascii() for line in lines)  # serial consoles


def test_progress_lines_on_a_pipe_for_a_large_sample(make_vmcore, tmp_path):
    path, _ = make_vmcore(SampleSpec(ranges=(RamRange(0x100000, 512 << 20),), content="mixed"))
    result = subprocess.run([sys.executable, "-m", "vmcap", "save", "-d", "1", "--threads", "1",
                             path, str(tmp_path / "out")], capture_output=True, text=True,
                            env=env_without_debug(), timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert 4 <= len(lines) <= 2 * 22
    assert {line.split(":")[0].strip() for line in lines} == {"Excluding zero pages",
                                                              "Copying data"}
