"""vmcap in a real kdump capture kernel (QEMU under TCG, Debian's kernel, no mocks).

Two boots, each about 1.5-2 minutes:

- own initramfs: the capture kernel's initrd is a busybox image with vmcap's own
  bundle (packaging/build-bundle.py) appended as a cpio; nothing of the host is
  shared into the guest. 1st kernel: 1 GiB, crashkernel=256M; capture kernel:
  nr_cpus=1 and RHEL's other capture options. vmcap saves /proc/vmcore to an
  ext4 virtio disk; then the same capture is tried onto a disk too small for it.
- Debian's kdump-tools: the capture kernel mounts the host's / read-only over 9p
  (standing in for the machine's own root disk), and Debian's real
  `kdump-config savecore` (from the kdump-tools .deb) runs with vmcap's
  makedumpfile front end in place of makedumpfile.

`pytest -m capture_kernel` runs just these. Without QEMU or the kernel they skip,
except in CI (CI=true), where a missing prerequisite fails.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "capture"))
import harness  # noqa: E402

pytestmark = pytest.mark.capture_kernel
PROJECT = Path(__file__).resolve().parents[1]
MEASURE = (Path(__file__).resolve().parent / "capture" / "measure.sh").read_text()


def _require(*extra: str) -> None:
    missing = harness.missing_prerequisites() + [e for e in extra if e]
    if missing:
        reason = "capture-kernel tests need: " + "; ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def _vmcap(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    proc = subprocess.run([sys.executable, "-m", "vmcap", *args], capture_output=True, text=True,
                          env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"vmcap {' '.join(args)}: rc={proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def _last_words() -> list[str]:
    return [f"vmcap-last-words-{secrets.token_hex(6)}", "the-quick-brown-fox-jumps-over"]


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """vmcap's own packaging, built once per session."""
    _require()
    work = tmp_path_factory.mktemp("bundle")
    return harness.build_bundle(work / "vmcap.cpio.gz", work / "report.json")


# ---------------------------------------------------------------- the bundle alone

def _unpack(cpio: Path, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    reader = "gzip -dc" if cpio.read_bytes()[:2] == b"\x1f\x8b" else "cat"
    subprocess.run(f"{reader} {cpio} | (cd {root} && cpio -idm --quiet)", shell=True, check=True)


def _run_chrooted(root: Path, script: str, vmcore: str) -> subprocess.CompletedProcess:
    """script under busybox sh, chrooted into root (given busybox and its applets, /tmp/vmcore,
    /proc and /dev as in any initramfs); whatever the script mounted is unmounted after."""
    for d in ("bin", "tmp", "proc", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", harness._tool("busybox"), str(root / "bin" / "busybox")], check=True)
    subprocess.run([harness._tool("chroot"), str(root), "/bin/busybox", "--install", "-s", "/bin"],
                   check=True)
    subprocess.run(["cp", vmcore, str(root / "tmp" / "vmcore")], check=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    subprocess.run(["mount", "--bind", "/dev", str(root / "dev")], check=True)  # the loop devices
    try:
        return subprocess.run([harness._tool("chroot"), str(root), "/bin/sh", "-c", script],
                              capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    finally:
        mounted = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                   if line.split()[1].startswith(str(root) + "/")]
        for point in sorted(mounted, key=len, reverse=True):
            subprocess.run(["umount", point], check=True)


def test_bundle_runs_in_a_root_with_only_busybox(bundle, tmp_path, make_vmcore):
    """The bundle is self-contained: chrooted into busybox + the bundle, the wrapper mounts its
    squashfs image and every format saves and verifies (no file of the host's Python, libc or
    loader is reachable)."""
    root = tmp_path / "root"
    _unpack(bundle, root)
    assert (root / "usr" / "lib" / "vmcap" / "vmcap.squashfs").is_file()
    assert not any((root / "usr" / "lib" / "vmcap" / "root").iterdir())  # a mount point
    src, _ = make_vmcore(name="vmcore")
    script = """
      vmcap save /tmp/vmcore /tmp/out.zelf && vmcap verify /tmp/out.zelf --source /tmp/vmcore &&
      vmcap save -q --format elf -d 1 /tmp/vmcore /tmp/out.elf &&
      vmcap-makedumpfile -l -d 1 --message-level 4 /tmp/vmcore /tmp/out.lzo &&
      vmcap-makedumpfile -F -c /tmp/vmcore > /tmp/out.flat &&
      vmcap-makedumpfile -R /tmp/out.kdump < /tmp/out.flat &&
      vmcap verify /tmp/out.kdump --source /tmp/vmcore
    """
    proc = _run_chrooted(root, script, src)
    assert proc.returncode == 0, proc.stderr
    # nothing logged beyond vmcap's own lines (hashlib would log missing builtin hashes)
    assert "ERROR:root" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_bundle_wrapper_without_its_image_says_so_in_one_line(bundle, tmp_path):
    """Where the image cannot be mounted (here: it is not at the prefix at all), the wrapper
    says what it needs in one line and exits 8, before anything runs."""
    if Path("/usr/lib/vmcap").exists():
        pytest.skip("a vmcap bundle is installed on this machine")
    root = tmp_path / "root"
    _unpack(bundle, root)
    proc = subprocess.run(["sh", str(root / "usr" / "bin" / "vmcap-makedumpfile"), "-v"],
                          capture_output=True, text=True)
    assert proc.returncode == 8
    assert proc.stderr.count("\n") == 1 and "cannot mount /usr/lib/vmcap/vmcap.squashfs" in proc.stderr


DRACUT_MODULE = PROJECT / "packaging" / "dracut" / "99vmcap" / "module-setup.sh"


def test_dracut_module_installs_the_bundle_over_mkdumprds_collector(bundle, tmp_path, make_vmcore):
    """module-setup.sh as dracut calls it: check() asks to be requested (255) when the bundle is
    installed, 1 when not; install() copies the bundle into $initdir and replaces the pip
    console script mkdumprd copied for core_collector; the image then captures on its own."""
    host = tmp_path / "host"
    _unpack(bundle, host)
    initdir = tmp_path / "initramfs"
    (initdir / "usr" / "bin").mkdir(parents=True)
    (initdir / "usr" / "bin" / "vmcap-makedumpfile").write_text(
        "#!/usr/bin/python3\nfrom vmcap.entry import run_as_makedumpfile as run\nrun()\n")

    def dracut(bundle_dir: Path) -> str:
        # dracut's own functions, recording what the module asks for
        script = (f"instmods() {{ echo \"instmods $*\"; }}; inst_multiple() {{ echo \"inst $*\"; }}; "
                  f"source {DRACUT_MODULE}; check; echo check=$?; installkernel; install; "
                  f"echo install=$?")
        env = dict(os.environ, VMCAP_BUNDLE_DIR=str(bundle_dir), initdir=str(initdir))
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env,
                              check=True).stdout

    assert "check=1" in dracut(tmp_path / "nowhere")
    assert dracut(host / "usr" / "lib" / "vmcap").splitlines() == [
        "check=255", "instmods loop squashfs", "inst mount modprobe", "install=0"]
    assert (initdir / "usr" / "lib" / "vmcap" / "vmcap.squashfs").is_file()
    assert (initdir / "usr" / "bin" / "vmcap-makedumpfile").read_text().startswith("#!/bin/sh")
    src, _ = make_vmcore(name="vmcore")
    proc = _run_chrooted(initdir, "vmcap-makedumpfile -l --message-level 7 -d 1 /tmp/vmcore "
                         "/tmp/vmcore-incomplete && vmcap verify /tmp/vmcore-incomplete "
                         "--source /tmp/vmcore", src)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- own initramfs

OWN_JOB = r"""
cd /mnt/out
%(measure)s
measure save vmcap save --json -d 31 --dmesg /mnt/out/dmesg.txt /proc/vmcore /mnt/out/vmcore.zelf
# a full target disk: kdump-utils' collector call onto a disk far too small for the dump
measure full vmcap-makedumpfile -l --message-level 7 -d 31 /proc/vmcore /mnt/small/vmcore-incomplete
ls -l /mnt/small > full.ls
"""


@pytest.fixture(scope="module")
def own_capture(bundle, tmp_path_factory):
    """One boot: 1st kernel crashes, the capture kernel runs vmcap from its own initramfs."""
    kernel = harness.find_kernel()
    work = tmp_path_factory.mktemp("own")
    last_words = _last_words()
    capture = harness.capture_image(work, kernel, bundle, OWN_JOB % {"measure": MEASURE})
    main = harness.main_image(work, kernel, capture, harness.CAPTURE_APPEND, last_words)
    out = harness.make_ext4(work / "out.img", 1024)
    small = harness.make_ext4(work / "small.img", 8)
    run = harness.run_qemu(work, kernel, main, crashkernel="256M",
                           disks={"out": out, "small": small},
                           extra=harness.loader_devices(work))
    (work / "console.log").write_text(run.console)
    files = harness.ext4_files(out)
    assert "job.rc" in files, (f"the capture kernel left no result (QEMU rc={run.returncode}, "
                               f"{run.seconds:.0f} s); console:\n" + "\n".join(run.console.splitlines()[-40:]))

    def text(name: str) -> str:
        return harness.ext4_get(out, f"/{name}", work / name).read_text(errors="replace")

    return {"work": work, "out": out, "small": small, "run": run, "files": files, "text": text,
            "last_words": last_words,
            "vmcore": lambda: harness.ext4_get(out, "/vmcore.zelf", work / "vmcore.zelf")}


def test_capture_kernel_setup(own_capture):
    text = own_capture["text"]
    cmdline = text("cmdline-capture.txt")
    assert "nr_cpus=1" in cmdline
    assert "crashkernel=256M" in own_capture["run"].console
    # the capture kernel has the memory crashkernel=256M left it, not the guest's 1 GiB
    total_kb = int(re.search(r"MemTotal:\s+(\d+)", text("meminfo-capture.txt")).group(1))
    assert 150_000 < total_kb < 256 * 1024
    mem = text("save.mem")
    print("capture kernel MemTotal", total_kb, "kB; vmcap save:", mem)


def test_capture_saved_and_verified(own_capture):
    text = own_capture["text"]
    assert text("save.rc").strip() == "0", text("save.err")[-3000:]
    summary = json.loads(text("save.out"))
    assert summary["fractional_pages"] >= 3 and summary["error_ranges"] == []
    stderr = text("save.err")
    assert "Traceback" not in stderr and "ERROR:" not in stderr, stderr[-3000:]
    dump = own_capture["vmcore"]()
    verified = json.loads(_vmcap("verify", "--json", str(dump)).stdout)
    assert verified["status"] == "ok"


def test_saved_dmesg_ends_with_the_first_kernels_last_console_lines(own_capture):
    dump = own_capture["vmcore"]()
    log = _vmcap("dmesg", str(dump)).stdout
    saved_at_capture = own_capture["text"]("dmesg.txt")
    console = harness.first_kernel_lines(own_capture["run"].console)
    # the last lines the 1st kernel printed on its console before the crash
    ours = [line for line in console if "VMCAPTEST:" in line]
    assert ours and "last words" in ours[-1]
    for word in own_capture["last_words"]:
        assert word in log and word in saved_at_capture
    panic = [line for line in console if "Kernel panic - not syncing" in line]
    assert panic, "the console shows no panic line"
    assert "Kernel panic - not syncing: sysrq triggered crash" in log
    # the console's last kernel lines, message text after the timestamp, are in the log
    tail = [re.sub(r"^\[\s*[\d.]+\]\s*", "", line) for line in console[-15:]
            if line.startswith("[")]
    found = [line for line in tail if line.strip() and line.strip() in log]
    assert len(found) >= len([t for t in tail if t.strip()]) // 2, (tail, log[-3000:])


def test_every_fractional_page_kept_with_its_known_bytes(own_capture):
    from vmcap.source.dump import open_dump

    dump = own_capture["vmcore"]()
    checked = 0
    with open_dump(str(dump)) as opened:
        for paddr, length, tag in harness.fractional_regions():
            if tag == "HOLE":
                continue  # not RAM: vmcap never reads it
            got = opened.physical.read(paddr, length)
            assert got == harness.pattern(tag, paddr, length), f"{tag} at {paddr:#x}"
            checked += 1
    # TAIL and HEAD pieces of the three holes (0x8001000, the end of one, is page-aligned)
    assert checked == 5


def test_full_target_disk_fails_with_nonzero_exit(own_capture):
    text = own_capture["text"]
    rc = int(text("full.rc"))
    assert rc == 5, text("full.err")[-2000:]
    err = text("full.err")
    assert "No space left on device" in err
    assert err.count("vmcap: error:") == 1 and "Traceback" not in err


def test_full_target_disk_leaves_a_flagged_incomplete_dump(own_capture):
    from vmcap.formats import kdump

    listing = own_capture["text"]("full.ls")
    flag = kdump.DUMP_DH_COMPRESSED_INCOMPLETE
    assert "vmcore-incomplete" in listing, listing
    dump = harness.ext4_get(own_capture["small"], "/vmcore-incomplete",
                            own_capture["work"] / "vmcore-incomplete")
    with kdump.KdumpReader(str(dump)) as reader:
        assert reader.header.status & flag
    report = json.loads(_vmcap("inspect", "--json", str(dump)).stdout)
    assert report.get("incomplete"), report


# ---------------------------------------------------------------- Debian kdump-tools

DEBIAN_JOB = r"""
H=/host
mkdir -p $H
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot $H || exit 90
for d in proc sys dev; do mount --bind /$d $H/$d; done
# the root disk's /var/crash is the output disk (kdump-tools creates /var/crash on install);
# /var is a tmpfs for that, with the host's /var/tmp bound back (CI's checkout may live there)
mkdir -p /vartmp && mount --bind $H/var/tmp /vartmp
mount -t tmpfs var $H/var && mkdir -p $H/var/crash $H/var/tmp $H/var/lib/kdump
mount --bind /vartmp $H/var/tmp && mount --bind /mnt/out $H/var/crash
# vmcap's front end in place of makedumpfile, as `dpkg-divert` + a symlink would put it
mount --bind /collector/makedumpfile $H/usr/bin/makedumpfile || exit 91
cp /kdump-tools/kdump-config $H/var/lib/kdump/kdump-config
cd /mnt/out
chroot $H /bin/bash /var/lib/kdump/kdump-config savecore > savecore.out 2> savecore.err
echo $? > savecore.rc
ls -lR /mnt/out > savecore.ls
umount $H/usr/bin/makedumpfile $H/var/crash $H/var/tmp $H/var $H/dev $H/sys $H/proc $H
"""


@pytest.fixture(scope="module")
def debian_capture(tmp_path_factory):
    kdump_config = harness.CACHE / "kdump-tools" / "usr" / "sbin" / "kdump-config"
    _require("" if kdump_config.exists() else f"kdump-tools unpacked in {harness.CACHE / 'kdump-tools'}",
             "" if Path("/usr/bin/makedumpfile").exists() else "/usr/bin/makedumpfile (bind target)",
             "" if Path("/lib/lsb/init-functions").exists() else "/lib/lsb/init-functions (lsb-base)")
    kernel = harness.find_kernel()
    work = tmp_path_factory.mktemp("debian")
    # What pip writes as the vmcap-makedumpfile console script, pointed at this checkout.
    collector = work / "vmcap-makedumpfile"
    collector.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(PROJECT)!r})\n"
                         "from vmcap.entry import run_as_makedumpfile as run\nsys.exit(run())\n")
    collector.chmod(0o755)
    last_words = _last_words()
    capture = harness.capture_image(work, kernel, None, DEBIAN_JOB,
                                    {"/collector/makedumpfile": collector,
                                     "/kdump-tools/kdump-config": kdump_config})
    main = harness.main_image(work, kernel, capture, harness.CAPTURE_APPEND, last_words)
    out = harness.make_ext4(work / "out.img", 512)
    run = harness.run_qemu(work, kernel, main, crashkernel="256M", disks={"out": out},
                           extra=["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,"
                                  "readonly=on,multidevs=remap"])
    (work / "console.log").write_text(run.console)
    files = harness.ext4_files(out)
    assert "job.rc" in files, (f"the capture kernel left no result (QEMU rc={run.returncode}); "
                               "console:\n" + "\n".join(run.console.splitlines()[-40:]))
    return {"work": work, "out": out, "run": run, "files": files, "last_words": last_words,
            "text": lambda name: harness.ext4_get(out, f"/{name}", work / Path(name).name)
            .read_text(errors="replace")}


def test_debian_kdump_config_savecore_with_vmcap(debian_capture):
    text = debian_capture["text"]
    log = text("savecore.out") + text("savecore.err")
    assert text("savecore.rc").strip() == "0", log[-3000:]
    stamps = [name for name in debian_capture["files"] if re.fullmatch(r"\d{12}", name)]
    assert len(stamps) == 1, (debian_capture["files"], log[-2000:])
    stamp = stamps[0]
    names = harness.ext4_files(debian_capture["out"], f"/{stamp}")
    assert names == sorted([f"dmesg.{stamp}", f"dump.{stamp}"]), (names, log[-2000:])
    assert "makedumpfile failed" not in log, log[-2000:]
    work = debian_capture["work"]
    dump = harness.ext4_get(debian_capture["out"], f"/{stamp}/dump.{stamp}", work / f"dump.{stamp}")
    dmesg = text(f"{stamp}/dmesg.{stamp}")
    for word in debian_capture["last_words"]:
        assert word in dmesg
    assert "Kernel panic - not syncing: sysrq triggered crash" in dmesg
    # vmcap reads the flattened dump in place
    info = json.loads(_vmcap("inspect", "--json", str(dump)).stdout)
    assert info["container"] == "kdump-flat"
    assert debian_capture["last_words"][0] in _vmcap("dmesg", str(dump)).stdout
    # Debian's user path to crash: makedumpfile -R rebuilds the kdump file from the stream
    # (crash --osrelease does not parse flattened files; crash with a vmlinux does)
    if Path("/usr/bin/makedumpfile").exists() and harness.shutil.which("crash"):
        rebuilt = work / "vmcore.rebuilt"
        with dump.open("rb") as stream:
            subprocess.run(["/usr/bin/makedumpfile", "-R", str(rebuilt)], stdin=stream,
                           capture_output=True, check=True)
        proc = subprocess.run(["crash", "--osrelease", str(rebuilt)], capture_output=True, text=True)
        assert proc.stdout.strip() == harness.find_kernel().version, proc.stderr
        assert debian_capture["last_words"][0] in _vmcap("dmesg", str(rebuilt)).stdout
