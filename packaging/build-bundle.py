#!/usr/bin/env python3
"""Build a self-contained vmcap bundle for a kdump capture initramfs.

    python packaging/build-bundle.py OUT.cpio [--layout squashfs|files]
                                     [--compress gzip|xz|zstd|none] [--tree DIR]
                                     [--prefix /usr/lib/vmcap] [--report FILE.json]

The bundle holds the Python interpreter that runs vmcap here (its binary,
libpython, the C library and loader it was linked against), and of the
standard library and site-packages only the files a capture imports. Which
files those are is not guessed: the builder runs real captures of a sample
vmcore (every output format, every compression, dump levels 0/1/31, the
makedumpfile front end with -F/-R/--dump-dmesg, verify, dmesg, inspect and the
error paths) under this interpreter and records every module in
``sys.modules`` and every shared object mapped into the process. Those files,
the whole vmcap package and the ``encodings`` package (the codec a locale asks
for is looked up at run time) are copied, Python files compiled to sourceless
.pyc, shared objects stripped.

The result is a newc cpio archive rooted at ``/``. PREFIX/root/ holds the
interpreter tree; with ``--layout squashfs`` (the default) the tree is not in
the archive as files but as one compressed image, PREFIX/vmcap.squashfs, that
the wrappers mount read-only on PREFIX/root the first time they run (loop and
squashfs kernel modules, ``mount``). An initramfs is unpacked into the capture
kernel's RAM and stays there: unpacked files cost their full size for the whole
capture, a squashfs image only its compressed size, and the pages a capture
reads from it are decompressed into the page cache, which the kernel can
reclaim. ``--layout files`` puts the tree in the archive as it is, for kernels
without squashfs. PREFIX/bin/vmcap and PREFIX/bin/vmcap-makedumpfile (also
/usr/bin/NAME) are shell wrappers that run the bundle's own loader on its own
libraries, so they need nothing from the image they are appended to but
/bin/sh (and, for the squashfs layout, mount and modprobe). The Linux kernel
unpacks concatenated cpio archives (each compressed on its own), so
``cat initrd OUT.cpio > new`` adds vmcap to any initramfs;
packaging/dracut/99vmcap does the same inside kdump-utils' mkdumprd.
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import py_compile
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

DEFAULT_PREFIX = "/usr/lib/vmcap"
PYVER = f"python{sys.version_info.major}.{sys.version_info.minor}"

# Run inside the traced interpreter: records modules and mapped shared objects at exit
# (atexit also runs when click or the front end end with SystemExit).
_TRACER = r"""
import atexit, json, sys
def _record(path=sys.argv[1]):
    files = sorted({m.__file__ for m in list(sys.modules.values())
                    if getattr(m, "__file__", None)})
    maps = set()
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(None, 5)
            if len(parts) == 6 and ".so" in parts[5]:
                maps.add(parts[5].strip())
    with open(path + ".tmp", "w") as fh:
        fh.write(json.dumps({"modules": files, "objects": sorted(maps)}))
    import os
    os.rename(path + ".tmp", path)
atexit.register(_record)
entry, args = sys.argv[2], sys.argv[3:]
sys.argv = [entry] + args
if entry == "vmcap":
    from vmcap.entry import run
else:
    from vmcap.entry import run_as_makedumpfile as run
run()
"""


def _trace_runs(work: Path, real_dump: str | None) -> list[tuple[list[str], str | None, str | None]]:
    """The command lines the trace runs, as (argv, stdin file, stdout file): every capture path."""
    from vmcap.sample import RamRange, SampleSpec, build_vmcore

    src = str(work / "vmcore")
    ranges = (RamRange(0x1000, 0x9fc00 - 0x1000), RamRange(0x100000, 0x300000),
              RamRange(0x500400, 0x1c00))
    build_vmcore(src, SampleSpec(ranges=ranges, content="mixed"))
    out = work / "out"
    runs = []
    for fmt in ("zelf", "elf", "kdump"):
        for level in ("0", "1"):
            runs.append((["vmcap", "save", "-q", "--json", "--force", "--format", fmt, "-d", level,
                          src, f"{out}/{fmt}-{level}"], None, None))
    for comp in ("zlib", "lzo", "snappy", "none"):
        runs.append((["vmcap", "save", "-q", "--force", "--format", "kdump", "--compress", comp,
                      src, f"{out}/kdump-{comp}"], None, None))
    runs += [
        (["vmcap", "save", "-q", "--force", "--no-mmap", "--dmesg", f"{out}/dmesg.txt",
          src, f"{out}/nommap"], None, None),
        (["vmcap", "save", "-q", "--force", "-d", "31", src, f"{out}/d31"], None, None),
        (["vmcap", "save", "-q", src, "-"], None, f"{out}/stdout.zelf"),
        (["vmcap", "verify", f"{out}/zelf-0", "--source", src], None, None),
        (["vmcap", "verify", "--json", f"{out}/kdump-1"], None, None),
        (["vmcap", "inspect", "--json", "--fractional", "--mem-usage", src], None, None),
        (["vmcap", "inspect", f"{out}/kdump-0"], None, None),
        (["vmcap", "dmesg", src], None, None),
        (["vmcap", "decompress", "--force", f"{out}/zelf-0", f"{out}/plain"], None, None),
        (["vmcap", "save", f"{out}/missing", f"{out}/x"], None, None),
        (["vmcap", "save", "--bogus"], None, None),
    ]
    for flags in (["-c"], ["-l"], ["-p"], ["-z"], ["-E"], ["-c", "-d", "31"],
                  ["-l", "--message-level", "31", "-d", "1"]):
        runs.append((["vmcap-makedumpfile", *flags, src, f"{out}/mdf{''.join(flags)}"], None, None))
    runs += [
        (["vmcap-makedumpfile", "-F", "-c", "-d", "31", src], None, f"{out}/mdf-flat"),
        (["vmcap-makedumpfile", "-R", f"{out}/mdf-reassembled"], f"{out}/mdf-flat", None),
        (["vmcap-makedumpfile", "--dump-dmesg", src, f"{out}/mdf-dmesg"], None, None),
        (["vmcap-makedumpfile", "-x", "vmlinux", src, f"{out}/refused"], None, None),
        (["vmcap-makedumpfile", "-v"], None, None),
    ]
    if real_dump:  # a real kernel's VMCOREINFO: dump level 31 and dmesg read kernel structures
        runs += [(["vmcap", "save", "-q", "--force", "--format", "kdump", "-d", "31",
                   real_dump, f"{out}/real-d31"], None, None),
                 (["vmcap-makedumpfile", "--dump-dmesg", real_dump, f"{out}/real-dmesg"], None, None)]
    return runs


def trace(python: str, pythonpath: str, work: Path, real_dump: str | None) -> dict:
    """Run every capture path under `python`; return the union of files used."""
    (work / "out").mkdir(parents=True, exist_ok=True)
    runs = _trace_runs(work, real_dump)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("VMCAP_DEBUG", None)
    env["PYTHONPATH"] = os.pathsep.join([pythonpath, sysconfig.get_paths()["purelib"]])
    modules: set[str] = set()
    objects: set[str] = set()
    for number, (argv, stdin_path, stdout_path) in enumerate(runs):
        record = work / f"trace-{number}.json"
        stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL
        stdout = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL
        try:
            # -S: no site-packages .pth hooks (editable installs, setuptools' distutils hack)
            subprocess.run([python, "-S", "-c", _TRACER, str(record), *argv], env=env, stdin=stdin,
                           stdout=stdout, stderr=subprocess.DEVNULL, timeout=300)
        finally:
            for fh in (stdin, stdout):
                if hasattr(fh, "close"):
                    fh.close()
        if not record.exists():  # the run died before its exit handlers: the trace would be short
            raise SystemExit(f"build-bundle: traced run left no record: {' '.join(argv)}")
        entry = json.loads(record.read_text())
        modules.update(entry["modules"])
        objects.update(entry["objects"])
    return {"modules": sorted(modules), "objects": sorted(objects), "runs": len(runs)}


def _ldd(path: str) -> list[str]:
    out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libs.append(parts[2])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return libs


class Bundle:
    """The bundle tree under construction, with a size ledger per component."""

    def __init__(self, root: Path, prefix: str):
        self.root = root
        self.prefix = prefix
        self.base = root / prefix.lstrip("/")
        self.sizes: dict[str, int] = {}
        self.sources: set[str] = set()

    def add(self, src: str | Path, rel: str, component: str, *, strip: bool = False) -> None:
        dest = self.base / rel
        real = os.path.realpath(src)
        if dest.exists() or real in self.sources:
            return
        self.sources.add(real)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        os.chmod(dest, 0o755 if os.access(src, os.X_OK) else 0o644)
        if strip:
            subprocess.run(["strip", "--strip-unneeded", str(dest)], check=False,
                           stderr=subprocess.DEVNULL)
        self.sizes[component] = self.sizes.get(component, 0) + dest.stat().st_size

    def add_python(self, src: str, rel: str, component: str) -> None:
        """A module as sourceless .pyc (legacy layout, found without the .py)."""
        rel_pyc = rel[:-3] + ".pyc"
        dest = self.base / rel_pyc
        if dest.exists():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        py_compile.compile(src, cfile=str(dest), dfile=f"{self.prefix}/{rel}", doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        self.sizes[component] = self.sizes.get(component, 0) + dest.stat().st_size


# Imported on the way but not used by a capture, and optional where they are imported:
# hashlib/hmac (via secrets, random) fall back to the builtin hashes when _hashlib is
# missing, and _hashlib and _ssl pull in OpenSSL (libcrypto, 4.7 MB). The guest
# captures in tests/test_capture_kernel.py run without them.
EXCLUDED = ("_hashlib.", "_ssl.")


def _component(path: str, site: str) -> str:
    if path.startswith(site):
        top = path[len(site):].lstrip("/").split("/")[0]
        return top.split(".")[0] if not top.endswith(".libs") else top
    return "stdlib"


def build_tree(root: Path, prefix: str, traced: dict, vmcap_dir: Path,
               leave_out: tuple[str, ...] = ()) -> tuple[Bundle, str]:
    """The interpreter tree at root/PREFIX/root; returns it and the name of its ELF loader.
    leave_out: site-packages components not to copy (e.g. cramjam, for snappy only)."""
    bundle = Bundle(root, f"{prefix}/root")
    stdlib = sysconfig.get_paths()["stdlib"]
    site = sysconfig.get_paths()["purelib"]
    libdir = f"lib/{PYVER}"
    exe = os.path.realpath(sys.executable)

    # The interpreter, its libraries and the loader, all from this machine.
    bundle.add(exe, f"bin/{PYVER}", "interpreter")
    loader = None
    for lib in _ldd(exe):
        real = os.path.realpath(lib)
        if "ld-linux" in os.path.basename(lib):
            loader = os.path.basename(lib)
            bundle.add(real, f"lib/{loader}", "libc")
        elif "libpython" in lib:
            bundle.add(real, f"lib/{os.path.basename(lib)}", "interpreter", strip=True)
        else:
            bundle.add(real, f"lib/{os.path.basename(lib)}", "libc")
    if loader is None:
        raise SystemExit("build-bundle: no ELF loader found for " + exe)

    def add_module_file(path: str) -> None:
        path = os.path.normpath(path)  # ldd prints numpy/_core/../../numpy.libs/...
        if path.startswith(str(vmcap_dir)):
            return  # the vmcap package is added whole, below
        if path.startswith(site):
            rel, component = f"{libdir}/site-packages/{os.path.relpath(path, site)}", _component(path, site)
            if component.removesuffix(".libs") in leave_out:
                return
        elif path.startswith(stdlib):
            rel, component = f"{libdir}/{os.path.relpath(path, stdlib)}", "stdlib"
        else:
            return
        if os.path.basename(path).startswith(EXCLUDED):
            return
        if path.endswith(".py"):
            bundle.add_python(path, rel, component)
        elif ".so" in os.path.basename(path):
            # Wheels' grafted libraries (*.libs/) were rewritten by patchelf, and strip breaks
            # those ("ELF load command address/offset not page-aligned"): copied as they are.
            bundle.add(path, rel, component + (" (C)" if component == "stdlib" else ""),
                       strip=".libs/" not in path)
            for lib in _ldd(path):
                if lib.startswith(site):
                    add_module_file(lib)
                elif "libpython" not in lib and "ld-linux" not in lib:
                    bundle.add(os.path.realpath(lib), f"lib/{os.path.basename(lib)}", "libc")

    for path in traced["modules"]:
        add_module_file(path)
    for path in traced["objects"]:
        if path.startswith((site, stdlib)):
            add_module_file(path)
        elif "libpython" not in path and "ld-linux" not in path and "libcrypto" not in path \
                and "libssl" not in path and path.startswith("/"):
            # a system library a module loaded (dlopen): the bundle must carry it
            bundle.add(os.path.realpath(path), f"lib/{os.path.basename(path)}", "libc")
    # Always: the landmark getpath looks for, the whole encodings package, site's helpers.
    for name in ("os.py", "site.py", "_sitebuiltins.py", "_collections_abc.py", "stat.py",
                 "posixpath.py", "genericpath.py", "codecs.py", "io.py", "abc.py"):
        add_module_file(os.path.join(stdlib, name))
    for py in sorted(Path(stdlib, "encodings").glob("*.py")):
        add_module_file(str(py))
    # hashlib (imported via secrets and random) builds every algorithm at import and logs an
    # error for each it cannot: without _hashlib it needs the builtin ones (small).
    dynload = Path(sysconfig.get_config_var("DESTSHARED") or "")
    for name in ("_md5", "_sha1", "_sha256", "_sha512", "_sha3", "_blake2"):
        for so in dynload.glob(f"{name}.*.so"):
            add_module_file(str(so))
    # numpy reaches numpy.ma lazily from inside its own functions (np.unique asks
    # np.ma.is_masked), on paths that depend on the data: a trace can miss one, a
    # capture must not. It is pure Python, a few hundred KiB.
    import numpy

    for py in sorted(Path(numpy.__file__).parent.joinpath("ma").glob("*.py")):
        add_module_file(str(py))
    # vmcap itself: every module of every subpackage (error paths import lazily), sources
    # compiled like the rest.
    for py in sorted(vmcap_dir.rglob("*.py")):
        rel = py.relative_to(vmcap_dir).as_posix()
        bundle.add_python(str(py), f"{libdir}/site-packages/vmcap/{rel}", "vmcap")
    # lib-dynload must exist for getpath's exec_prefix landmark.
    (bundle.base / libdir / "lib-dynload").mkdir(parents=True, exist_ok=True)

    return bundle, loader


# The wrappers: /bin/sh and, for the squashfs layout, mount and modprobe are all they need.
# -S and an explicit PYTHONPATH: no site.py, whose site-packages paths differ between builds
# (Debian's python looks in dist-packages), and no .pth hooks.
_WRAPPER = """#!/bin/sh
# vmcap from its bundle (@PREFIX@): its own loader, libraries and Python, nothing from this system's.
B=@PREFIX@
R=$B/root
if [ ! -e "$R/bin/@PYVER@" ]; then
  # The squashfs layout: the tree stays compressed in RAM and is mounted on first use; the
  # pages a capture reads are decompressed into the page cache, which the kernel can reclaim.
  if [ -f "$B/vmcap.squashfs" ]; then
    modprobe -q loop 2>/dev/null; modprobe -q squashfs 2>/dev/null
    mount -t squashfs -o loop,ro "$B/vmcap.squashfs" "$R" 2>/dev/null
  fi
  if [ ! -e "$R/bin/@PYVER@" ]; then  # (another run may have mounted it meanwhile)
    echo "@NAME@: error: cannot mount $B/vmcap.squashfs on $R" \
         "(mount, and the loop and squashfs kernel modules, are needed)" >&2
    exit 8
  fi
fi
# OpenBLAS (numpy's, unused by vmcap) starts one thread with a buffer per CPU unless told.
PYTHONHOME=$R PYTHONPATH=$R/@LIBDIR@/site-packages PYTHONDONTWRITEBYTECODE=1 \\
OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1} \\
exec $R/lib/@LOADER@ --library-path $R/lib $R/bin/@PYVER@ -S \\
  -c 'import sys; from vmcap.entry import @FUNC@; sys.argv[0] = "@NAME@"; @FUNC@()' "$@"
"""
WRAPPERS = (("vmcap", "run"), ("vmcap-makedumpfile", "run_as_makedumpfile"))


def write_wrappers(root: Path, prefix: str, loader: str) -> None:
    """PREFIX/bin/NAME for the dracut module to install, /usr/bin/NAME for an appended cpio."""
    for name, function in WRAPPERS:
        text = _WRAPPER
        for key, value in (("@PREFIX@", prefix), ("@PYVER@", PYVER), ("@LIBDIR@", f"lib/{PYVER}"),
                           ("@LOADER@", loader), ("@FUNC@", function), ("@NAME@", name)):
            text = text.replace(key, value)
        for path in (root / "usr" / "bin" / name, root / prefix.lstrip("/") / "bin" / name):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(0o755)


def make_squashfs(root: Path, prefix: str) -> int:
    """Replace the tree at root/PREFIX/root by PREFIX/vmcap.squashfs (an empty mount point
    stays); returns the image's size."""
    tree = root / prefix.lstrip("/") / "root"
    image = tree.parent / "vmcap.squashfs"
    mksquashfs = shutil.which("mksquashfs") or "/usr/sbin/mksquashfs"
    if not os.path.exists(mksquashfs):
        raise SystemExit("build-bundle: mksquashfs not found: install squashfs-tools, "
                         "or use --layout files")
    # xz with the x86 branch filter is the smallest the kernel reads (Debian's and Fedora's
    # kernels have SQUASHFS_XZ); fixed times and owners make the image reproducible.
    cmd = [mksquashfs, str(tree), str(image), "-noappend", "-all-root", "-no-xattrs", "-quiet",
           "-no-progress", "-comp", "xz", "-b", "128K", "-mkfs-time", "0", "-all-time", "0"]
    if os.uname().machine in ("x86_64", "i686"):
        cmd += ["-Xbcj", "x86"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(tree)
    tree.mkdir()
    return image.stat().st_size


# --- newc cpio, written here so that owners (root), modes and times are the bundle's own -----

def _cpio_entry(out, name: str, st_mode: int, data: bytes, ino: int, mtime: int) -> None:
    name_bytes = name.encode() + b"\0"
    header = "070701" + "".join(f"{v:08x}" for v in (
        ino, st_mode, 0, 0, 1, mtime, len(data), 0, 0, 0, 0, len(name_bytes), 0))
    out.write(header.encode() + name_bytes)
    out.write(b"\0" * (-(110 + len(name_bytes)) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))


def write_cpio(root: Path, out) -> None:
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or int(time.time())
    ino = 1
    paths = sorted(p for p in root.rglob("*"))
    dirs = set()
    for p in paths:  # parents first (rglob order is not guaranteed)
        for parent in reversed(p.relative_to(root).parents[:-1]):
            dirs.add(parent)
    for d in sorted(dirs, key=lambda d: (len(d.parts), str(d))):
        _cpio_entry(out, str(d), stat.S_IFDIR | 0o755, b"", ino, mtime)
        ino += 1
    for p in paths:
        rel = str(p.relative_to(root))
        if Path(rel) in dirs:
            continue
        st = p.lstat()
        if stat.S_ISDIR(st.st_mode):
            _cpio_entry(out, rel, stat.S_IFDIR | 0o755, b"", ino, mtime)
        elif stat.S_ISLNK(st.st_mode):
            _cpio_entry(out, rel, stat.S_IFLNK | 0o777, os.readlink(p).encode(), ino, mtime)
        else:
            _cpio_entry(out, rel, stat.S_IFREG | (st.st_mode & 0o777), p.read_bytes(), ino, mtime)
        ino += 1
    _cpio_entry(out, "TRAILER!!!", 0, b"", 0, 0)


def compress(raw: bytes, method: str) -> bytes:
    if method == "none":
        return raw
    if method == "gzip":
        return gzip.compress(raw, compresslevel=9, mtime=0)
    if method == "xz":  # the kernel's xz decoder wants CRC32 checks
        return lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                             preset=9 | lzma.PRESET_EXTREME)
    if method == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=19).compress(raw)
    raise ValueError(method)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", help="the cpio archive to write")
    ap.add_argument("--layout", choices=("squashfs", "files"), default="squashfs",
                    help="the interpreter tree as one compressed image mounted on first use "
                         "(default), or as files unpacked into the initramfs")
    ap.add_argument("--compress", choices=("gzip", "xz", "zstd", "none"), default="gzip",
                    help="the archive's compression (default gzip; the kernel unpacks an "
                         "uncompressed archive only where it starts at a multiple of 4 bytes "
                         "of the initramfs, so 'none' cannot be appended to just any image)")
    ap.add_argument("--without-snappy", action="store_true",
                    help="leave cramjam out (makedumpfile's -p, vmcap's --compress snappy then "
                         "exit 8): 4.2 MiB of files, 1.5 MiB of the squashfs image")
    ap.add_argument("--prefix", default=DEFAULT_PREFIX, help="where the bundle lives in the image")
    ap.add_argument("--tree", help="also keep the unpacked tree here (a new directory)")
    ap.add_argument("--real-dump", help="a real vmcore to trace dump level 31 and dmesg on too")
    ap.add_argument("--report", help="write sizes (JSON) here")
    args = ap.parse_args(argv)

    import vmcap
    vmcap_dir = Path(vmcap.__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="vmcap-bundle-") as tmp:
        tmp = Path(tmp)
        traced = trace(sys.executable, str(vmcap_dir.parent), tmp / "trace", args.real_dump)
        root = Path(args.tree) if args.tree else tmp / "root"
        if root.exists():
            shutil.rmtree(root)
        bundle, loader = build_tree(root, args.prefix, traced, vmcap_dir,
                                    ("cramjam",) if args.without_snappy else ())
        write_wrappers(root, args.prefix, loader)
        image_bytes = make_squashfs(root, args.prefix) if args.layout == "squashfs" else None
        import io
        buf = io.BytesIO()
        write_cpio(root, buf)
        raw = buf.getvalue()
    method = args.compress
    data = compress(raw, method)
    Path(args.output).write_bytes(data)
    # What the capture kernel keeps in RAM for the whole capture: the image, or the files.
    resident = image_bytes if image_bytes is not None else sum(bundle.sizes.values())
    report = {"output": args.output, "layout": args.layout, "snappy": not args.without_snappy,
              "compress": method, "prefix": args.prefix,
              "unpacked_bytes": sum(bundle.sizes.values()), "squashfs_bytes": image_bytes,
              "resident_bytes": resident, "cpio_bytes": len(raw),
              "compressed_bytes": len(data), "traced_runs": traced["runs"],
              "components": dict(sorted(bundle.sizes.items(), key=lambda kv: -kv[1]))}
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{args.output}: {len(data) / 2**20:.1f} MiB ({args.layout}, archive compression "
          f"{method}); tree {report['unpacked_bytes'] / 2**20:.1f} MiB, resident in the "
          f"capture kernel's RAM {resident / 2**20:.1f} MiB")
    for name, size in report["components"].items():
        print(f"  {name:24} {size / 2**20:7.2f} MiB")
    if "numpy.libs" in report["components"]:
        # numpy's wheels link OpenBLAS into numpy's core module, so it cannot be left out;
        # vmcap never calls it. README, "Fedora, RHEL", shows the BLAS-free build.
        print("note: this numpy carries OpenBLAS, which vmcap does not use (about 6 MiB of the "
              "squashfs image): build the bundle under a BLAS-free numpy for the smallest one",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
