"""The real ppc64le and s390x dumps of tests/data (made by regen-ppc64-s390x.sh), for the arch tests.

Each dump NAME has NAME.elf.zst (QEMU's ELF), NAME.vmcoreinfo (the kernel's
VMCOREINFO, taken from its memory: QEMU wrote no note), NAME.dmesg.txt
(makedumpfile --dump-dmesg) and NAME.dN-pfns.txt (the pfns makedumpfile -d N
keeps, as "start end" ranges, for N in 31 2 4 8 16).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kept_pfns import kept_ranges  # noqa: E402  (tests/arch is not a package)

__all__ = ["RealDump", "real_dump", "kept_ranges", "run_vmcap", "expected_ranges", "decompress_zst",
           "check_foreign_makedumpfile_reads_elf_output", "check_without_max_physmem_bits",
           "check_single_level", "drgn_on_output"]


@dataclass(frozen=True)
class RealDump:
    name: str
    elf: Path  # decompressed
    vmcoreinfo: Path
    dmesg: bytes  # makedumpfile's --dump-dmesg
    d31_ranges: list[tuple[int, int]]  # what makedumpfile -d 31 keeps

    def kept_by_makedumpfile(self, level: int) -> list[tuple[int, int]]:
        """What makedumpfile -d level keeps; skips when that expectation was not made."""
        path = DATA / f"{self.name}.d{level}-pfns.txt"
        if not path.exists():
            pytest.skip(f"no makedumpfile -d {level} expectation for {self.name} ({path})")
        return expected_ranges(path)


def expected_ranges(path: Path) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in line.split()) for line in path.read_text().splitlines() if line.strip()]


def real_dump(name: str, tmp_path_factory) -> RealDump:
    """NAME decompressed into a temporary directory; skips when the data is absent."""
    packed = DATA / f"{name}.elf.zst"
    if not packed.exists():
        pytest.skip(f"real {name} dump not present ({packed})")
    out = decompress_zst(packed, tmp_path_factory.mktemp(name) / f"{name}.elf")
    return RealDump(name, out, DATA / f"{name}.vmcoreinfo", (DATA / f"{name}.dmesg.txt").read_bytes(),
                    expected_ranges(DATA / f"{name}.d31-pfns.txt"))


def decompress_zst(packed: Path, out: Path, window_log: int = 31) -> Path:
    """A tests/data dump (zstd -19 --long) decompressed to out, by zstd or python-zstandard."""
    if shutil.which("zstd"):
        subprocess.run(["zstd", "-d", "-q", "-f", f"--long={window_log}", str(packed), "-o", str(out)],
                       check=True)
    else:
        import zstandard

        with open(packed, "rb") as src, open(out, "wb") as dst:
            zstandard.ZstdDecompressor(max_window_size=1 << window_log).copy_stream(src, dst)
    return out


def check_single_level(dump: RealDump, tmp_path: Path, level: int) -> None:
    """save -d LEVEL (kdump) keeps exactly the pfns makedumpfile -d LEVEL keeps."""
    expected = dump.kept_by_makedumpfile(level)
    out = tmp_path / f"d{level}.kdump"
    run_vmcap("save", "-q", "--vmcoreinfo", dump.vmcoreinfo, "--format", "kdump", "-d", level, dump.elf, out)
    assert kept_ranges(str(out)) == expected


def drgn_on_output(dump: RealDump, tmp_path: Path, fmt: str):
    """vmcap's -d 31 output of the dump in fmt (elf, kdump) opened by drgn, the address of
    init_uts_ns.name and the VMCOREINFO; skips where drgn or its kdump support is missing."""
    drgn = pytest.importorskip("drgn")
    out = tmp_path / f"d31.{fmt}"
    run_vmcap("save", "-q", "--vmcoreinfo", dump.vmcoreinfo, "--format", fmt, "-d", "31", dump.elf, out)
    prog = drgn.Program()
    try:
        prog.set_core_dump(str(out))
    except ValueError as e:  # drgn built without libkdumpfile
        pytest.skip(f"drgn cannot open this format here: {e}")
    info = dict(line.split("=", 1) for line in dump.vmcoreinfo.read_text().splitlines() if "=" in line)
    return prog, int(info["SYMBOL(init_uts_ns)"], 16) + int(info["OFFSET(uts_namespace.name)"]), info


def check_foreign_makedumpfile_reads_elf_output(dump: RealDump, tmp_path: Path, debian_arch: str) -> None:
    """Debian's makedumpfile for debian_arch (under qemu-user) finds the VMCOREINFO that
    --vmcoreinfo put in vmcap's ELF output and gives the same log as from the original dump."""
    out = tmp_path / "d31.elf"
    run_vmcap("save", "-q", "--vmcoreinfo", dump.vmcoreinfo, "--format", "elf", "-d", "31", dump.elf, out)
    log = tmp_path / "dmesg.txt"
    subprocess.run([*foreign_makedumpfile(debian_arch), "--dump-dmesg", str(out), str(log)], check=True,
                   capture_output=True)
    assert log.read_bytes() == dump.dmesg


def check_without_max_physmem_bits(dump: RealDump, tmp_path: Path) -> None:
    """Kernels before NUMBER(MAX_PHYSMEM_BITS): the size that makes LENGTH(mem_section) the root
    count is used, as makedumpfile does, and -d 31 keeps the same pages; a length no size fits
    is exit 8."""
    info = tmp_path / "vmcoreinfo"
    info.write_text("".join(line for line in dump.vmcoreinfo.read_text().splitlines(keepends=True)
                            if not line.startswith("NUMBER(MAX_PHYSMEM_BITS)=")))
    out = tmp_path / "d31.kdump"
    run_vmcap("save", "-q", "--strict", "--vmcoreinfo", info, "--format", "kdump", "-d", "31", dump.elf, out)
    assert kept_ranges(str(out)) == dump.d31_ranges
    info.write_text(info.read_text().replace("LENGTH(mem_section)=", "LENGTH(mem_section)=3"))
    done = run_vmcap("save", "-q", "--strict", "--vmcoreinfo", info, "-d", "31", dump.elf, tmp_path / "x",
                     check=False)
    assert done.returncode == 8
    assert b"lacks NUMBER(MAX_PHYSMEM_BITS), and LENGTH(mem_section)=3" in done.stderr


def run_vmcap(*args, check: bool = True) -> subprocess.CompletedProcess:
    """vmcap as a user runs it (the checkout's package: tests run from the repository root)."""
    done = subprocess.run([sys.executable, "-m", "vmcap", *map(str, args)], capture_output=True)
    if check and done.returncode != 0:
        raise AssertionError(f"vmcap {' '.join(map(str, args))} exited {done.returncode}: "
                             f"{done.stderr.decode(errors='replace')}")
    return done


def foreign_makedumpfile(debian_arch: str) -> list[str]:
    """The command running Debian's makedumpfile for debian_arch (ppc64el, s390x) under qemu-user,
    from the root regen-ppc64-s390x.sh unpacks in $WORK (default /var/tmp/vmcap-arch-ps); skips
    where that is not here."""
    import os

    root = Path(os.environ.get("WORK", "/var/tmp/vmcap-arch-ps")) / f"root-{debian_arch}"
    qemu = {"ppc64el": "qemu-ppc64le-static", "s390x": "qemu-s390x-static"}[debian_arch]
    if not (root / "usr/bin/makedumpfile").exists() or not shutil.which(qemu):
        pytest.skip(f"no {debian_arch} makedumpfile under {qemu} (run tests/arch/regen-ppc64-s390x.sh)")
    return [qemu, "-L", str(root), str(root / "usr/bin/makedumpfile")]
