"""The command line under misuse: bad values, closed pipes, full disks, signals.

Every case ends with one line on stderr and a documented exit code, never
a traceback, click's "Aborted!" or a multi-line usage block.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from vmcap.sample import RamRange, SampleSpec

from conftest import env_without_debug


def vmcap(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "vmcap", *map(str, args)], capture_output=True,
                          text=True, env=env_without_debug(), timeout=60, **kwargs)


def assert_one_error_line(result, code):
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vmcap: "), lines
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [
    ["save", "{src}", ""],
    ["save", "", "{out}"],
    ["save", "--dmesg", "", "{src}", "{out}"],
    ["inspect", ""],
    ["dmesg", ""],
    ["verify", ""],
    ["verify", "--source", "", "{src}"],
    ["decompress", "{src}", ""],
])
def test_empty_paths_are_usage_errors_before_any_work(make_vmcore, tmp_path, args):
    src, _ = make_vmcore()
    out = tmp_path / "out"
    result = vmcap(*[a.format(src=src, out=out) for a in args])
    assert_one_error_line(result, 2)
    assert "empty path" in result.stderr
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(src)]


@pytest.mark.parametrize("args,what", [
    (["--frame-size", ""], "not a size"),
    (["--frame-size", "1"], "outside 64K..64M"),
    (["--frame-size", "100G"], "outside 64K..64M"),
    (["--frame-size", "65535"], "outside"),
    (["--window", "100G"], "outside 64K..256M"),
    (["--window", "4x"], "not a size"),
    (["--window", "-4M"], "outside"),
    (["--page-size", "0"], "power of two"),
    (["--page-size", "3"], "power of two"),
    (["--page-size", "-4096"], "power of two"),
    (["--page-size", str(1 << 40)], "power of two"),
    (["--page-size", "4k"], "not a number"),
    (["--compress", "zlib", "--format", "kdump", "--level", "22"], "outside 1..9"),
    (["--level", "23"], "--level"),
    (["--threads", "-1"], "--threads"),
    (["--bogus"], "No such option"),
])
def test_option_values_out_of_bounds_are_usage_errors(make_vmcore, tmp_path, args, what):
    src, _ = make_vmcore()
    started = time.monotonic()
    result = vmcap("save", *args, src, tmp_path / "out")
    assert_one_error_line(result, 2)
    assert what in result.stderr
    assert "--help" in result.stderr  # where to look, on the same line
    assert not (tmp_path / "out").exists()
    assert time.monotonic() - started < 30


def test_bounds_are_inclusive(make_vmcore, tmp_path):
    src, _ = make_vmcore()
    result = vmcap("save", "--quiet", "--frame-size", "64K", "--window", "64K",
                   "--page-size", "4096", src, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert vmcap("verify", "--quiet", "--source", src, tmp_path / "out").returncode == 0


def test_kdump_to_stdout_is_a_usage_error(make_vmcore):
    src, _ = make_vmcore()
    result = vmcap("save", "--format", "kdump", src, "-")
    assert_one_error_line(result, 2)
    assert result.stdout == ""


def test_no_command_and_unknown_command(tmp_path):
    assert_one_error_line(vmcap("bogus"), 2)
    result = vmcap()
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.fixture
def many_segments(make_vmcore):
    """A vmcore whose inspect output is far larger than a pipe buffer."""
    ranges = tuple(RamRange(0x100000 + i * 0x3000, 0x1000) for i in range(1500))
    path, _ = make_vmcore(SampleSpec(ranges=ranges, content="pattern"))
    return path


@pytest.mark.parametrize("args", [["inspect", "--segments"], ["inspect", "--json"],
                                  ["verify", "--json"]])
def test_reader_closing_the_pipe_is_success(many_segments, tmp_path, args):
    target = many_segments
    if args[0] == "verify":
        target = tmp_path / "out.zelf"
        assert vmcap("save", "--quiet", many_segments, target).returncode == 0
    for _ in range(3):
        process = subprocess.Popen([sys.executable, "-m", "vmcap", *args, str(target)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=env_without_debug())
        process.stdout.readline()
        process.stdout.close()  # like `| head -1`
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=60) == 0, stderr
        assert stderr == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("args", [["inspect"], ["inspect", "--json"], ["verify"],
                                  ["dmesg", "--json"]])
def test_stdout_on_a_full_device_is_an_output_error(make_vmcore, tmp_path, request, args):
    # The kernel log needs a real kernel's structures: the real dump.
    src = request.getfixturevalue("real_vmcore") if args[0] == "dmesg" else make_vmcore()[0]
    target = src
    if args[0] == "verify":
        target = tmp_path / "out.zelf"
        assert vmcap("save", "--quiet", src, target).returncode == 0
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "vmcap", *args, str(target)],
                                stdout=full, stderr=subprocess.PIPE, text=True,
                                env=env_without_debug(), timeout=60)
    assert_one_error_line(result, 5)
    assert "standard output" in result.stderr and "No space left" in result.stderr


def _slow_save(src, out, **popen):
    return subprocess.Popen([sys.executable, "-m", "vmcap", "save", "--threads", "1", "--level",
                             "19", "--progress", "none", str(src), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env_without_debug(), **popen)


@pytest.fixture
def big_source(make_vmcore):
    path, _ = make_vmcore(SampleSpec(ranges=(RamRange(0x100000, 256 << 20),), content="mixed"))
    return path


def _wait_for_temp_file(directory, process, limit=30.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if any(name != "src" and not name.startswith("vmcore")
               for name in os.listdir(directory)):
            return
        if process.poll() is not None:
            pytest.fail("save ended before it could be signalled")
        time.sleep(0.02)
    pytest.fail("no temporary output appeared")


def test_sighup_mid_save_removes_partial_output(big_source, tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    process = _slow_save(big_source, workdir / "out")
    _wait_for_temp_file(workdir, process)
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip() == "vmcap: interrupted by SIGHUP"
    assert os.listdir(workdir) == []


def test_ignored_sighup_stays_ignored(make_vmcore, tmp_path):
    """nohup vmcap save ...: the caller asked for SIGHUP to be ignored."""
    src, _ = make_vmcore(SampleSpec(ranges=(RamRange(0x100000, 64 << 20),), content="mixed"))
    workdir = tmp_path / "w"
    workdir.mkdir()
    process = _slow_save(src, workdir / "out",
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    _wait_for_temp_file(workdir, process)
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert os.listdir(workdir) == ["out"]


# A Ctrl-C that lands while vmcap is still importing its modules: an import
# hook raises the signal exactly when vmcap.cli starts to load.
SIGINT_DURING_IMPORT = textwrap.dedent("""
    import os, signal, sys

    class SignalOnImport:
        def find_spec(self, name, path=None, target=None):
            if name == {module!r}:
                os.kill(os.getpid(), signal.{signal})
            return None

    sys.meta_path.insert(0, SignalOnImport())
    from vmcap.entry import run
    run({argv!r})
""")


@pytest.mark.parametrize("module,sig", [("vmcap.cli", "SIGINT"), ("click", "SIGINT"),
                                        ("vmcap.cli", "SIGTERM"), ("vmcap.describe", "SIGINT")])
def test_signal_during_start_up_is_one_line_and_130(make_vmcore, module, sig):
    src, _ = make_vmcore()
    code = SIGINT_DURING_IMPORT.format(module=module, signal=sig, argv=["inspect", src])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env_without_debug(), timeout=60)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == f"vmcap: interrupted by {sig}"


def test_usage_error_is_one_line(make_vmcore):
    result = vmcap("save")
    assert_one_error_line(result, 2)
    result = vmcap("inspect", "--no-such-flag")
    assert_one_error_line(result, 2)


def test_save_summary_units_and_ratio(make_vmcore, tmp_path):
    src, _ = make_vmcore()
    zero = vmcap("save", "--json", src, tmp_path / "d0")
    one = vmcap("save", "--json", "-d", "1", src, tmp_path / "d1")
    s0, s1 = json.loads(zero.stdout), json.loads(one.stdout)
    # The ratio is memory per byte written, not every pass read per byte written.
    assert s0["ratio"] == round(s0["memory_bytes"] / s0["bytes_written"], 3)
    assert s1["ratio"] == round(s1["memory_bytes"] / s1["bytes_written"], 3)
    assert s1["bytes_read"] > s1["memory_bytes"]  # the -d 1 scan pass
    assert "mib_per_s" in s0 and "mb_per_s" not in s0
    text = vmcap("save", src, tmp_path / "d2").stdout
    assert "MiB/s" in text and "MB/s" not in text.replace("MiB/s", "")


def test_zelf_and_kdump_count_the_same_zero_pages(make_vmcore, tmp_path):
    """-d 1: the ELF formats report zero pages kept in short runs, so the totals agree."""
    src, _ = make_vmcore(SampleSpec(ranges=(RamRange(0x100000, 32 << 20),), content="mixed"))
    zelf = json.loads(vmcap("save", "--json", "-d", "1", src, tmp_path / "a").stdout)
    kdump = json.loads(vmcap("save", "--json", "-d", "1", "--format", "kdump", src,
                             tmp_path / "b").stdout)
    counts = zelf["pages_excluded"]
    assert counts["kept_in_short_runs"] > 0
    assert counts["zero"] + counts["kept_in_short_runs"] == kdump["pages_excluded"]["zero_shared"]
