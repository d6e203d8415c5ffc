"""Output creation is safe as root in directories other users can write.

Real files, device nodes, FIFOs, sockets and links (the tests run as root):
vmcap never writes into anything but a regular file of its own, never follows
or reuses what someone planted, and never replaces its own source.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner

from vmcap.commands import main
from vmcap.errors import OutputError
from vmcap.fileio.mmapio import FileSource
from vmcap.fileio.output import OutputFile
from vmcap.sample import RamRange
from vmcap.save import SaveOptions, save
from vmcap.verify import verify

from conftest import env_without_debug, error_lines, spec, temp_outputs

NODE_KINDS = ["dev-null", "char-device", "fifo", "socket"]


def vmcap(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "vmcap", *map(str, args)], capture_output=True,
                          text=True, env=env_without_debug(), timeout=timeout)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def snapshot(path) -> tuple:
    """What must not change about a file someone else owns: entry, inode, mode, owner, bytes."""
    st = os.lstat(path)
    content = digest(path) if stat.S_ISREG(st.st_mode) else None
    target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    return (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_rdev, st.st_size,
            st.st_mtime_ns, content, target)


def dev_null_is_intact() -> bool:
    st = os.lstat("/dev/null")
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def restore_dev_null() -> None:
    """Put the machine's /dev/null back, should a regression have replaced it."""
    os.mknod("/dev/.null.vmcap-test", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod("/dev/.null.vmcap-test", 0o666)
    os.rename("/dev/.null.vmcap-test", "/dev/null")


@pytest.fixture
def node(tmp_path, monkeypatch):
    """make(kind) -> path of a device node, FIFO or socket that must stay as it is."""
    sockets = []
    guard_dev_null = []

    def make(kind: str) -> str:
        if kind == "dev-null":
            # The real one, as the bug report has it; a regression would break
            # the machine's /dev/null, so the fixture repairs it and fails.
            assert dev_null_is_intact(), "/dev/null is not /dev/null before the test"
            guard_dev_null.append(True)
            return "/dev/null"
        path = tmp_path / f"node-{kind}"
        if kind == "char-device":
            try:
                os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers
            except PermissionError:
                pytest.skip("mknod not permitted here")
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            # sun_path is short: bind by a relative name.
            monkeypatch.chdir(tmp_path)
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(path.name)
            sockets.append(sock)
        return str(path)

    yield make
    for sock in sockets:
        sock.close()
    if guard_dev_null and not dev_null_is_intact():
        restore_dev_null()
        pytest.fail("vmcap replaced /dev/null (restored it)")


@pytest.fixture
def source(make_vmcore):
    path, _ = make_vmcore(spec(), name="src")
    return path


@pytest.fixture
def zelf(source, tmp_path):
    out = tmp_path / "dump.zelf"
    save(source, str(out), SaveOptions(threads=1))
    return str(out)


# ------------------------------------------------------------ not a regular file


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("kind", NODE_KINDS)
def test_save_refuses_a_node_as_out(node, source, tmp_path, kind, force):
    target = node(kind)
    before = snapshot(target)
    result = vmcap("save", *(["--force"] if force else []), source, target)
    assert result.returncode == 5, result.stderr
    assert "vmcap writes only regular files" in result.stderr
    assert result.stderr.count("\n") == 1
    assert snapshot(target) == before
    assert not temp_outputs(os.path.dirname(target))


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("kind", NODE_KINDS)
def test_save_refuses_a_node_as_dmesg_file(node, source, tmp_path, kind, force):
    target = node(kind)
    before = snapshot(target)
    out = tmp_path / "out"
    result = vmcap("save", *(["--force"] if force else []), "--dmesg", target, source, out)
    assert result.returncode == 5, result.stderr
    assert "vmcap writes only regular files" in result.stderr
    assert snapshot(target) == before
    assert not out.exists() and not temp_outputs(tmp_path)


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("kind", NODE_KINDS)
def test_decompress_refuses_a_node_as_plain(node, zelf, tmp_path, kind, force):
    target = node(kind)
    before = snapshot(target)
    result = vmcap("decompress", *(["--force"] if force else []), zelf, target)
    assert result.returncode == 5, result.stderr
    assert "vmcap writes only regular files" in result.stderr
    assert snapshot(target) == before
    assert not temp_outputs(tmp_path)


@pytest.mark.parametrize("force", [False, True])
def test_symlink_at_out_is_refused_and_its_target_untouched(source, tmp_path, force):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "out"
    link.symlink_to(victim)
    before, link_before = snapshot(victim), snapshot(link)
    result = cli("save", *(["--force"] if force else []), source, link)
    assert result.exit_code == 5, result.output
    assert "is a symbolic link" in result.output
    assert snapshot(victim) == before and snapshot(link) == link_before


def test_dangling_symlink_at_out_is_refused(source, tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    result = cli("save", "--force", source, link)
    assert result.exit_code == 5, result.output
    assert not (tmp_path / "nowhere").exists() and link.is_symlink()


@pytest.mark.parametrize("name", ["outdir", "outdir/"])
def test_directory_out_is_refused(source, tmp_path, name):
    (tmp_path / "outdir").mkdir()
    result = cli("save", "--force", source, f"{tmp_path}/{name}")
    assert result.exit_code == 5, result.output
    assert "is a directory" in result.output
    assert os.listdir(tmp_path / "outdir") == []


# ------------------------------------------------------------ the temporary file


def test_planted_old_part_symlink_is_not_followed(source, tmp_path):
    victim = tmp_path / "shadow"
    victim.write_bytes(b"root:secret\n")
    victim.chmod(0o640)
    planted = tmp_path / "out.part"
    planted.symlink_to(victim)
    before, planted_before = snapshot(victim), snapshot(planted)
    out = tmp_path / "out"
    result = vmcap("save", "--force", source, out)
    assert result.returncode == 0, result.stderr
    assert snapshot(victim) == before
    assert snapshot(planted) == planted_before  # not ours: not removed either
    assert verify(str(out), source)["status"] == "ok"
    assert temp_outputs(tmp_path) == ["out.part"]


def test_planted_old_part_file_is_not_reused(source, tmp_path):
    planted = tmp_path / "out.part"
    planted.write_bytes(b"their file")
    os.chown(planted, 65534, 65534)
    planted.chmod(0o666)
    before = snapshot(planted)
    out = tmp_path / "out"
    result = vmcap("save", source, out)
    assert result.returncode == 0, result.stderr
    assert snapshot(planted) == before
    st = out.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    assert verify(str(out), source)["status"] == "ok"


def test_longest_output_name_still_gets_a_temporary_file(source, tmp_path):
    out = tmp_path / ("x" * 255)
    save(source, str(out), SaveOptions(threads=1))
    assert verify(str(out), source)["status"] == "ok"
    assert not temp_outputs(tmp_path)


def test_planted_temp_names_are_neither_followed_nor_reused(source, tmp_path, monkeypatch):
    # The random part of the name is the only thing made predictable here, so
    # the first two names tried are taken: a symlink and someone's 0666 file.
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    link = tmp_path / ".out.aaaaaaaa.part"
    link.symlink_to(victim)
    theirs = tmp_path / ".out.bbbbbbbb.part"
    theirs.write_bytes(b"their file")
    os.chown(theirs, 65534, 65534)
    theirs.chmod(0o666)
    names = iter(["aaaaaaaa", "bbbbbbbb", "cccccccc"])
    monkeypatch.setattr("vmcap.fileio.output._random_tag", lambda: next(names))
    before = {p: snapshot(p) for p in (victim, link, theirs)}
    out = tmp_path / "out"
    save(source, str(out), SaveOptions(threads=1))
    assert {p: snapshot(p) for p in (victim, link, theirs)} == before
    assert verify(str(out), source)["status"] == "ok"
    st = out.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid() and st.st_nlink == 1
    assert temp_outputs(tmp_path) == [".out.aaaaaaaa.part", ".out.bbbbbbbb.part"]


def test_temp_name_is_hidden_random_and_private(source, tmp_path):
    seen = []

    class Watching(FileSource):
        def pread_into(self, buffer, offset):
            seen.extend((name, stat.S_IMODE(os.lstat(tmp_path / name).st_mode))
                        for name in temp_outputs(tmp_path))
            super().pread_into(buffer, offset)

    out = tmp_path / "out"
    save(source, str(out), SaveOptions(threads=1, allow_mmap=False),
         source=Watching(source, allow_mmap=False))
    assert seen
    names = {name for name, _ in seen}
    assert len(names) == 1
    name = names.pop()
    assert name.startswith(".out.") and name.endswith(".part") and len(name) == len(".out.") + 13
    int(name[len(".out."):-len(".part")], 16)
    assert {mode for _, mode in seen} == {0o600}
    assert not temp_outputs(tmp_path)


@pytest.mark.parametrize("force", [False, True])
def test_output_is_created_0600_whatever_the_umask(source, tmp_path, force):
    out = tmp_path / "out"
    if force:
        out.write_bytes(b"old")
        out.chmod(0o644)
    old_umask = os.umask(0)
    try:
        result = cli("save", *(["--force"] if force else []), source, out)
    finally:
        os.umask(old_umask)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_kernel_log_file_is_created_0600(real_vmcore, tmp_path):
    from vmcap.save import save_kernel_log
    from vmcap.source.layout import read_layout

    log = tmp_path / "dmesg.txt"
    with FileSource(real_vmcore) as src:
        records = save_kernel_log(read_layout(src), src, SaveOptions(dmesg_path=str(log)))
    assert records == 423
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert not temp_outputs(tmp_path)


# ------------------------------------------------------------ the same file twice


@pytest.mark.parametrize("how", ["same path", "hard link", "symlink", "other spelling"])
@pytest.mark.parametrize("force", [False, True])
def test_out_that_is_the_source_is_refused(source, tmp_path, how, force):
    if how == "same path":
        out = source
    elif how == "hard link":
        out = str(tmp_path / "out")
        os.link(source, out)
    elif how == "symlink":
        out = str(tmp_path / "out")
        os.symlink(source, out)
    else:
        (tmp_path / "sub").mkdir()
        out = f"{tmp_path}/sub/../{os.path.basename(source)}"
    before = snapshot(source)
    result = vmcap("save", *(["--force"] if force else []), source, out)
    assert result.returncode == 5, result.stderr
    assert "OUT is the same file as SRC" in result.stderr and result.stderr.count("\n") == 1
    assert snapshot(source) == before
    assert not temp_outputs(tmp_path)


@pytest.mark.parametrize("how", ["same path", "hard link"])
def test_dmesg_file_that_is_the_source_is_refused(source, tmp_path, how):
    log = source
    if how == "hard link":
        log = str(tmp_path / "log")
        os.link(source, log)
    before = snapshot(source)
    out = tmp_path / "out"
    result = vmcap("save", "--force", "--dmesg", log, source, out)
    assert result.returncode == 5, result.stderr
    assert "--dmesg FILE is the same file as SRC" in result.stderr
    assert snapshot(source) == before
    assert not out.exists() and not temp_outputs(tmp_path)


@pytest.mark.parametrize("how", ["new", "existing", "hard link", "other spelling"])
def test_dmesg_file_that_is_out_is_refused_before_anything_is_written(source, tmp_path, how):
    out = tmp_path / "out"
    log = str(out)
    if how == "existing":
        out.write_bytes(b"old")
    elif how == "hard link":
        out.write_bytes(b"old")
        log = str(tmp_path / "log")
        os.link(out, log)
    elif how == "other spelling":
        (tmp_path / "sub").mkdir()
        log = f"{tmp_path}/sub/../out"
    result = vmcap("save", "--force", "--dmesg", log, source, out)
    assert result.returncode == 5, result.stderr
    assert "is the same file as OUT" in result.stderr
    if how in ("new", "other spelling"):
        assert not out.exists()
    else:
        assert out.read_bytes() == b"old"
    assert not temp_outputs(tmp_path)


def test_dmesg_and_out_both_on_stdout_are_refused(source):
    result = vmcap("save", "--dmesg", "-", source, "-")
    assert result.returncode == 5 and "--dmesg FILE is the same file as OUT" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("how", ["same path", "hard link", "symlink"])
def test_decompress_onto_its_own_dump_is_refused(zelf, tmp_path, how):
    plain = zelf
    if how == "hard link":
        plain = str(tmp_path / "plain")
        os.link(zelf, plain)
    elif how == "symlink":
        plain = str(tmp_path / "plain")
        os.symlink(zelf, plain)
    before = snapshot(zelf)
    result = vmcap("decompress", "--force", zelf, plain)
    assert result.returncode == 5, result.stderr
    assert "PLAIN is the same file as DUMP" in result.stderr
    assert snapshot(zelf) == before
    assert not temp_outputs(tmp_path)


# ------------------------------------------------------------ races at commit


class Meddling(FileSource):
    """A source that, once the output is being written, does what another user might do."""

    def __init__(self, path, directory, meddle):
        super().__init__(path, allow_mmap=False)
        self.directory = directory
        self.meddle = meddle

    def pread_into(self, buffer, offset):
        if self.meddle is not None and temp_outputs(self.directory):
            meddle, self.meddle = self.meddle, None
            meddle()
        super().pread_into(buffer, offset)


def save_meddled(source, out, meddle, **options):
    meddling = Meddling(source, out.parent, meddle)
    summary = save(source, str(out), SaveOptions(threads=1, allow_mmap=False, **options),
                   source=meddling)
    assert meddling.meddle is None, "the output was never written"
    return summary


def test_out_created_meanwhile_is_not_replaced_without_force(source, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared while writing"):
        save_meddled(source, out, lambda: out.write_bytes(b"theirs"))
    assert out.read_bytes() == b"theirs"
    assert not temp_outputs(tmp_path)


def test_out_created_meanwhile_by_another_process(source, tmp_path, make_vmcore):
    # The same race through the CLI: OUT appears while a save runs (stopped
    # with SIGSTOP meanwhile, so the timing cannot make the test pass).
    import signal
    import time

    from vmcap.sample import RamRange

    big, _ = make_vmcore(spec([RamRange(0x100000, 4 << 20)], content="mixed"))
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "vmcap", "save", "--level", "19",
                                "--threads", "1", big, str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env_without_debug())
    deadline = time.monotonic() + 30
    while not temp_outputs(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGSTOP)
    try:
        assert temp_outputs(tmp_path), "save never started writing"
        assert process.poll() is None, "save finished before OUT could be created"
        out.write_bytes(b"theirs")
    finally:
        process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 5, stderr
    assert "appeared while writing" in stderr and len(error_lines(stderr)) == 1
    assert out.read_bytes() == b"theirs"
    assert not temp_outputs(tmp_path)


@pytest.mark.parametrize("planted", ["symlink", "fifo", "directory"])
def test_force_refuses_a_non_regular_out_planted_meanwhile(source, tmp_path, planted):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    out = tmp_path / "out"
    out.write_bytes(b"old dump")

    def plant():
        out.unlink()
        if planted == "symlink":
            out.symlink_to(victim)
        elif planted == "fifo":
            os.mkfifo(out)
        else:
            out.mkdir()

    with pytest.raises(OutputError, match="vmcap writes only regular files"):
        save_meddled(source, out, plant, force=True)
    assert victim.read_bytes() == b"keep me"
    assert not stat.S_ISREG(os.lstat(out).st_mode)
    assert not temp_outputs(tmp_path)


def test_force_replaces_a_regular_file_that_appeared_meanwhile(source, tmp_path):
    out = tmp_path / "out"
    save_meddled(source, out, lambda: out.write_bytes(b"old"), force=True)
    assert verify(str(out), source)["status"] == "ok"
    assert not temp_outputs(tmp_path)


def test_a_swapped_temp_file_is_neither_published_nor_removed(source, tmp_path):
    out = tmp_path / "out"

    def swap():
        (name,) = temp_outputs(tmp_path)
        os.rename(tmp_path / name, tmp_path / "moved-away")
        (tmp_path / name).write_bytes(b"someone else's")

    with pytest.raises(OutputError, match="was removed or replaced"):
        save_meddled(source, out, swap)
    assert not out.exists()
    (name,) = temp_outputs(tmp_path)
    assert (tmp_path / name).read_bytes() == b"someone else's"


# ------------------------------------------------------------ filesystems without hard links


def refuse_links(monkeypatch):
    # No vfat mount here: link() fails as it does on one.
    def link(*args, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr("vmcap.fileio.output.os.link", link)


def test_no_hard_links_still_commits(source, tmp_path, monkeypatch):
    refuse_links(monkeypatch)
    out = tmp_path / "out"
    save(source, str(out), SaveOptions(threads=1))
    assert verify(str(out), source)["status"] == "ok"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert not temp_outputs(tmp_path)


def test_no_hard_links_still_refuses_an_out_that_appeared(source, tmp_path, monkeypatch):
    refuse_links(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared while writing"):
        save_meddled(source, out, lambda: out.write_bytes(b"theirs"))
    assert out.read_bytes() == b"theirs"
    assert not temp_outputs(tmp_path)


def test_abort_removes_only_our_temporary_file(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "neighbour").write_bytes(b"x")
    output = OutputFile(str(out))
    output.write(b"partial")
    assert len(temp_outputs(tmp_path)) == 1
    output.abort()
    assert sorted(os.listdir(tmp_path)) == ["neighbour"]
    output.abort()  # twice is harmless


def test_kdump_metadata_digest_needs_no_proc(make_vmcore, tmp_path, monkeypatch):
    """An initramfs may have no /proc: the output fd itself is readable."""
    from vmcap.save import SaveOptions, save
    from vmcap.verify import verify

    real_open = os.open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/self/fd/"):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_open(path, *args, **kwargs)

    src, _ = make_vmcore(spec())
    monkeypatch.setattr(os, "open", no_proc)
    out = tmp_path / "out.kdump"
    save(src, str(out), SaveOptions(output_format="kdump", dump_level=1))
    monkeypatch.undo()
    assert verify(str(out), src)["digest"] == "xxh64"


# --- early writeback -------------------------------------------------------------------------


@pytest.mark.parametrize("output_format", ["zelf", "kdump", "elf"])
def test_written_ranges_are_handed_to_the_kernel_as_they_grow(make_vmcore, tmp_path, monkeypatch, output_format):
    """Each stretch of file is advised twice (its writeback starts, then its clean pages go),
    in order, without gaps; the output is the same as without the advice."""
    import vmcap.fileio.output

    src, _ = make_vmcore(spec(ranges=(RamRange(0x100000, 16 << 20),), content="mixed"))
    reference = tmp_path / "reference"
    monkeypatch.setattr(vmcap.fileio.output, "WRITEBACK_BYTES", 1 << 62)
    save(src, str(reference), SaveOptions(output_format=output_format, threads=1))
    calls = []
    real = os.posix_fadvise

    def advise(fd, offset, length, advice):
        calls.append((offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", advise)
    monkeypatch.setattr(vmcap.fileio.output, "WRITEBACK_BYTES", 64 << 10)
    out = tmp_path / "out"
    save(src, str(out), SaveOptions(output_format=output_format, threads=1))
    assert out.read_bytes() == reference.read_bytes()
    assert len(calls) >= 4, calls
    assert {advice for _, _, advice in calls} == {os.POSIX_FADV_DONTNEED}
    ends = [offset + length for offset, length, _ in calls]
    assert ends == sorted(ends) and all(b - a >= 64 << 10 for a, b in zip(ends, ends[1:]))
    assert calls[0][0] == 0
    for (offset, _, _), earlier_end in zip(calls[2:], ends):
        assert offset == earlier_end  # each range starts where the one two calls back ended


def test_a_file_that_takes_no_advice_is_written_all_the_same(make_vmcore, tmp_path, monkeypatch):
    import vmcap.fileio.output

    calls = []

    def refuse(fd, offset, length, advice):
        calls.append(offset)
        raise OSError(errno.ESPIPE, "Illegal seek")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    monkeypatch.setattr(vmcap.fileio.output, "WRITEBACK_BYTES", 64 << 10)
    src, _ = make_vmcore(spec(ranges=(RamRange(0x100000, 16 << 20),), content="mixed"))
    out = tmp_path / "out"
    save(src, str(out), SaveOptions(output_format="kdump", threads=1))
    assert len(calls) == 1  # refused once, never asked again
    assert verify(str(out))["status"] == "ok"
