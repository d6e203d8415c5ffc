"""makedumpfile's command line: parsing, refusals, and what each spelling runs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from vmcap.formats.kdump import KdumpReader
from vmcap.makedumpfile_cli import Request, UnsupportedOption, UsageProblem, parse

from conftest import env_without_debug, spec


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "vmcap", "makedumpfile", *map(str, args)],
                          capture_output=True, env=env_without_debug(), timeout=120, stdin=stdin)


@pytest.mark.parametrize("argv,expected", [
    (["-l", "--message-level", "7", "-d", "31", "/proc/vmcore", "out"],
     dict(action="dump", compress="lzo", dump_levels=(31,), message_level=7, output="out")),
    (["-cd31", "a", "b"], dict(compress="zlib", dump_levels=(31,))),
    (["-F", "-c", "-d", "31", "/proc/vmcore"], dict(action="flatten", output="-")),
    (["-c", "-d", "31", "-F", "/proc/vmcore"], dict(action="flatten", source="/proc/vmcore")),
    (["-l", "-d", "31", "--num-threads=4", "a", "b"], dict(threads=4)),
    (["-d", "11,31", "-L", "1048576", "a", "b"], dict(dump_levels=(11, 31), size_limit=1 << 20)),
    (["-E", "-d", "1", "a", "b"], dict(elf=True, compress="none")),
    (["a", "b"], dict(compress="none", dump_levels=(0,))),
    (["-R", "out"], dict(action="reassemble", output="out")),
    (["--dump-dmesg", "-i", "info", "a", "log"], dict(action="dmesg", vmcoreinfo_path="info")),
    (["--check-params", "-l", "-d", "31", "a", "b"], dict(action="check")),
    (["--cyclic-buffer", "1024", "--work-dir", "/tmp", "--non-cyclic", "-b", "8", "a", "b"],
     dict(action="dump")),
    (["-x", "vmlinux", "-d", "31", "a", "b"], dict(vmlinux="vmlinux")),
    (["-D", "a", "b"], dict(message_level=31)),
    (["--non-mmap", "-f", "a", "b"], dict(allow_mmap=False, force=True)),
])
def test_makedumpfile_spellings(argv, expected):
    request = parse(argv)
    assert isinstance(request, Request)
    for key, value in expected.items():
        assert getattr(request, key) == value, (key, request)


@pytest.mark.parametrize("argv,problem", [
    (["-E", "-c", "a", "b"], UsageProblem),
    (["-c", "-l", "a", "b"], UsageProblem),
    (["-d", "32", "a", "b"], UsageProblem),
    (["-d", "1,x", "a", "b"], UsageProblem),
    (["-L", "0", "a", "b"], UsageProblem),
    (["a"], UsageProblem),
    (["-F", "a", "b"], UsageProblem),
    (["-R"], UsageProblem),
    (["--bogus", "a", "b"], UsageProblem),
    (["--message-level", "99", "a", "b"], UsageProblem),
    (["", "b"], UsageProblem),
    (["--split", "a", "b", "c"], UnsupportedOption),
    (["-g", "info", "-x", "vmlinux"], UnsupportedOption),
    (["-cg", "info"], UnsupportedOption),
    (["--config", "f", "a", "b"], UnsupportedOption),
    (["--mem-usage", "/proc/kcore"], UnsupportedOption),
    (["--dry-run", "a", "b"], UnsupportedOption),
])
def test_bad_or_unsupported_command_lines_are_refused(argv, problem):
    with pytest.raises(problem):
        parse(argv)


def test_refusals_are_one_line_and_documented_codes(make_vmcore, tmp_path):
    src, _ = make_vmcore(spec())
    unsupported = run("--split", src, tmp_path / "a", tmp_path / "b")
    assert unsupported.returncode == 8 and len(unsupported.stderr.splitlines()) == 1
    assert b"--split" in unsupported.stderr
    usage = run("--bogus", src, tmp_path / "a")
    assert usage.returncode == 2 and len(usage.stderr.splitlines()) == 1
    flat_elf = run("-E", "-F", src)
    assert flat_elf.returncode == 8 and flat_elf.stdout == b""
    assert [p.name for p in tmp_path.iterdir()] == ["vmcore-0"]  # the source only


def test_each_compression_flag_writes_its_pages(make_vmcore, tmp_path):
    src, _ = make_vmcore(spec(content="mixed"))
    for flag, name in (("-c", "zlib"), ("-l", "lzo"), ("-p", "snappy"), ("-z", "zstd"),
                       (None, "none")):
        out = tmp_path / name
        result = run(*([flag] if flag else []), "-d", "1", "--message-level", "0", src, out)
        assert result.returncode == 0 and result.stderr == b"", result.stderr
        with KdumpReader(str(out)) as reader:
            assert reader.header.dump_level == 1
            assert (reader.header.status & 0x27) == {"zlib": 1, "lzo": 2, "snappy": 4,
                                                     "zstd": 0x20, "none": 0}[name]


@pytest.mark.parametrize("flag,codec", [("-z", "zstd"), ("-c", "zlib")])
def test_zstd_and_zlib_pages_are_compressed_at_makedumpfiles_level_1(make_vmcore, tmp_path, flag, codec):
    """makedumpfile -z and -c compress every page at level 1 (ZSTD level 1, Z_BEST_SPEED):
    the drop-in's pages are those of `vmcap save --level 1`, not of save's slower default."""
    from vmcap.makedumpfile_cli import save_options
    from vmcap.save import SaveOptions, save

    assert save_options(parse([flag, "-d", "31", "a", "b"])).compression_level() == 1
    src, _ = make_vmcore(spec(content="mixed"))
    front = tmp_path / "front"
    assert run(flag, "-d", "1", "--message-level", "0", src, front).returncode == 0
    stored = {}
    for name, level in (("level1", 1), ("default", None)):
        save(src, str(tmp_path / name), SaveOptions(output_format="kdump", compress=codec, level=level,
                                                    dump_level=1, threads=1))
    for name in ("front", "level1", "default"):
        with KdumpReader(str(tmp_path / name)) as reader:
            _, dumped = reader.page_counts()
            offset = reader.descriptor_offset
        table = (tmp_path / name).read_bytes()[offset:offset + 24 * dumped]
        descriptors = np.frombuffer(table, dtype=[("offset", "<u8"), ("size", "<u4"), ("flags", "<u4"),
                                                  ("page_flags", "<u8")])
        stored[name] = (descriptors["size"].tolist(), descriptors["flags"].tolist())
    assert stored["front"] == stored["level1"] != stored["default"]


def test_elf_output_and_message_levels(make_vmcore, tmp_path):
    src, _ = make_vmcore(spec())
    quiet = run("-E", "-d", "1", "--message-level", "0", src, tmp_path / "a.elf")
    assert quiet.returncode == 0 and quiet.stderr == b""
    assert (tmp_path / "a.elf").read_bytes()[:4] == b"\x7fELF"
    chatty = run("-E", "-d", "1", src, tmp_path / "b.elf")
    assert b"Completed" in chatty.stderr and b"Copying data" in chatty.stderr
    assert chatty.stdout == b""
    # Errors are suppressed without message level bit 4, but the exit code stays.
    silent_error = run("--message-level", "3", src, tmp_path / "b.elf")
    assert silent_error.returncode == 5 and b"error" not in silent_error.stderr


def test_flatten_to_stdout_and_reassemble_from_stdin(make_vmcore, tmp_path):
    src, _ = make_vmcore(spec())
    stream = run("-F", "-l", "-d", "1", "--message-level", "0", src)
    assert stream.returncode == 0 and stream.stdout.startswith(b"makedumpfile\0")
    (tmp_path / "dump.flat").write_bytes(stream.stdout)
    with open(tmp_path / "dump.flat", "rb") as stdin:
        rebuilt = run("-R", tmp_path / "vmcore", stdin=stdin)
    assert rebuilt.returncode == 0, rebuilt.stderr
    verify = subprocess.run([sys.executable, "-m", "vmcap", "verify", "--source", src,
                             str(tmp_path / "vmcore")], capture_output=True, text=True,
                            env=env_without_debug())
    assert verify.returncode == 0, verify.stderr


def test_vmlinux_is_named_not_read(make_vmcore, tmp_path):
    src, _ = make_vmcore(spec())
    missing = run("-x", tmp_path / "vmlinux", "-l", "-d", "1", src, tmp_path / "out")
    assert missing.returncode == 3 and b"vmlinux" in missing.stderr
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF")
    named = run("-x", tmp_path / "vmlinux", "-l", "-d", "1", src, tmp_path / "out")
    assert named.returncode == 0, named.stderr
    assert b"reads no vmlinux" in named.stderr


def test_console_script_runs_the_front_end(tmp_path):
    import shutil

    script = shutil.which("vmcap-makedumpfile")
    if script is None:
        pytest.skip("vmcap-makedumpfile is not installed as a console script")
    result = subprocess.run([script, "-v"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "makedumpfile" in result.stdout
