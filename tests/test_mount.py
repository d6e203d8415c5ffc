"""`vmcap mount DUMP DIR`: the plain ELF view over FUSE, read by crash, gdb and drgn.

Every mount here is a real FUSE mount of a `vmcap mount` process; it is
stopped by a real signal and must leave no mount behind (/proc/mounts).
Skipped where this machine has no usable FUSE, except under CI.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from conftest import error_lines, have, spec

ROOT = Path(__file__).resolve().parents[1]
PAGE = 4096


def fuse_missing() -> str | None:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as e:
        return f"/dev/fuse: {e.strerror}"
    os.close(fd)
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        return f"mfusepy/libfuse: {e}"
    return None


_MISSING = fuse_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None and not os.environ.get("CI"),
                                reason=f"no usable FUSE here ({_MISSING})")


def vmcap(*args, env=None, check=True, timeout=600):
    result = subprocess.run([sys.executable, "-m", "vmcap", *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def mount_options(directory) -> list[str] | None:
    target = os.path.realpath(directory)
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[1] == target:
                return fields[3].split(",")
    return None


def is_mounted(directory) -> bool:
    return mount_options(directory) is not None


@contextmanager
def mounted(dumps, directory, stop=signal.SIGINT, expect_code=130, options=()):
    """A `vmcap mount` process serving DIR/vmcore; stopped by ``stop`` at the end,
    which must exit with ``expect_code`` and leave DIR unmounted."""
    directory.mkdir(exist_ok=True)
    process = subprocess.Popen([sys.executable, "-m", "vmcap", "mount", *options,
                                *map(str, dumps), str(directory)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not is_mounted(directory):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "vmcap mount did not mount in 60 s"
            time.sleep(0.05)
        ended = {}
        yield directory / "vmcore", ended
        if stop is not None:
            process.send_signal(stop)
        out, err = process.communicate(timeout=60)
        ended["stderr"] = err
        assert process.returncode == expect_code, err
        assert "Traceback" not in err
        lines = error_lines(err)
        # Read errors say so while serving; the end is one line.
        assert all(line.startswith("vmcap: warning: read of ") for line in lines[:-1]), err
        if stop is not None:
            assert lines[-1:] == [f"vmcap: interrupted by {signal.Signals(stop).name}"]
        else:
            assert not lines
        assert str(directory / "vmcore") in out
        assert not is_mounted(directory)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if is_mounted(directory):
            subprocess.run(["umount", "-l", str(directory)], check=False)


def pt_loads(path):
    with open(path, "rb") as f:
        elf = ELFFile(f)
        return [(s["p_paddr"], s["p_memsz"], s["p_filesz"], s["p_offset"])
                for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]


def note_names(path):
    with open(path, "rb") as f:
        elf = ELFFile(f)
        return sorted(n["n_name"] for s in elf.iter_segments() if s["p_type"] == "PT_NOTE"
                      for n in s.iter_notes())


def same_file(a, b, chunk=8 << 20) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


class Physical:
    """Physical memory of a plain ELF core, read with pyelftools' program headers."""

    def __init__(self, path):
        self.file = open(path, "rb")
        self.loads = pt_loads(path)

    def read(self, paddr, size):
        for start, memsz, filesz, offset in self.loads:
            if start <= paddr and paddr + size <= start + memsz:
                stored = max(0, min(size, start + filesz - paddr))
                self.file.seek(offset + paddr - start)
                return self.file.read(stored) + bytes(size - stored)
        raise KeyError(hex(paddr))

    def close(self):
        self.file.close()


def assert_same_memory(view, plain, every=1):
    """The plain core's stored bytes (every ``every``-th page of each PT_LOAD, and
    its first and last) read the same at their physical addresses in the view."""
    mine, theirs = Physical(view), Physical(plain)
    try:
        checked = 0
        for start, memsz, filesz, _ in theirs.loads:
            end = start + filesz
            pages = range(start - start % PAGE, end, PAGE)
            picked = set(pages[::every]) | ({pages[0], pages[-1]} if pages else set())
            for page in sorted(picked):
                low, high = max(page, start), min(page + PAGE, end)
                assert mine.read(low, high - low) == theirs.read(low, high - low), hex(low)
                checked += 1
        assert checked
    finally:
        mine.close()
        theirs.close()


def gdb_info_files(core) -> list[str]:
    out = subprocess.run(["gdb", "-nx", "-batch", "-ex", "info files", "-c", str(core)],
                         capture_output=True, text=True, timeout=300).stdout
    return [line.replace(str(core), "CORE") for line in out.splitlines()
            if re.search(r"0x[0-9a-f]+ - 0x[0-9a-f]+", line)]


def crash_osrelease(core) -> str:
    result = subprocess.run(["crash", "--osrelease", str(core)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def drgn_reads(core, addresses, size=512, physical=False):
    drgn = pytest.importorskip("drgn")
    program = drgn.Program()
    program.set_core_dump(str(core))
    return [program.read(address, size, physical) for address in addresses]


# ------------------------------------------------------------ fixture vmcores


@pytest.fixture
def fixture_dumps(make_vmcore, tmp_path):
    source, _ = make_vmcore(spec())
    zelf, kdump, plain = tmp_path / "d.zelf", tmp_path / "d.kdump", tmp_path / "d.elf"
    vmcap("save", "-q", "--frame-size", "64K", source, zelf)
    vmcap("save", "-q", "--format", "kdump", "--compress", "lzo", source, kdump)
    vmcap("decompress", zelf, plain)
    return source, zelf, kdump, plain


def test_a_mounted_zelf_is_the_decompressed_file(fixture_dumps, tmp_path):
    source, zelf, _, plain = fixture_dumps
    with mounted([zelf], tmp_path / "mnt") as (core, _):
        assert os.stat(core).st_size == os.stat(plain).st_size
        assert same_file(core, plain)
        # Random access: reads at odd offsets and sizes, across frame boundaries.
        data = Path(plain).read_bytes()
        with open(core, "rb") as f:
            for offset, size in ((0, 1), (65535, 3), (65536 * 3 - 7, 70000), (len(data) - 5, 5),
                                 (len(data) - 5, 4096)):
                f.seek(offset)
                assert f.read(size) == data[offset:offset + size]
        assert_same_memory(core, source)
        with pytest.raises(OSError):
            open(core, "r+b")
        # A reader that still has the file open does not keep the mount up
        # (mounted() checks /proc/mounts after the stop).
        reader = os.open(core, os.O_RDONLY)
    try:
        os.close(reader)
    except OSError:  # the connection is gone
        pass


def test_a_mounted_kdump_holds_the_memory_of_the_source(fixture_dumps, tmp_path):
    source, _, kdump, _ = fixture_dumps
    with mounted([kdump], tmp_path / "mnt", stop=signal.SIGTERM,
                 options=["--allow-other"]) as (core, _):
        assert {"ro", "allow_other"} <= set(mount_options(tmp_path / "mnt"))
        assert "VMCOREINFO" in note_names(core)
        assert_same_memory(core, source)
        # The view covers the memory the source's PT_LOADs cover, page-rounded.
        covered = lambda path: {p // PAGE for start, memsz, _, _ in pt_loads(path)
                                for p in range(start, start + memsz, PAGE)}
        assert covered(core) == covered(source)


def test_umount_ends_vmcap_mount_with_exit_code_0(fixture_dumps, tmp_path):
    _, zelf, _, _ = fixture_dumps
    with mounted([zelf], tmp_path / "mnt", stop=None, expect_code=0) as (core, _):
        assert os.path.getsize(core) > 0
        subprocess.run(["umount", str(tmp_path / "mnt")], check=True)


def test_dir_must_be_an_empty_directory(fixture_dumps, tmp_path):
    _, zelf, _, _ = fixture_dumps
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("x")
    for directory, says in ((full, "not an empty directory"),
                            (tmp_path / "missing", "No such file or directory"),
                            (zelf, "not a directory")):
        result = vmcap("mount", zelf, directory, check=False)
        assert result.returncode == 5, result.stderr
        lines = error_lines(result.stderr)
        assert len(lines) == 1 and lines[0].startswith(f"vmcap: error: {directory}: ")
        assert says in lines[0]
        assert not is_mounted(directory)


def test_without_libfuse_one_line_and_exit_code_8(fixture_dumps, tmp_path):
    _, zelf, _, _ = fixture_dumps
    (tmp_path / "mnt").mkdir()
    # mfusepy's own knob names the library to load: one that does not exist.
    env = {**os.environ, "FUSE_LIBRARY_NAME": "vmcap-test-no-such-fuse"}
    result = vmcap("mount", zelf, tmp_path / "mnt", env=env, check=False)
    assert result.returncode == 8
    assert error_lines(result.stderr) == ["vmcap: error: FUSE is not available: libfuse is "
                                          "not installed (Debian: apt install fuse3)"]


@pytest.mark.skipif(not have("unshare"), reason="unshare is not installed")
def test_without_dev_fuse_one_line_and_exit_code_8(fixture_dumps, tmp_path):
    _, zelf, _, _ = fixture_dumps
    (tmp_path / "mnt").mkdir()
    # A mount namespace of its own whose /dev has no fuse device.
    script = (f"mount -t tmpfs none /dev && exec {sys.executable} -m vmcap mount "
              f"{zelf} {tmp_path / 'mnt'}")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no mount namespaces here")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 8, result.stderr
    assert error_lines(result.stderr) == [
        "vmcap: error: FUSE is not available: /dev/fuse does not exist (the kernel's fuse "
        "module is not loaded: modprobe fuse; in a container, pass the device in)"]


def test_dumps_without_random_access_are_refused(fixture_dumps, tmp_path):
    source, _, kdump, _ = fixture_dumps
    (tmp_path / "mnt").mkdir()
    flat = tmp_path / "d.flat"
    vmcap("save", "-q", "--format", "kdump-flat", source, flat)
    wrapped = tmp_path / "d.flat.gz"
    subprocess.run(f"gzip -c {flat} > {wrapped}", shell=True, check=True)
    result = vmcap("mount", wrapped, tmp_path / "mnt", check=False)
    assert result.returncode == 8
    assert len(error_lines(result.stderr)) == 1 and "compressed whole with gzip" in result.stderr
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a dump" * 100)
    result = vmcap("mount", garbage, tmp_path / "mnt", check=False)
    assert result.returncode == 3
    assert error_lines(result.stderr) == [f"vmcap: error: {garbage}: not a dump vmcap reads "
                                          "(an ELF core, zelf, kdump or flattened kdump file)"]
    # A flattened file (not wrapped) has random access through its record index.
    with mounted([flat], tmp_path / "mnt", stop=signal.SIGHUP) as (core, _):
        assert_same_memory(core, source)


def test_a_damaged_frame_is_eio_and_one_warning_the_mount_goes_on(fixture_dumps, tmp_path):
    _, zelf, _, plain = fixture_dumps
    from vmcap.formats.seekable import SeekableReader

    with SeekableReader(str(zelf)) as reader:
        frame = reader.frames[len(reader.frames) // 2]
    damaged = tmp_path / "damaged.zelf"
    data = bytearray(Path(zelf).read_bytes())
    middle = frame.compressed_offset + frame.compressed_size // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    damaged.write_bytes(bytes(data))
    with mounted([damaged], tmp_path / "mnt") as (core, ended):
        with open(core, "rb", buffering=0) as f:
            f.seek(frame.decompressed_offset)
            with pytest.raises(OSError) as error:
                f.read(4096)
            assert error.value.errno == 5  # EIO
            f.seek(0)
            assert f.read(64) == Path(plain).read_bytes()[:64]  # still serving
    assert f"seekable zstd frame {frame.index} at offset {frame.compressed_offset}" \
        in ended["stderr"]


# ------------------------------------------------------------ the real dump


@pytest.fixture(scope="module")
def real_dumps(real_vmcore, tmp_path_factory):
    where = tmp_path_factory.mktemp("real-mount")
    zelf, kdump, plain = where / "real.zelf", where / "real.lzo.kdump", where / "real.zelf.elf"
    vmcap("save", "-q", real_vmcore, zelf)
    vmcap("save", "-q", "--format", "kdump", "--compress", "lzo", real_vmcore, kdump)
    vmcap("decompress", zelf, plain)
    return {"zelf": zelf, "kdump": kdump, "plain": plain}


def vmcoreinfo_symbols(path) -> dict[str, int]:
    from vmcap.api import open_dump

    with open_dump(str(path)) as dump:
        info = dump.vmcoreinfo
    return {k[7:-1]: int(v, 16) for k, v in info.items() if k.startswith("SYMBOL(")}


@pytest.mark.slow
def test_real_zelf_mount_is_the_plain_file_for_crash_gdb_and_drgn(real_dumps, real_vmcore,
                                                                   tmp_path):
    plain = real_dumps["plain"]
    symbols = vmcoreinfo_symbols(plain)
    addresses = [symbols["init_uts_ns"], symbols["swapper_pg_dir"]]
    with mounted([real_dumps["zelf"]], tmp_path / "mnt") as (core, _):
        assert same_file(core, plain)
        assert crash_osrelease(core) == crash_osrelease(plain) == crash_osrelease(real_vmcore)
        if have("gdb"):
            lines = gdb_info_files(core)
            assert lines and lines == gdb_info_files(plain)
        assert drgn_reads(core, addresses) == drgn_reads(plain, addresses)


@pytest.mark.slow
def test_real_lzo_kdump_mount_reads_like_the_plain_dump(real_dumps, real_vmcore, tmp_path):
    symbols = vmcoreinfo_symbols(real_vmcore)
    addresses = [symbols["init_uts_ns"], symbols["swapper_pg_dir"]]
    with mounted([real_dumps["kdump"]], tmp_path / "mnt", stop=signal.SIGTERM) as (core, _):
        assert_same_memory(core, real_vmcore, every=7)
        assert crash_osrelease(core) == crash_osrelease(real_vmcore)
        assert drgn_reads(core, addresses) == drgn_reads(real_vmcore, addresses)
        if have("gdb"):
            # gdb reads a kernel address through the view's PT_LOADs as through the plain's.
            def gdb_x(path):
                out = subprocess.run(["gdb", "-nx", "-batch", "-c", str(path), "-ex",
                                      f"x/16xg {symbols['init_uts_ns']:#x}"],
                                     capture_output=True, text=True, timeout=300).stdout
                return [line for line in out.splitlines() if line.startswith("0x")]
            assert gdb_x(core) and gdb_x(core) == gdb_x(real_vmcore)


def test_a_stale_mount_on_dir_is_named(fixture_dumps, tmp_path):
    _, zelf, _, _ = fixture_dumps
    directory = tmp_path / "mnt"
    directory.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "vmcap", "mount", str(zelf),
                                str(directory)], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not is_mounted(directory):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.kill()  # SIGKILL: nobody unmounts, the mount stays, disconnected
        process.wait()
        result = vmcap("mount", zelf, directory, check=False)
        assert result.returncode == 5
        # stat(DIR) may still answer from the kernel's cache, or already fail.
        assert error_lines(result.stderr) in (
            [f"vmcap: error: {directory}: already a mount point"],
            [f"vmcap: error: {directory}: Transport endpoint is not connected (a FUSE mount "
             "whose process is gone: umount -l it)"])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        subprocess.run(["umount", "-l", str(directory)], check=False)
    assert not is_mounted(directory)


def test_a_mounted_plain_elf_is_the_file_itself(fixture_dumps, tmp_path):
    source, _, _, _ = fixture_dumps
    with mounted([source], tmp_path / "mnt") as (core, _):
        assert same_file(core, source)
