"""Shared fixtures: vmcores built like fs/proc/vmcore.c, and the real dumps when present."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from vmcap.sample import RamRange, SampleSpec, build_vmcore

# The real dumps: $VMCAP_VMCORES, else ../shared/vmcores beside the checkout.
SHARED_VMCORES = Path(os.environ.get("VMCAP_VMCORES")
                      or Path(__file__).resolve().parents[1].parent / "shared" / "vmcores")
REAL_DUMP = SHARED_VMCORES / "qemu-6.1-panic.elf.zst"

# The situations firmware creates, each as a list of System RAM ranges
# (p_paddr, p_memsz), as /proc/iomem would give them.
PAGE = 4096
FRACTIONAL_RANGES = (
    RamRange(0x1000, 0x9fc00 - 0x1000),          # ends mid-page (e820 ...-0x9fbff)
    RamRange(0x100000, 0x200000),                 # whole pages
    RamRange(0x300400, 0x10000 - 0x400),          # starts mid-page (ACPI table before it)
    RamRange(0x400100, 0x200),                    # sub-page segment
    RamRange(0x500000, 0x2800),                   # two RAM ranges sharing page 0x502000:
    RamRange(0x502800, 0x1800 + 0x3000),          #   ...-0x5027ff and 0x502800-...
)


def spec(ranges=FRACTIONAL_RANGES, **kwargs) -> SampleSpec:
    kwargs.setdefault("content", "pattern")
    return SampleSpec(ranges=tuple(ranges), **kwargs)


@pytest.fixture
def make_vmcore(tmp_path):
    """make_vmcore(spec) -> (path, VmcoreInfo); each call writes a new file."""
    counter = iter(range(1_000_000))

    def make(sample_spec: SampleSpec | None = None, name: str | None = None):
        sample_spec = sample_spec or spec()
        path = tmp_path / (name or f"vmcore-{next(counter)}")
        info = build_vmcore(str(path), sample_spec)
        return str(path), info

    return make


@pytest.fixture(scope="session")
def real_vmcore(tmp_path_factory) -> str:
    """The real QEMU dump, decompressed once per session; skipped when absent."""
    if not REAL_DUMP.exists():
        pytest.skip(f"real dumps not present ({SHARED_VMCORES})")
    out = tmp_path_factory.mktemp("real") / "qemu-6.1-panic.elf"
    if shutil.which("zstd"):
        subprocess.run(["zstd", "-d", "-q", "-f", str(REAL_DUMP), "-o", str(out)], check=True)
    else:
        import zstandard

        with open(REAL_DUMP, "rb") as src, open(out, "wb") as dst:
            zstandard.ZstdDecompressor().copy_stream(src, dst)
    return str(out)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def temp_outputs(directory) -> list[str]:
    """vmcap's temporary output files (".OUT.XXXXXXXX.part") left in ``directory``."""
    return sorted(name for name in os.listdir(directory) if name.endswith(".part"))


def env_without_debug() -> dict:
    env = dict(os.environ)
    env.pop("VMCAP_DEBUG", None)
    return env


def move_phdrs_after_ehdr(core: Path) -> None:
    """Rewrite an ELF64 LE vmcore in place so its program headers follow the ELF header.

    makedumpfile 1.7.2 reads the program headers at offset 64 whatever e_phoff
    says. QEMU's dump keeps its section headers there, which a core does not
    need, so they are dropped and the program headers moved over them.
    """
    import struct

    with open(core, "r+b") as file:
        head = file.read(1 << 16)
        (phoff,) = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        phdrs = head[phoff:phoff + phentsize * phnum]
        first_data = min(struct.unpack_from("<Q", phdrs, i * phentsize + 8)[0]
                         for i in range(phnum))
        if 64 + len(phdrs) > first_data:
            pytest.skip(f"no room for {len(phdrs)} bytes of program headers before offset "
                        f"{first_data:#x}")
        ehdr = bytearray(head[:64])
        struct.pack_into("<QQ", ehdr, 32, 64, 0)  # e_phoff, e_shoff
        struct.pack_into("<HHH", ehdr, 58, 0, 0, 0)  # e_shentsize, e_shnum, e_shstrndx
        old_headers_end = max(phoff + len(phdrs), 64 + len(phdrs))
        file.seek(0)
        file.write((bytes(ehdr) + phdrs).ljust(old_headers_end, b"\0"))


@pytest.fixture(scope="session")
def real_vmcore_for_makedumpfile(real_vmcore, tmp_path_factory) -> Path:
    """A copy of the real dump that makedumpfile 1.7.2 accepts (program headers at 64)."""
    if not have("makedumpfile"):
        pytest.skip("makedumpfile not installed")
    copy = tmp_path_factory.mktemp("mdf") / "qemu-6.1-panic.elf"
    shutil.copyfile(real_vmcore, copy)
    copy.chmod(0o644)
    move_phdrs_after_ehdr(copy)
    return copy


PROGRESS_LINE = re.compile(r"^[A-Z][a-z ]+: \[ *\d+\.\d %\] ")


def error_lines(stderr: str) -> list[str]:
    """stderr without the progress lines `save` prints where stderr is not a terminal."""
    return [line for line in stderr.splitlines() if not PROGRESS_LINE.match(line)]


@contextmanager
def small_tmpfs(directory: Path, size: str):
    """A real full disk: a tmpfs of ``size`` mounted at ``directory`` (we are root)."""
    directory.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                             str(directory)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=False)
