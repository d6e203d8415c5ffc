"""A real kdump in QEMU: the pieces the capture-kernel tests and bench/capture_memory.py share.

Debian's kernel (its .deb unpacked with dpkg -x into the cache, never installed)
boots under TCG with crashkernel=; its /init (init.sh) loads the capture kernel
with kexec -p and crashes with sysrq-c; the capture kernel runs a job script
against the live /proc/vmcore, writing to ext4 disks the host made and reads
back with debugfs (nothing is mounted on the host). QEMU's generic loader
device writes known bytes into the partial pages around memmap= holes at reset.

Everything is cached in $VMCAP_CAPTURE_CACHE (default /var/tmp/vmcap-capture),
which .ci/run fills: kernel/ (the unpacked kernel), kdump-tools/ (the unpacked
kdump-tools .deb).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parents[1]
CACHE = Path(os.environ.get("VMCAP_CAPTURE_CACHE", "/var/tmp/vmcap-capture"))
PAGE = 4096

# Modules the images load (with their dependencies): disks, ext4 (and the crc32c its
# checksums ask the crypto API for), 9p for the Debian test's root filesystem, loop and
# squashfs for the bundle's image (what dracut's instmods adds in packaging/dracut/99vmcap).
MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4", "9pnet_virtio", "9p", "loop",
           "squashfs")

# memmap= holes (size$start) that leave System RAM ranges ending and starting mid-page.
MEMMAP_HOLES = ((0x100, 0x4000080), (0x800, 0x8000800), (0x1000, 0xc000100))

# What Fedora/RHEL's kdump-utils appends for the capture kernel (x86_64), nr_cpus=1 included.
CAPTURE_APPEND = ("console=ttyS0 irqpoll nr_cpus=1 reset_devices cgroup_disable=memory mce=off "
                  "numa=off panic=-1 acpi_no_memhotplug transparent_hugepage=never nokaslr "
                  "hest_disable novmcoredd cma=0 hugetlb_cma=0")


@dataclass(frozen=True)
class Kernel:
    version: str
    root: Path  # the unpacked package: boot/vmlinuz-VERSION, lib/modules/VERSION

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"


def find_kernel() -> Kernel | None:
    boot = CACHE / "kernel" / "boot"
    versions = sorted(p.name[len("vmlinuz-"):] for p in boot.glob("vmlinuz-*")) if boot.is_dir() else []
    if not versions:
        return None
    kernel = Kernel(versions[-1], CACHE / "kernel")
    if not (kernel.root / "lib" / "modules" / kernel.version / "modules.dep").exists():
        return None
    return kernel


def missing_prerequisites() -> list[str]:
    """What this machine lacks for a real kdump run (empty when everything is there)."""
    missing = [tool for tool in ("qemu-system-x86_64", "kexec", "busybox", "mkfs.ext4", "debugfs", "chroot",
                                 "modprobe", "mksquashfs")
               if not shutil.which(tool) and not Path("/usr/sbin", tool).exists()
               and not Path("/sbin", tool).exists()]
    if find_kernel() is None:
        missing.append(f"a Debian kernel unpacked in {CACHE / 'kernel'} (.ci/run does it)")
    if os.geteuid() != 0:
        missing.append("root (debugfs reads the disks; the bundle test uses chroot)")
    return missing


def _tool(name: str) -> str:
    for d in ("", "/usr/sbin/", "/sbin/"):
        path = shutil.which(name) if not d else d + name
        if path and Path(path).exists():
            return path
    raise FileNotFoundError(name)


def _bundle_builder():
    spec = importlib.util.spec_from_file_location("build_bundle", PROJECT / "packaging" / "build-bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpio_gz(root: Path, out: Path, *, level: int = 6) -> Path:
    """root as a gzip-compressed newc archive (entries owned by root)."""
    import io

    buf = io.BytesIO()
    _bundle_builder().write_cpio(root, buf)
    out.write_bytes(gzip.compress(buf.getvalue(), compresslevel=level, mtime=0))
    return out


def build_bundle(out: Path, report: Path | None = None) -> Path:
    """vmcap's own packaging: packaging/build-bundle.py under this interpreter."""
    cmd = [sys.executable, str(PROJECT / "packaging" / "build-bundle.py"), str(out)]
    if report:
        cmd += ["--report", str(report)]
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def _copy_with_libraries(binary: str, root: Path, dest: str) -> None:
    target = root / dest.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, target)
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    for word in out.split():
        if word.startswith("/") and Path(word).exists():
            lib = root / word.lstrip("/")
            lib.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(word), lib)


def base_root(root: Path, kernel: Kernel) -> Path:
    """busybox, the kernel modules (decompressed, in load order) and init.sh as /init."""
    if root.exists():
        shutil.rmtree(root)
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "mnt", "etc", "boot", "lib/modules"):
        (root / d).mkdir(parents=True)
    shutil.copy2(_tool("busybox"), root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    order: list[str] = []
    for module in MODULES:
        out = subprocess.run([_tool("modprobe"), "-d", str(kernel.root), "-S", kernel.version,
                              "--show-depends", module], capture_output=True, text=True, check=True)
        for line in out.stdout.splitlines():
            words = line.split()
            if not words or words[0] != "insmod":
                continue
            path = Path(words[1])
            name = path.name
            for ext in (".xz", ".zst", ".gz"):
                if name.endswith(ext):
                    name = name[: -len(ext)]
            if name in order:
                continue
            data = path.read_bytes()
            if path.suffix == ".xz":
                import lzma
                data = lzma.decompress(data)
            elif path.suffix == ".gz":
                data = gzip.decompress(data)
            elif path.suffix == ".zst":
                import zstandard
                data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
            (root / "lib" / "modules" / name).write_bytes(data)
            order.append(name)
    (root / "lib" / "modules" / "order").write_text("\n".join(order) + "\n")
    shutil.copy2(HERE / "init.sh", root / "init")
    (root / "init").chmod(0o755)
    return root


def capture_image(work: Path, kernel: Kernel, bundle: Path | None, job: str,
                  extra: dict[str, Path] | None = None) -> Path:
    """The capture kernel's initrd: the base image, the vmcap bundle cpio appended as it is,
    and a small cpio with /job.sh (and `extra` files, image path -> host path)."""
    base = cpio_gz(base_root(work / "capture-root", kernel), work / "capture-base.cpio.gz")
    job_root = work / "job-root"
    if job_root.exists():
        shutil.rmtree(job_root)
    job_root.mkdir()
    (job_root / "job.sh").write_text(job)
    for image_path, host_path in (extra or {}).items():
        if image_path.endswith("/"):  # a binary and its shared libraries
            _copy_with_libraries(str(host_path), job_root, image_path + Path(host_path).name)
            continue
        dest = job_root / image_path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(host_path, dest)
    job_cpio = cpio_gz(job_root, work / "capture-job.cpio.gz")
    image = work / "capture.img"
    with image.open("wb") as out:
        for part in (base, bundle, job_cpio):
            if part is not None:
                out.write(part.read_bytes())  # the kernel unpacks concatenated archives
    return image


def main_image(work: Path, kernel: Kernel, capture: Path, capture_append: str,
               last_words: list[str], before_crash: str | None = None) -> Path:
    """The 1st kernel's initrd: base image + kexec + the capture kernel and its initrd;
    ``before_crash``, a busybox sh script the 1st kernel runs just before it crashes."""
    root = base_root(work / "main-root", kernel)
    _copy_with_libraries(_tool("kexec"), root, "/sbin/kexec")
    shutil.copy2(kernel.vmlinuz, root / "boot" / "vmlinuz")
    shutil.copy2(capture, root / "boot" / "capture.img")
    (root / "etc" / "capture-append").write_text(capture_append + "\n")
    (root / "etc" / "last-words").write_text("\n".join(last_words) + "\n")
    if before_crash is not None:
        (root / "etc" / "before-crash").write_text(before_crash)
    return cpio_gz(root, work / "main.cpio.gz", level=1)


def pattern(tag: str, paddr: int, length: int) -> bytes:
    """Known bytes: every 8-byte slot holds its 4-char tag and the low 32 bits of its address."""
    start = paddr & ~7
    buf = bytearray()
    for slot in range(start, paddr + length, 8):
        buf += tag.encode() + struct.pack("<I", slot & 0xFFFFFFFF)
    return bytes(buf[paddr - start: paddr - start + length])


def fractional_regions() -> list[tuple[int, int, str]]:
    """(paddr, length, tag) of the RAM bytes in the partial pages around each memmap hole:
    TAIL before a hole, HEAD after it, and the hole itself (not RAM)."""
    out = []
    for size, start in MEMMAP_HOLES:
        end = start + size
        if start % PAGE:
            out.append((start - start % PAGE, start % PAGE, "TAIL"))
        out.append((start, size, "HOLE"))
        if end % PAGE:
            out.append((end, PAGE - end % PAGE, "HEAD"))
    return out


def loader_devices(work: Path) -> list[str]:
    """QEMU -device loader arguments writing the known bytes at reset."""
    args = []
    for paddr, length, tag in fractional_regions():
        path = work / f"{tag}-{paddr:#x}.bin"
        path.write_bytes(pattern(tag, paddr, length))
        args += ["-device", f"loader,file={path},addr={paddr:#x},force-raw=on"]
    return args


def make_ext4(path: Path, size_mib: int) -> Path:
    if path.exists():
        path.unlink()
    subprocess.run(["truncate", "-s", f"{size_mib}M", str(path)], check=True)
    subprocess.run([_tool("mkfs.ext4"), "-q", "-F", "-m", "0", "-E", "root_owner=0:0", str(path)],
                   check=True)
    return path


def debugfs(image: Path, request: str) -> str:
    out = subprocess.run([_tool("debugfs"), "-R", request, str(image)], capture_output=True,
                         text=True)
    return out.stdout


def ext4_files(image: Path, directory: str = "/") -> list[str]:
    names = []
    for line in debugfs(image, f"ls -p {directory}").splitlines():
        parts = line.strip().strip("/").split("/")
        if len(parts) >= 5 and parts[4] not in (".", "..", "lost+found"):
            names.append(parts[4])
    return sorted(names)


def ext4_get(image: Path, path: str, dest: Path) -> Path:
    """Copy one file out of an ext4 image (sparse holes kept)."""
    if dest.exists():
        dest.unlink()
    subprocess.run([_tool("debugfs"), "-R", f"dump -p {path} {dest}", str(image)],
                   capture_output=True, check=True)
    if not dest.exists():
        raise FileNotFoundError(f"{image}:{path}")
    return dest


@dataclass
class Run:
    console: str
    seconds: float
    returncode: int | None


def run_qemu(work: Path, kernel: Kernel, initrd: Path, *, crashkernel: str = "256M",
             mem_mib: int = 1024, disks: dict[str, Path] = (), extra: list[str] = (),
             timeout: int = 420) -> Run:
    """Boot the 1st kernel; returns when QEMU exits (the capture kernel powers off)."""
    import time

    append = f"console=ttyS0 crashkernel={crashkernel} panic=-1 oops=panic"
    for size, start in MEMMAP_HOLES:
        append += f" memmap={size:#x}${start:#x}"
    console = work / "console.log"
    cmd = [_tool("qemu-system-x86_64"), "-accel", "tcg,thread=multi", "-cpu", "max,la57=off",
           "-m", str(mem_mib), "-smp", "2", "-display", "none", "-monitor", "none",
           "-serial", f"file:{console}", "-no-reboot", "-kernel", str(kernel.vmlinuz),
           "-initrd", str(initrd), "-append", append]
    for serial, image in dict(disks).items():
        cmd += ["-drive", f"file={image},format=raw,if=none,id={serial}",
                "-device", f"virtio-blk-pci,drive={serial},serial={serial}"]
    cmd += list(extra)
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = None
    text = console.read_text(errors="replace") if console.exists() else ""
    return Run(text, time.monotonic() - started, code)


def first_kernel_lines(console: str) -> list[str]:
    """The 1st kernel's console lines: everything before the capture kernel's banner."""
    lines = console.splitlines()
    banners = [i for i, line in enumerate(lines) if "Linux version" in line]
    end = banners[1] if len(banners) > 1 else len(lines)
    return lines[:end]
